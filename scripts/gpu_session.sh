#!/usr/bin/env bash
# The long GPU measurements of the paper issues (training at the gpu presets, full sweeps), one
# stage per device call (each fits the device's 10-minute command limit; results under
# $OUT/<stage>).  The GPU record itself -- every kernel family correct on the device and timed
# against its anchors, the models' step time and MFU, in one command of under 8 minutes -- is
# scripts/gpu_check.sh: run that first in a session with a device.
#
#   run(command="bash scripts/gpu_session.sh kernels attention", carry=["runs/wheels"])
#
# Stages:
#   gpu-quick    (also --gpu-quick) a few minutes: every kernel family compiled on the GPU vs its
#                float32 reference, forward + grads, incl. packed segments / initial states / GQA
#   kernels      kernel tests on the GPU: compiled Pallas vs the float32 references
#   attention    python -m experiments.bench_attention        (issue 4)
#   scan         python -m experiments.bench_scan (+ fla)      (issue 6)
#   models       python -m experiments.bench_models            (issue 6)
#   denseformer  python -m experiments.denseformer --preset gpu (issue 5)
#   scfa-speed-hash  python -m experiments.scfa_speed, hash-sparse kernel, nb 2..64   (issue 12)
#   scfa-speed-qk    python -m experiments.scfa_speed, QK-sparse kernel, keep 0.2..0.8 (issue 12)
#   scfa-lm-8k   python -m experiments.scfa_lm --preset gpu --seq-len 8192   (issue 12)
#   scfa-lm-16k  python -m experiments.scfa_lm --preset gpu --seq-len 16384  (issue 12)
#   landmark-passkey  python -m experiments.landmark_passkey --preset gpu   (issue 14)
#   landmark-lm  python -m experiments.landmark_lm --preset gpu              (issue 14)
#   distill      python -m experiments.distill --preset gpu: teacher, 3 students, throughput,
#                coverage vs generation time                                         (issue 15)
#   doge         python -m experiments.doge --preset gpu (proxy + base runs)    (issue 18)
#   layer-parallel-train  python -m experiments.layer_parallel --preset gpu --train-only (issue 16):
#                trains the ~283M-param Llama (24 layers) into $OUT/layer_parallel/runs/base
#   layer-parallel       the same run, late spans of 1, 2, 4, 6, 8 pairs + delete/swap/shuffle study
#   layer-parallel-spans the same run, early/middle spans (no study)
#                (the run, ~1.1 GB, lives in $OUT on the device: run the three stages on one
#                machine, in this order; the later two fail with "not a run directory" otherwise)
#   hadamard     python -m experiments.bench_hadamard: Pallas FWHT vs dense x @ H   (issue 17)
#   quarot       python -m experiments.quarot --preset gpu: trains the llama, integer-path table
#                (int8 / packed-int4 weights, int8 x int8 -> int32 model forward vs fake quant,
#                weight bytes fp32/bf16/int8/int4), RTN / W8A8 schemes, outliers,
#                int8-vs-bf16 linear table                                           (issue 17)
#   quarot-gptq  the GPTQ schemes on the run the quarot stage trained (run it after)  (issue 17)
#
# The device has jax/flax/torch/triton but no network and no fla: carry the
# wheels fetched here with
#   pip download fla-core==0.6.0 einops --no-deps -d runs/wheels
# (runs/ is git-ignored; nothing third-party is committed).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1 || true
python -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1

if compgen -G "runs/wheels/*.whl" > /dev/null; then
    pip install -q --no-deps --target "$OUT/.site" runs/wheels/*.whl >/dev/null 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:$OUT/.site"
fi

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 secs=$2; shift 2
    mkdir -p "$OUT/$name"
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name/log.txt" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s; tail:"
    tail -n 15 "$OUT/$name/log.txt"
}

for s in "$@"; do
    case "$s" in
        # float32 dots in Pallas' Triton lowering default to TF32 (as XLA's do on GPU);
        # "highest" makes the float32 tests compare IEEE float32 math.
        gpu-quick|--gpu-quick)
                     JAX_DEFAULT_MATMUL_PRECISION=highest stage gpu-quick 240 \
                         python -m pytest -q -p no:cacheprovider \
                         tests/test_flash_attention.py tests/test_selective_scan.py tests/test_ssd.py \
                         tests/test_landmark_attention.py tests/test_hadamard.py tests/test_sparse_attention.py \
                         -k "matches_reference or packed_segments or initial_state_kernel or full_features" ;;
        kernels)     JAX_DEFAULT_MATMUL_PRECISION=highest stage kernels 300 \
                         python -m pytest -q -p no:cacheprovider \
                         tests/test_flash_attention.py tests/test_selective_scan.py tests/test_ssd.py \
                         tests/test_landmark_attention.py tests/test_hadamard.py tests/test_sparse_attention.py ;;
        attention)   stage attention 560 python -m experiments.bench_attention --out "$OUT/attention" ;;
        scan)        stage scan 560 python -m experiments.bench_scan --out "$OUT/scan" ;;
        models)      stage models 560 python -m experiments.bench_models --out "$OUT/models" ;;
        denseformer) stage denseformer 580 python -m experiments.denseformer --preset gpu \
                         --out "$OUT/denseformer" ;;
        # SCFA (issue 12): kernels vs cuDNN / Pallas flash (anchors re-measured in each stage)
        scfa-speed-hash) stage scfa-speed-hash 560 python -m experiments.scfa_speed --keep none \
                         --out "$OUT/scfa_speed_hash" ;;
        scfa-speed-qk)   stage scfa-speed-qk 560 python -m experiments.scfa_speed --buckets none \
                         --out "$OUT/scfa_speed_qk" ;;
        scfa-lm-8k)  stage scfa-lm-8k 580 python -m experiments.scfa_lm --preset gpu --seq-len 8192 \
                         --out "$OUT/scfa_lm_8k" ;;
        scfa-lm-16k) stage scfa-lm-16k 580 python -m experiments.scfa_lm --preset gpu --seq-len 16384 \
                         --out "$OUT/scfa_lm_16k" ;;
        # Landmark attention (issue 14): the gpu presets (kernel in the models via landmark_impl=auto)
        landmark-passkey) stage landmark-passkey 580 python -m experiments.landmark_passkey --preset gpu \
                         --out "$OUT/landmark_passkey" ;;
        landmark-lm) stage landmark-lm 580 python -m experiments.landmark_lm --preset gpu \
                         --out "$OUT/landmark_lm" ;;
        doge)        stage doge 590 python -m experiments.doge --preset gpu --out "$OUT/doge" ;;
        distill)     stage distill 590 python -m experiments.distill --preset gpu --out "$OUT/distill" ;;
        # layer-parallel inference (issue 16): target >= 1.15x decode tokens/s at <= 5% more ppl
        layer-parallel-train) stage layer-parallel-train 590 python -m experiments.layer_parallel --preset gpu \
                         --train-only --out "$OUT/layer_parallel" ;;
        layer-parallel) stage layer-parallel 580 python -m experiments.layer_parallel --preset gpu \
                         --run "$OUT/layer_parallel/runs/base" --positions late --out "$OUT/layer_parallel/late" ;;
        layer-parallel-spans) stage layer-parallel-spans 580 python -m experiments.layer_parallel --preset gpu \
                         --run "$OUT/layer_parallel/runs/base" --positions early,middle --pair-counts 2,4,8 --no-study \
                         --out "$OUT/layer_parallel/early_middle" ;;
        # QuaRot (issue 17)
        hadamard)    stage hadamard 400 python -m experiments.bench_hadamard --out "$OUT/hadamard" ;;
        quarot)      stage quarot 580 python -m experiments.quarot --preset gpu --out "$OUT/quarot" \
                         --only fp,fp_rot,W4A16_RTN,W4A16_RTN_rot,W4A4KV4_RTN,W4A4KV4_RTN_rot,W8A8_RTN,W8A8_RTN_rot ;;
        quarot-gptq) stage quarot-gptq 580 python -m experiments.quarot --preset gpu \
                         --run "$OUT/quarot/runs/llama" --out "$OUT/quarot_gptq" --int-schemes none \
                         --only W4A16_GPTQ,W4A16_GPTQ_rot,W4A4KV4_GPTQ,W4A4KV4_GPTQ_rot,W4A4KV16_GPTQ_rot,W4A8_GPTQ_rot ;;
        *) echo "unknown stage $s (gpu-quick|kernels|attention|scan|models|denseformer|scfa-speed-hash|scfa-speed-qk|scfa-lm-8k|scfa-lm-16k|landmark-passkey|landmark-lm|doge|distill|layer-parallel-train|layer-parallel|layer-parallel-spans|hadamard|quarot|quarot-gptq)"; exit 2 ;;
    esac
done
