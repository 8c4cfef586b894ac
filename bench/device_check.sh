#!/usr/bin/env bash
# One run on a lent GPU machine (the `device` tool): Press has never run on CUDA, so this is the prepared script
# for it. Stages (arguments, in order; default: tests engine):
#   tests   the engine and HTTP tests on CUDA (engines default to cuda + bf16 there), junit XML + log
#   engine  bench/engine.py --size full: the random-weight DiffusionGemma-26B-A4B, transformers' generate()
#           against Press eager with stock kernels and with the batch-invariant expert loop, batch 1 and 8
#   compiled  the same for compiled passes (startup compile of batch buckets 1-8 timed; issue 13's GPU targets)
#           Both profile 8 passes at batch 1 (stock eager; compiled): each kernel's device time, by part
#   quant   bench/quantization.py --size full: bf16 / int8 / int4 / fp8, peak memory and pass time (issue 14)
#   sudoku  tiny-sudoku's training continued on the GPU (SUDOKU_MIN minutes, 12 processes dealing batches of
#           SUDOKU_BATCH); the checkpoint comes back as sudoku-gpu.tar, to evaluate here (issue 15)
# Each stage has its own time limit (TESTS_S, ENGINE_S, COMPILED_S, SUDOKU_S, QUANT_S seconds, or STAGE_S for all;
# env) so one that hangs leaves time for the rest; what every stage printed lands in $OUT (ENGINE_SIZE=tiny
# QUANT_SIZE=mid WHEELS=none: a CPU smoke run). Wheels: `make device-wheels` here first, then carry `.whl`.
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
            # Every file in its own pytest process, all at once (one GPU, 16 cores), each under its own time limit
            # and each test under pytest-timeout's where installed, so a file that hangs loses only its own report.
            # Engines and servers run eager (the tests' engines say compile=False; PRESS_COMPILE=false for their
            # servers): compiled passes are test_compiled.py's, and compiling every fixture's buckets takes minutes.
            python3 -c "from engine.tiny_random import ensure_tiny_random as e; e('$PRESS_TEST_CACHE_DIR')"
            per_test=""; python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 100"
            logs=/tmp/press-device-tests; rm -rf "$logs"; mkdir -p "$logs"
            t0=$SECONDS limit=${TESTS_S:-${STAGE_S:-240}}
            echo "== tests (limit ${limit}s per file)"
            files=${TEST_FILES:-"tests/test_compiled.py tests/test_quantization.py tests/test_equivalence.py
                tests/test_http.py tests/test_batching.py tests/test_denoise.py tests/test_prefix_cache.py
                tests/test_images.py tests/test_errors.py tests/test_structured_outputs.py tests/test_logprobs.py"}
            for f in $files; do
                n=$(basename "$f" .py)
                ( OMP_NUM_THREADS=2 PRESS_COMPILE=false TMPDIR=$logs timeout -k 10 "$limit" \
                    python3 -m pytest -v -p no:cacheprovider -o addopts="" --tb=short -rfE $per_test "$f" \
                    > "$logs/$n.out" 2>&1; echo "{\"stage\": \"tests/$n\", \"exit\": $?}" >> "$OUT/stages.jsonl" ) &
            done
            wait
            echo "== tests: done after $((SECONDS - t0)) s"
            for l in "$logs"/*.out; do echo "===== $(basename "$l" .out)"; cat "$l"; done > "$OUT/tests.log"
            (cd "$logs" && tar czf "$OUT/server-logs.tgz" press-test-*.log 2>/dev/null)
            grep -h -E "^(FAILED|ERROR)|(passed|failed|error).* in [0-9.]+s" "$logs"/*.out | cut -c1-200 ;;
        engine)  # eager: stock kernels (grouped_mm) against the batch-invariant expert loop
            stage engine "${ENGINE_S:-${STAGE_S:-240}}" python3 bench/engine.py --size "${ENGINE_SIZE:-full}" \
                --batches 1,8 --steps 32 --repeats 2 --invariance 2 --kernels stock,batch-invariant --profile stock \
                --out "$OUT/engine" ;;
        compiled)  # compiled passes with CUDA graphs: buckets 1-8 compile at startup (timed)
            stage compiled "${COMPILED_S:-${STAGE_S:-420}}" python3 bench/engine.py --size "${ENGINE_SIZE:-full}" \
                --batches "${COMPILED_BATCHES:-1,8}" --steps 32 --repeats 2 --invariance 0 --kernels compiled --profile compiled \
                --out "$OUT/compiled" ;;
        sudoku)  # issue 15: continue tiny-sudoku's training on the GPU from the shipped weights; evaluate it here
            stage sudoku "${SUDOKU_S:-${STAGE_S:-420}}" python3 -m models.sudoku.train --device "${SUDOKU_DEVICE:-cuda}" \
                --minutes "${SUDOKU_MIN:-6}" --init models/tiny-sudoku --out /tmp/sudoku-gpu --seed "${SUDOKU_SEED:-20}" \
                --workers 12 --pool "${SUDOKU_POOL:-3000}" --batch "${SUDOKU_BATCH:-256}" --lr "${SUDOKU_LR:-3e-4}" \
                --focal-gamma 0 --given-weight 1.0 --min-givens 22 --max-givens 40 --save-every 1
            (cd /tmp/sudoku-gpu && tar cf "$OUT/sudoku-gpu.tar" .) ;;
        quant)
            stage quant "${QUANT_S:-${STAGE_S:-540}}" python3 bench/quantization.py --size "${QUANT_SIZE:-full}" --out "$OUT" ;;
        *)
            echo "unknown stage $s"; exit 2 ;;
    esac
done
