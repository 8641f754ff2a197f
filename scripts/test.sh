#!/usr/bin/env bash
# The test command (README "Quick start"; CI runs exactly this through .ci/run).
#
#   scripts/test.sh          both legs
#   scripts/test.sh 1        leg 1 only;  scripts/test.sh 2   leg 2 only
#
# leg 1  the current Python: pip install -e ".[test,hf,data]" and the whole suite
#        (python -m pytest -q -n 2 --dist loadfile --max-worker-restart=0).
#        --max-worker-restart=0: a worker that crashes (a segfault) ends the run at once,
#        naming the test it was running; with restarts, pytest-xdist's loadfile scheduling can
#        hang after a crash (pytest-dev/pytest-xdist#784) until CI's time runs out (stop 41).
# leg 2  Python 3.12 (pyenv's newest 3.12.x, else python3.12 on PATH; PYTHON312=/path
#        overrides) in .venv312/ with the newest jax / flax / optax from the registry
#        and the [test] extra (no torch): the Pallas kernel tests (with their audit and
#        mutation-audit regression tests), the deprecated-name check of our sources
#        (tests/test_audit50_deprec.py: the newest jax's deprecation tables), the GPU and TPU
#        lowering tests (tests/test_tpu_lowering*.py), the kernel report built on the
#        GPU lowering, multi-process training (tests/test_multihost.py: jax.distributed and
#        gloo change between jax releases), then a tiny training run from the CLI (train,
#        resume, evaluate).
#        The venv is reused while its Python and pyproject.toml are unchanged; jax,
#        jaxlib, flax, optax, orbax-checkpoint and chex are upgraded to their newest
#        releases on every run.
#        LEG2_ALL=1 scripts/test.sh 2   runs the whole suite there instead of the kernel /
#        lowering files (24 min 30 s on 2 idle cores, 2026-12-06, README; not part of CI's time budget).
#
# Prints which leg failed; exits non-zero if any did.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=.venv312
LEG2_TESTS=(tests/test_flash_attention.py tests/test_selective_scan.py tests/test_ssd.py tests/test_sparse_attention*.py
            tests/test_landmark_attention*.py
            tests/test_hadamard.py tests/test_gpu_check.py tests/test_kernels_x64.py
            tests/test_gpu_lowering.py tests/test_tpu_lowering*.py tests/test_kernel_report.py
            tests/test_audit_hadamard.py tests/test_audit_mutation_attention.py tests/test_audit_mutation_scan.py
            tests/test_audit_mutation_tpu.py tests/test_audit_gpucheck.py
            tests/test_audit45_kernels.py tests/test_audit45_refs.py tests/test_audit46_kernels.py
            tests/test_audit40_scfa.py tests/test_audit41_flash.py tests/test_audit41_landmark.py
            tests/test_audit43_fuzz.py tests/test_audit44_dtype.py tests/test_audit44_packed.py
            tests/test_audit_mutation_lhq.py tests/test_audit41_gpucheck.py tests/test_audit41_mamba.py
            tests/test_audit55_kern.py tests/test_multihost.py tests/test_audit50_deprec.py)
NEWEST=(jax jaxlib flax optax orbax-checkpoint chex)
# -qq: errors only (-q still prints a warning per package when an index location is missing)
PIP=(-m pip install -qq --disable-pip-version-check)
# both legs' pytest (--max-worker-restart=0: see leg 1 above)
PYTEST=(-m pytest -q -n 2 --dist loadfile --max-worker-restart=0)

leg1() {
    pip install -q -e ".[test,hf,data]" && python "${PYTEST[@]}"
}

find_python312() {
    if [[ -n "${PYTHON312:-}" ]]; then
        echo "$PYTHON312"
        return
    fi
    if command -v pyenv >/dev/null 2>&1; then
        local best
        best=$(ls -d "$(pyenv root)"/versions/3.12.*/ 2>/dev/null | sort -V | tail -n 1)
        if [[ -n "$best" && -x "${best}bin/python" ]]; then
            echo "${best}bin/python"
            return
        fi
    fi
    command -v python3.12 2>/dev/null
}

# Create the venv when missing or made from another Python / pyproject.toml; otherwise
# reuse it and only bring jax & co. to their newest releases.
prepare_venv() {
    local py=$1 stamp
    stamp="$("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])') $(sha256sum pyproject.toml | cut -c1-16)" \
        || return 1
    if [[ -x $VENV/bin/python && "$(cat $VENV/.stamp 2>/dev/null)" == "$stamp" ]]; then
        echo "leg 2: reusing $VENV, upgrading ${NEWEST[*]}"
        $VENV/bin/python "${PIP[@]}" --upgrade "${NEWEST[@]}"
        return
    fi
    echo "leg 2: creating $VENV ($("$py" --version 2>&1))"
    rm -rf "$VENV"
    "$py" -m venv "$VENV" && $VENV/bin/python "${PIP[@]}" --upgrade -e ".[test]" "${NEWEST[@]}" \
        && echo "$stamp" > $VENV/.stamp
}

# python -m MODULE ARGS..., with DeprecationWarnings attributed to our modules as errors
# (the CLI's counterpart of the pytest filterwarnings in pyproject.toml)
strict_cli() {
    JAX_PLATFORMS=cpu $VENV/bin/python -c 'import importlib, sys, warnings
warnings.filterwarnings("error", category=DeprecationWarning,
                        module=r"(jaxformers|pallas_kernels|experiments)(\.|$)")
sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))' "$@"
}

# A tiny training run from the CLI: the default model for a few steps on a synthetic task
# (no download), checkpointed, resumed for a few more steps, then evaluated.
tiny_training() {
    local tmp rc
    tmp=$(mktemp -d)
    export JAXFORMERS_CACHE="$tmp/cache"
    strict_cli experiments.train --preset tiny --steps 6 --batch-size 4 --seq-len 32 --warmup-steps 2 \
            --data synthetic:copying --eval-every 3 --eval-batches 1 --checkpoint-every 3 \
            --out "$tmp/run" --no-compile-cache --quiet >/dev/null \
        && strict_cli experiments.train --resume --steps 9 --out "$tmp/run" --no-compile-cache \
            --quiet >/dev/null \
        && strict_cli experiments.evaluate --run "$tmp/run"
    rc=$?
    unset JAXFORMERS_CACHE
    rm -rf "$tmp"
    return $rc
}

leg2() {
    local py
    py=$(find_python312)
    if [[ -z "$py" ]] || ! "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        echo "leg 2: no Python 3.12 found${py:+ ($py is not 3.12)}: install it with pyenv" \
             "(pyenv install 3.12), put python3.12 on PATH, or set PYTHON312=/path/to/python3.12" >&2
        return 1
    fi
    local t0=$SECONDS
    prepare_venv "$py" || { echo "leg 2: could not prepare $VENV with $py" >&2; return 1; }
    echo "leg 2: $VENV ready ($((SECONDS - t0)) s)"
    $VENV/bin/python -c 'import sys, jax, flax, optax
print(f"leg 2: Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__},"
      f" optax {optax.__version__}")' || return 1
    t0=$SECONDS
    local tests=("${LEG2_TESTS[@]}")
    [[ "${LEG2_ALL:-0}" != 0 ]] && tests=()  # the whole suite (pytest's testpaths)
    JAX_PLATFORMS=cpu $VENV/bin/python "${PYTEST[@]}" "${tests[@]}" || return 1
    echo "leg 2: tests passed ($((SECONDS - t0)) s)"
    t0=$SECONDS
    tiny_training || return 1
    echo "leg 2: tiny training run passed ($((SECONDS - t0)) s)"
}

legs=("$@")
[[ ${#legs[@]} -eq 0 ]] && legs=(1 2)
failed=()
for leg in "${legs[@]}"; do
    case $leg in
        1) echo "=== leg 1: $(python --version 2>&1), the whole suite" ;;
        2) echo "=== leg 2: Python 3.12 + newest jax (kernels, lowering, training)" ;;
        *) echo "usage: scripts/test.sh [1] [2]" >&2; exit 2 ;;
    esac
    start=$SECONDS
    if "leg$leg"; then
        echo "=== leg $leg passed ($((SECONDS - start)) s)"
    else
        echo "=== leg $leg FAILED ($((SECONDS - start)) s)"
        failed+=("$leg")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: leg ${failed[*]}" >&2
    exit 1
fi
echo "all legs passed: ${legs[*]}"
