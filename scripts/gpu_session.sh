#!/usr/bin/env bash
# The long GPU measurements of the paper issues (training at the gpu presets, full sweeps), one
# stage per device call (each fits the device's 10-minute command limit; results under
# $OUT/<stage>).  The GPU record itself -- every kernel family correct on the device and timed
# against its anchors, the models' step time and MFU, in one command of under 8 minutes -- is
# scripts/gpu_check.sh: run that first in a session with a device.
#
#   run(command="bash scripts/gpu_session.sh doge", timeout_s=600)
#
# Every stage is self-contained (each device call starts with $OUT emptied, often on a fresh
# machine: a stage never reads what an earlier call wrote) and writes its experiment under
# $WORK (default /tmp/jaxformers_gpu, off $OUT: run directories hold checkpoints of up to a GB
# and many files, and the device returns at most 8 files from $OUT).  What comes back per stage:
# $OUT/<stage>/log.txt, $OUT/<stage>/results.json and $OUT/<stage>/files.tgz (everything the
# stage wrote except checkpoints: plots, metrics, summaries); plus $OUT/gpu.txt.  So at most two
# stages per call.  Each stage fits the 10-minute command limit; with the device's 15 minutes a
# session (machine start included), that is one long stage per session after scripts/gpu_check.sh,
# or two when the check has already been recorded.  Long stages stop at 565 s, so that copying
# their files into $OUT still happens inside a 600 s call (run(..., timeout_s=600)).
# The training stages pass --reuse: run again on a machine still warm (same $WORK), a stage keeps
# its finished runs and continues the one its time limit stopped from its checkpoint.
#
# Stages:
#   kernels      kernel tests on the GPU: compiled Pallas vs the float32 references (every test)
#   attention    python -m experiments.bench_attention (T 1k..32k; the check does 4k and 16k)
#   scan         python -m experiments.bench_scan (+ fla)
#   models       python -m experiments.bench_models (T 2k..32k, batches 1..128)
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
#   layer-parallel  python -m experiments.layer_parallel --preset gpu, shortened to one call
#                (issue 16: >= 1.15x decode tokens/s at <= 5% more ppl): trains the ~283M Llama
#                (24 layers, 1500 steps) and evaluates late spans of 2, 4, 6 pairs (no study)
#   layer-parallel-spans  the same training, then early/middle spans of 2, 4, 8 pairs
#   hadamard     python -m experiments.bench_hadamard: Pallas FWHT vs dense x @ H   (issue 17)
#   quarot       python -m experiments.quarot --preset gpu: trains the llama, integer-path table
#                (int8 / packed-int4 weights, int8 x int8 -> int32 model forward vs fake quant,
#                weight bytes fp32/bf16/int8/int4), RTN / W8A8 schemes, outliers,
#                int8-vs-bf16 linear table                                           (issue 17)
#   quarot-gptq  trains the same llama (same seed), then the GPTQ schemes           (issue 17)
#   quantize-7b  python -m experiments.bench_quantize --platform default: quantize at LLaMA-2-7B
#                widths, 1 and 2 layers, rotation / RTN W4 / GPTQ W4 on 128 x 2048 calibration
#                tokens (GPTQ and the calibration forward on the GPU)             (issue 17)
#
# The device has jax/flax/torch/triton but no network and no fla: carry the
# wheels fetched here with
#   pip download fla-core==0.6.0 einops --no-deps -d runs/wheels
# (runs/ is git-ignored; nothing third-party is committed).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu}"
WORK="${WORK:-/tmp/jaxformers_gpu}"
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1 || true
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1

if compgen -G "runs/wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target "$WORK/.site" runs/wheels/*.whl >/dev/null 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:$WORK/.site"
fi

stage() {  # stage NAME SECONDS COMMAND...   (the command writes under $WORK/NAME)
    local name=$1 secs=$2; shift 2
    mkdir -p "$OUT/$name" "$WORK/$name"
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name/log.txt" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s; tail:"
    tail -n 15 "$OUT/$name/log.txt"
    [[ -f "$WORK/$name/results.json" ]] && cp "$WORK/$name/results.json" "$OUT/$name/"
    tar -czf "$OUT/$name/files.tgz" -C "$WORK/$name" --exclude=checkpoints --exclude='*.msgpack' \
        --exclude='*.npz' --exclude='*.safetensors' . 2>/dev/null
}

for s in "$@"; do
    case "$s" in
        # float32 dots in Pallas' Triton lowering default to TF32 (as XLA's do on GPU);
        # "highest" makes the float32 tests compare IEEE float32 math.
        kernels)     JAX_DEFAULT_MATMUL_PRECISION=highest stage kernels 300 \
                         python -m pytest -q -p no:cacheprovider \
                         tests/test_flash_attention.py tests/test_selective_scan.py tests/test_ssd.py \
                         tests/test_landmark_attention.py tests/test_hadamard.py tests/test_sparse_attention.py ;;
        attention)   stage attention 560 python -m experiments.bench_attention --out "$WORK/attention" ;;
        scan)        stage scan 560 python -m experiments.bench_scan --out "$WORK/scan" ;;
        models)      stage models 560 python -m experiments.bench_models --out "$WORK/models" ;;
        denseformer) stage denseformer 565 python -m experiments.denseformer --preset gpu --reuse \
                         --out "$WORK/denseformer" ;;
        # SCFA (issue 12): kernels vs cuDNN / Pallas flash (anchors re-measured in each stage)
        scfa-speed-hash) stage scfa-speed-hash 560 python -m experiments.scfa_speed --keep none \
                         --out "$WORK/scfa-speed-hash" ;;
        scfa-speed-qk)   stage scfa-speed-qk 560 python -m experiments.scfa_speed --buckets none \
                         --out "$WORK/scfa-speed-qk" ;;
        scfa-lm-8k)  stage scfa-lm-8k 565 python -m experiments.scfa_lm --preset gpu --seq-len 8192 --reuse \
                         --out "$WORK/scfa-lm-8k" ;;
        scfa-lm-16k) stage scfa-lm-16k 565 python -m experiments.scfa_lm --preset gpu --seq-len 16384 --reuse \
                         --out "$WORK/scfa-lm-16k" ;;
        # Landmark attention (issue 14): the gpu presets (kernel in the models via landmark_impl=auto)
        landmark-passkey) stage landmark-passkey 565 python -m experiments.landmark_passkey --preset gpu --reuse \
                         --out "$WORK/landmark-passkey" ;;
        landmark-lm) stage landmark-lm 565 python -m experiments.landmark_lm --preset gpu --reuse \
                         --out "$WORK/landmark-lm" ;;
        doge)        stage doge 565 python -m experiments.doge --preset gpu --reuse --out "$WORK/doge" ;;
        distill)     stage distill 565 python -m experiments.distill --preset gpu --reuse --out "$WORK/distill" ;;
        # layer-parallel inference (issue 16): target >= 1.15x decode tokens/s at <= 5% more ppl
        layer-parallel) stage layer-parallel 565 python -m experiments.layer_parallel --preset gpu \
                         --steps 1500 --positions late --pair-counts 2,4,6 --no-study --reuse \
                         --out "$WORK/layer-parallel" ;;
        layer-parallel-spans) stage layer-parallel-spans 565 python -m experiments.layer_parallel --preset gpu \
                         --steps 1500 --positions early,middle --pair-counts 2,4,8 --no-study --reuse \
                         --out "$WORK/layer-parallel-spans" ;;
        # QuaRot (issue 17)
        hadamard)    stage hadamard 400 python -m experiments.bench_hadamard --out "$WORK/hadamard" ;;
        quarot)      stage quarot 565 python -m experiments.quarot --preset gpu --reuse --out "$WORK/quarot" \
                         --only fp,fp_rot,W4A16_RTN,W4A16_RTN_rot,W4A4KV4_RTN,W4A4KV4_RTN_rot,W8A8_RTN,W8A8_RTN_rot ;;
        quarot-gptq) stage quarot-gptq 565 python -m experiments.quarot --preset gpu --reuse --out "$WORK/quarot-gptq" \
                         --int-schemes none \
                         --only fp,W4A16_GPTQ,W4A16_GPTQ_rot,W4A4KV4_GPTQ,W4A4KV4_GPTQ_rot,W4A4KV16_GPTQ_rot,W4A8_GPTQ_rot ;;
        quantize-7b) stage quantize-7b 560 python -m experiments.bench_quantize --platform default \
                         --specs rotate,rtn4_clip,gptq4 --layers 1,2 --calib 128 --calib-len 2048 \
                         --out "$WORK/quantize-7b" ;;
        gpu-quick|--gpu-quick) echo "gpu-quick moved: bash scripts/gpu_check.sh --gpu-quick"; exit 2 ;;
        *) echo "unknown stage $s (kernels|attention|scan|models|denseformer|scfa-speed-hash|scfa-speed-qk|scfa-lm-8k|scfa-lm-16k|landmark-passkey|landmark-lm|doge|distill|layer-parallel|layer-parallel-spans|hadamard|quarot|quarot-gptq|quantize-7b)"; exit 2 ;;
    esac
done
