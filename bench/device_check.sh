#!/usr/bin/env bash
# One run on a lent GPU machine (the `device` tool): Press has never run on CUDA, so this is the prepared script
# for it. Stages (arguments, in order; default: tests engine):
#   tests   the engine and HTTP tests on CUDA (engines default to cuda + bf16 there), junit XML + log
#   engine  bench/engine.py --size full: the random-weight DiffusionGemma-26B-A4B, transformers' generate()
#           against Press eager with stock kernels and with the batch-invariant expert loop, batch 1 and 8
#   compiled  the same for compiled passes (startup compile of batch buckets 1-8 timed; issue 13's GPU targets)
#   quant   bench/quantization.py --size full: bf16 / int8 / int4 / fp8, peak memory and pass time (issue 14)
# Each stage has its own time limit (STAGE_S seconds each, env) so one that hangs leaves time for the rest; what
# every stage printed lands in $OUT (ENGINE_SIZE=tiny QUANT_SIZE=mid WHEELS=none: a CPU smoke run). Wheels: `make device-wheels` here first, then carry `.whl`.
#
#   run(command="bash bench/device_check.sh tests engine", carry=[".whl"], timeout_s=590)    # first call
#   run(command="bash bench/device_check.sh compiled", carry=[".whl"], timeout_s=590)        # then, or: quant
set -u
OUT=${OUT:-/tmp/press-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PRESS_TEST_CACHE_DIR=/tmp/press-test-cache
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests engine)

WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.is_available())"
    python3 -c "import fastapi, pydantic, uvicorn, llguidance, torchao, openai; print('imports ok')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage() {  # name, limit, command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    echo "{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$OUT/stages.jsonl"
    tail -n 15 "$OUT/$name.log"
}

for s in "${stages[@]}"; do
    case $s in
        tests)
            # The engine (equivalence with generate(), batching, denoise), compiled passes with CUDA graphs, the
            # prefix cache, quantized loads, images, and the HTTP API through a real server and the openai SDK.
            per_test=(); python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
            stage tests "${STAGE_S:-240}" python3 -m pytest -q -p no:cacheprovider "${per_test[@]}" \
                --junitxml "$OUT/tests.xml" -o addopts="" \
                tests/test_equivalence.py tests/test_batching.py tests/test_denoise.py tests/test_prefix_cache.py \
                tests/test_compiled.py tests/test_quantization.py tests/test_images.py tests/test_http.py \
                tests/test_errors.py tests/test_structured_outputs.py tests/test_logprobs.py ;;
        engine)  # eager: stock kernels (grouped_mm) against the batch-invariant expert loop
            stage engine "${STAGE_S:-200}" python3 bench/engine.py --size "${ENGINE_SIZE:-full}" --batches 1,8 \
                --repeats 2 --kernels stock,batch-invariant --out "$OUT/engine" ;;
        compiled)  # compiled passes with CUDA graphs: buckets 1-8 compile at startup (timed)
            stage compiled "${STAGE_S:-420}" python3 bench/engine.py --size "${ENGINE_SIZE:-full}" --batches 1,8 \
                --repeats 2 --kernels compiled --out "$OUT/compiled" ;;
        quant)
            stage quant "${STAGE_S:-540}" python3 bench/quantization.py --size "${QUANT_SIZE:-full}" --out "$OUT" ;;
        *)
            echo "unknown stage $s"; exit 2 ;;
    esac
done
