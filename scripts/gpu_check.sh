#!/usr/bin/env bash
# The GPU check (the GPU record issue): every kernel family correct on the device, then timed
# against cuDNN / JAX's Pallas mha / associative_scan / fla, the models' step time and MFU,
# in one command of under 8 minutes on an H200.  Everything comes back under $OUT:
# results.json, table.md (paste into BENCHMARKS.md), log.txt, gpu.txt.
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=540, carry=["runs/wheels"])
#   run(command="bash scripts/gpu_check.sh followup", timeout_s=300)     # the follow-up, < 4.5 min
#   bash scripts/gpu_check.sh models kernels      # named parts (one cut short by its budget, say)
#   bash scripts/gpu_check.sh --gpu-quick         # part 1 only: each kernel family vs its reference
#
# Device time (15 min) counts the machine's start, and a machine left idle goes back within a
# minute: call the follow-up right after the check, and where status's budget_left_s is short of
# its 300 s (plus a margin), give it "followup --deadline SECONDS" to end inside what is left.
#
# Parts, budgets and what each measures: python -m experiments.gpu_check --help.
# fla (for the SSD comparison) is not on the device and it has no network: carry its wheels,
# fetched here with
#   pip download fla-core==0.6.0 einops --no-deps -d runs/wheels
# (runs/ is git-ignored; nothing third-party is committed).  Without them the fla rows say so.
# The long per-issue measurements (training at the gpu presets) are scripts/gpu_session.sh.
# The set-up below (the card's description, the wheels) has time limits and counts against the
# driver's --deadline (JAXFORMERS_GPU_CHECK_T0: when this script started), so a wedged driver or
# CUDA init cannot eat the device call: the whole command stays under 8 minutes.
set -uo pipefail
export JAXFORMERS_GPU_CHECK_T0="${JAXFORMERS_GPU_CHECK_T0:-$(date +%s.%N)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu_check}"
PROBE_S="${GPU_CHECK_PROBE_S:-45}"  # seconds for each set-up step
limit() { if command -v timeout > /dev/null; then timeout -k 5 "$PROBE_S" "$@"; else "$@"; fi; }
mkdir -p "$OUT"
{ limit nvidia-smi \
      --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1 \
      || echo "nvidia-smi: failed or timed out (exit $?, limit $PROBE_S s)"
  limit python3 -c \
      "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 \
      || echo "jax.devices(): failed or timed out (exit $?, limit $PROBE_S s)"
} > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
if compgen -G "runs/wheels/*.whl" > /dev/null; then
    limit python3 -m pip install -q --no-index --no-deps --no-compile \
        --target /tmp/gpu_check_site runs/wheels/*.whl >/dev/null 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
exec python3 -m experiments.gpu_check "$@" --out "$OUT" --work /tmp/gpu_check_parts
