#!/usr/bin/env bash
# The GPU checks in one script, for the first machine with an NVIDIA GPU (at most 8 minutes on one GPU):
#   1. the GPU-marked tests (pytest -m gpu);
#   2. ENC step overhead, ResNet-50 224x224 bf16 channels_last (bench_enc_overhead --gpu-only);
#   3. FGSM and PGD-10 ResNet-50 images/s, suite vs bare torch (bench_attacks --gpu-only);
#   3b. attacks with NHWC convolution weights against NCHW, ResNet-50 (bench_channels_last);
#   4. the decode cache against JPEG decoding, baked vs parametrized ENC under FGSM (bench_imagenet --device cuda);
#   5. with 2+ GPUs: a tiny preset reproduced under torchrun with NCCL;
# then a short summary. Rows go into BENCHMARKS.md (sections *-gpu); logs and a copy of BENCHMARKS.md into $OUT
# (default /tmp/robust-enc-gpu).
#
# ART is not assumed installed: a wheel in .whl/ (repo root) is installed offline when present, else the rows that
# need ART (attacks, FGSM, most GPU tests) are skipped with a message.
#
#   benchmarks/gpu.sh             # on the GPU machine, from anywhere
#   benchmarks/gpu.sh --dry-run   # CPU, tiny sizes, same code paths, BENCHMARKS.md untouched (run by the tests)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-/tmp/robust-enc-gpu}"
mkdir -p "$OUT_DIR"
BUDGET_S=480  # the whole script, installs included
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
SUMMARY=()

note() { echo "gpu.sh: $*"; }

# step NAME SECONDS COMMAND...: run with a time limit (cut to what is left of the budget), log, record the outcome.
step() {
    local name="$1" limit="$2"; shift 2
    local left=$((BUDGET_S - SECONDS - 10))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("$name: skipped (time budget spent)"); return
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    local log="$OUT_DIR/$name.log" start=$SECONDS rc
    note "$name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    tail -n 12 "$log"
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("$name: ok in $((SECONDS - start)) s")
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        SUMMARY+=("$name: TIMED OUT after ${limit} s (see $log)")
    else
        SUMMARY+=("$name: FAILED (exit $rc, see $log)")
    fi
}

# --- set-up --------------------------------------------------------------------------------------------------------
if [ "$DRY" -eq 1 ]; then
    DEVICE=cpu
    note "dry run: CPU, tiny sizes, BENCHMARKS.md left alone"
else
    DEVICE=cuda
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        note "torch sees no CUDA device: run with --dry-run on a CPU machine"; exit 2
    fi
    "$PY" -c "import torch; print('gpu.sh: GPU', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), \
'torch', torch.__version__)"
fi
HAVE_ART=1
if ! "$PY" -c "import art" 2>/dev/null; then
    if ls "$ROOT"/.whl/adversarial_robustness_toolbox-*.whl >/dev/null 2>&1; then
        note "installing ART from .whl/ (offline)"
        "$PY" -m pip install --quiet --no-index --find-links "$ROOT/.whl" "$ROOT"/.whl/adversarial_robustness_toolbox-*.whl \
            || "$PY" -m pip install --quiet --no-index --no-deps "$ROOT"/.whl/*.whl
    fi
    "$PY" -c "import art" 2>/dev/null || HAVE_ART=0
fi
[ "$HAVE_ART" -eq 0 ] && note "ART is not installed and no usable wheel is in .whl/: skipping the rows that need it"
MISSING=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('timm', 'pandas', 'rich', 'scipy', 'sklearn', 'matplotlib', 'pytest', 'PIL')
               if u.find_spec(m) is None))")
[ -n "$MISSING" ] && note "not installed: $MISSING (steps that import them will fail; see their logs)"
WRITE=()
[ "$DRY" -eq 1 ] && WRITE=(--no-write)

# --- 1. GPU-marked tests --------------------------------------------------------------------------------------------
if ! "$PY" -c "import pytest" 2>/dev/null; then
    SUMMARY+=("gpu-tests: skipped (pytest not installed)")
elif [ "$DRY" -eq 1 ]; then  # without CUDA they would only skip: check that the selection collects
    step gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only tests
elif [ "$HAVE_ART" -eq 1 ]; then
    step gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
else  # the attack tests need ART; the training, ENC and GBR ones do not
    step gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu --ignore tests/test_attacks.py tests
    SUMMARY+=("gpu-tests: tests/test_attacks.py left out (needs ART)")
fi

# --- 2. ENC step overhead -------------------------------------------------------------------------------------------
if [ "$DRY" -eq 1 ]; then
    step enc-overhead 60 "$PY" -m benchmarks.bench_enc_overhead --gpu-only --gpu-device cpu --gpu-model resnet_tiny \
        --gpu-size 16 --gpu-batches 2 --gpu-steps 2 "${WRITE[@]}"
else
    step enc-overhead 100 "$PY" -m benchmarks.bench_enc_overhead --gpu-only --gpu-steps 40
fi

# --- 3. FGSM and PGD-10 images/s ------------------------------------------------------------------------------------
if [ "$HAVE_ART" -eq 0 ]; then
    SUMMARY+=("attacks: skipped (needs ART)")
elif [ "$DRY" -eq 1 ]; then
    step attacks 60 "$PY" -m benchmarks.bench_attacks --gpu-only --gpu-device cpu --gpu-model resnet_tiny --gpu-size 16 \
        --gpu-n 4 --gpu-batch-size 2 --gpu-rounds 1 "${WRITE[@]}"
else
    step attacks 120 "$PY" -m benchmarks.bench_attacks --gpu-only --gpu-n 1024 --gpu-batch-size 128 --gpu-rounds 3
fi

# --- 3b. attack --channels-last against NCHW ------------------------------------------------------------------------
if [ "$HAVE_ART" -eq 0 ]; then
    SUMMARY+=("channels-last: skipped (needs ART)")
elif [ "$DRY" -eq 1 ]; then
    step channels-last 60 "$PY" -m benchmarks.bench_channels_last --device cpu --model resnet_tiny --size 16 --n 4 \
        --batch-size 2 --rounds 1 "${WRITE[@]}"
else
    step channels-last 60 "$PY" -m benchmarks.bench_channels_last --device cuda --model resnet50 --size 224 --n 512 \
        --batch-size 128 --rounds 2 --section channels-last-gpu
fi

# --- 4. decode cache vs JPEG decode; baked vs parametrized ENC ------------------------------------------------------
FGSM_ARGS=()
[ "$HAVE_ART" -eq 0 ] && FGSM_ARGS=(--skip-fgsm)
if [ "$DRY" -eq 1 ]; then
    step imagenet 60 "$PY" -m benchmarks.bench_imagenet --jpegs 8 --workers 0 --batch-size 4 --rounds 1 \
        --model resnet_tiny --model-n 4 --model-size 16 --model-batch 2 "${FGSM_ARGS[@]}" "${WRITE[@]}"
else
    WORKERS=$(( $(nproc) > 8 ? 8 : $(nproc) ))
    step imagenet 130 "$PY" -m benchmarks.bench_imagenet --device cuda --section imagenet-gpu --jpegs 1024 \
        --workers "$WORKERS" --batch-size 128 --rounds 3 --model-n 512 --model-size 224 --model-batch 128 \
        "${FGSM_ARGS[@]}"
fi

# --- 5. two GPUs: a tiny preset under torchrun (NCCL) ----------------------------------------------------------------
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m robust_enc.cli reproduce --preset quick
          --rows baseline,enc --epochs 2 --out "$OUT_DIR/torchrun-quick")
if [ "$DRY" -eq 1 ] || [ "$GPUS" -lt 2 ]; then
    SUMMARY+=("torchrun-2gpu: skipped (needs 2 GPUs, found $GPUS); would run: ${TORCHRUN[*]}")
elif [ "$HAVE_ART" -eq 0 ]; then
    SUMMARY+=("torchrun-2gpu: skipped (the preset's attacks need ART)")
else
    step torchrun-2gpu 90 "${TORCHRUN[@]}"
fi

# --- summary --------------------------------------------------------------------------------------------------------
[ "$DRY" -eq 0 ] && cp BENCHMARKS.md "$OUT_DIR/" 2>/dev/null
echo
echo "gpu.sh summary ($([ "$DRY" -eq 1 ] && echo dry run || echo GPU), ${SECONDS} s of ${BUDGET_S} s; logs in $OUT_DIR):"
failed=0
for line in "${SUMMARY[@]}"; do
    echo "  $line"
    case "$line" in *FAILED*|*"TIMED OUT"*) failed=1 ;; esac
done
exit "$failed"
