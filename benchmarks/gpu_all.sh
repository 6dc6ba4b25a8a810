#!/usr/bin/env bash
# Every GPU check and figure of siglip-cli, so that a lent GPU machine costs one call:
#
#   bash benchmarks/gpu_all.sh                     # every step, in this order
#   bash benchmarks/gpu_all.sh tests parity        # some steps (names below)
#
# Steps (rough times on an H100 with 16 cores; each is cut at STEP_TIMEOUT seconds, default
# 540, so that no single command runs past 10 minutes):
#   env       the GPU, driver, torch and package versions                            (seconds)
#   tests     tests/test_cuda.py: parity fp32/fp16/bf16 x eager/sdpa/flash at head
#             sizes 16/64/72, fast backends vs eager, the pinned ring, cuda:1         (~2 min)
#   parity    benchmarks/parity.py --device cuda: base-224 vs transformers fp32       (~1 min)
#   bench     siglip bench --attn all --dtype fp16,bf16, base-224 and so400m-384      (~5 min)
#   embed     benchmarks/embed_throughput.py: siglip embed vs the transformers loop,
#             2,000 COCO-size JPEGs, base-224 and so400m-384, fp16                    (~4 min)
#
# The whole run may need more than one 10-minute call: pass the steps in two groups, e.g.
# `env tests parity` then `bench embed`. Logs go to $OUT (the device tool's folder) when it is
# set, else ./gpu-results; the last lines of each step also go to stdout. The machine has
# torch, transformers, Pillow, typer, rich, pyarrow, sentencepiece and safetensors; flash-attn
# is not installed there (its rows say so) unless carried as a wheel.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PYTHON="${PYTHON:-python3}"
LOGS="${OUT:-$PWD/gpu-results}"
WORK="${WORK:-/tmp/siglip-bench}"
STEP_TIMEOUT="${STEP_TIMEOUT:-540}"
mkdir -p "$LOGS" "$WORK"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env tests parity bench embed)

step_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    "$PYTHON" - <<'EOF'
import importlib.metadata as md, os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "cores", os.cpu_count())
for name in ("transformers", "pillow", "typer", "rich", "numpy", "pyarrow", "sentencepiece", "safetensors", "flash-attn"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
from siglip_cli.core.attention import flash_available
print("flash:", flash_available() or "available")
EOF
}

step_tests() {
    "$PYTHON" -m pytest -q -p no:cacheprovider --basetemp="$WORK/pytest" tests/test_cuda.py tests/test_speed.py -k "cuda or flash or pooling"
}

step_parity() {
    "$PYTHON" benchmarks/parity.py --device cuda --work "$WORK"
}

step_bench() {
    for model in google/siglip-base-patch16-224 google/siglip-so400m-patch14-384; do
        "$PYTHON" -m siglip_cli bench --model "$model" --device cuda --attn all --dtype fp16,bf16 \
            --batch-sizes 1,32,128 --seconds 1 --format json >"$LOGS/bench-${model##*/}.json" || return
        "$PYTHON" - "$LOGS/bench-${model##*/}.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1])):
    rate = f"{r['items_per_s']:.0f}/s" if r["items_per_s"] else r["status"] + ": " + (r["reason"] or "")
    print(f"{r['model']:40} {r['dtype']:5} {r['tower']:8} b{r['batch_size']:<4} {r['attn']:6} {rate}")
EOF
    done
}

step_embed() {
    "$PYTHON" benchmarks/embed_throughput.py --device cuda --dtype fp16 --counts 2000 --work "$WORK" \
        --model google/siglip-base-patch16-224 || return
    "$PYTHON" benchmarks/embed_throughput.py --device cuda --dtype fp16 --counts 2000 --work "$WORK" \
        --model google/siglip-so400m-patch14-384
}

status=0
for step in "${steps[@]}"; do
    if ! declare -F "step_$step" >/dev/null; then
        echo "unknown step $step (env tests parity bench embed)" >&2
        exit 2
    fi
    echo "=== $step ($(date +%H:%M:%S), at most ${STEP_TIMEOUT}s)"
    start=$SECONDS
    # a function cannot run under `timeout` directly: run it in a child bash that has it
    timeout --kill-after=10 "$STEP_TIMEOUT" bash -c "$(declare -f "step_$step"); PYTHON='$PYTHON' LOGS='$LOGS' WORK='$WORK' step_$step" \
        >"$LOGS/$step.log" 2>&1
    code=$?
    tail -n 40 "$LOGS/$step.log"
    echo "=== $step: exit $code after $((SECONDS - start)) s; full log $LOGS/$step.log"
    [ $code -ne 0 ] && status=1
done
exit $status
