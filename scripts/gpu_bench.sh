#!/usr/bin/env bash
# The one prepared GPU run: minillama vs transformers on a random Llama-3.2-1B-shaped model, bf16, bs=1.
#
#   scripts/gpu_bench.sh            # full run: the benchmark, then CUDA-graph correctness tests (GPU_BENCH_BUDGET s)
#   scripts/gpu_bench.sh --tiny     # the same steps on a tiny model (works on CPU too: a smoke test)
#   scripts/gpu_bench.sh --no-test  # skip the correctness tests
#
# Prints one JSON object per figure on stdout; progress, environment and a closing table go to stderr. Installs
# nothing: it needs torch, transformers, safetensors, tokenizers (and pytest for the tests), and finds minillama
# through PYTHONPATH. Extra arguments after the flags go to `minillama bench` (e.g. --repeats 5).
#
# Time: the whole script keeps to GPU_BENCH_BUDGET seconds (default 540, for a 600 s device call). The sides
# run in order of importance (the figures issue 6 asks for first, then variants of the fast path to compare);
# a side still running when the budget ends is cut off and the rest are reported as skipped, so the figures
# of every side that finished always come out. Each side prints its figures on stderr as soon as it is done.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${GPU_BENCH_BUDGET:-540}"
START=$SECONDS

TINY=0
TEST=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tiny) TINY=1; shift ;;
        --no-test) TEST=0; shift ;;
        *) break ;;
    esac
done

CUDA=$("$PY" - <<'PY'
import platform, sys, torch, transformers
cuda = torch.cuda.is_available()
print(f"[gpu_bench] python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, device: "
      f"{torch.cuda.get_device_name() if cuda else 'cpu (no CUDA)'}", file=sys.stderr, flush=True)
print(int(cuda))
PY
)

# The sides, most important first: the default fast path and both transformers references (the figures the
# issue's targets need), then variants of the fast path, each in its own process: "math" attention (two
# matmuls and a softmax that Inductor schedules itself instead of one SDPA kernel) and Inductor's
# programmatic dependent launch (pdl, Hopper). The fastest correct one should become the default.
if [[ $CUDA == 1 ]]; then
    SIDES="minillama,transformers-static,transformers,minillama:pdl=on,minillama:attention=math,minillama:attention=math/pdl=on"
else
    SIDES="minillama,minillama:compile=on,transformers-static,transformers"  # eager+packed, compiled (pdl needs CUDA)
fi
SIDES="${GPU_BENCH_SIDES:-$SIDES}"  # a test runs just the compiled side on CPU
if [[ $TINY == 1 ]]; then
    ARGS=(--tiny --prompt-len 32 --new-tokens 16 --repeats 1)
else
    ARGS=(--config scripts/configs/llama-3.2-1b.json --dtype bfloat16 --prompt-len 2048 --new-tokens 256 --repeats 3)
fi
# The benchmark runs first (every side checks its own tokens against model.forward); the pytest checks of
# the compiled steps (sampling, eos, no CUDA-graph skips) get what is left, at least TEST_RESERVE seconds.
TEST_RESERVE=$((TEST == 1 ? 100 : 0))
LEFT=$((BUDGET - (SECONDS - START) - TEST_RESERVE - 40))  # 40 s: the random checkpoint and the copy bandwidth
echo "[gpu_bench] $((SECONDS - START)) s used; $LEFT s for the sides: $SIDES" >&2

# The JSON lines go to stdout (and stay in $OUT/gpu_bench.jsonl when $OUT is set: the device tool brings
# that folder back); the readable table comes last, on stderr, so the end of a captured log shows it.
LOGS="${OUT:-$(mktemp -d)}"
JSONL="$LOGS/gpu_bench.jsonl"
TABLE="$(mktemp)"
status=0
# Each side's whole output, with the compiler's own reasons for any CUDA-graph skip or recompile.
echo "[gpu_bench] every side's full output goes to $LOGS/bench_sides.log" >&2
MINILLAMA_BENCH_LOG="$LOGS/bench_sides.log" TORCH_LOGS="${TORCH_LOGS:-cudagraphs,recompiles,graph_breaks}" \
    "$PY" -m minillama.cli.bench "${ARGS[@]}" --sides "$SIDES" --side-timeout 200 --time-budget "$LEFT" \
    --json-file "$JSONL" "$@" >"$TABLE" || status=$?

# The continuous-batching engine at 1, 16 and 64 concurrent requests against transformers' generate_batch
# (2C requests on C slots per level), when the budget still allows it; its JSON lines go to concurrency.jsonl.
if [[ $TINY == 1 ]]; then
    CONC=(--tiny --prompt-len 32 --new-tokens 8)
else
    CONC=(--config scripts/configs/llama-3.2-1b.json --dtype bfloat16 --prompt-len 512 --new-tokens 128)
fi
CONC_LEVELS="${GPU_BENCH_CONCURRENCY:-1,16,64}"
CONC_TIME=$((BUDGET - (SECONDS - START) - TEST_RESERVE))
if (( CONC_TIME > 60 )); then
    echo "[gpu_bench] concurrency $CONC_LEVELS, $CONC_TIME s left" >&2
    "$PY" -m minillama.cli.bench "${CONC[@]}" --concurrency "$CONC_LEVELS" --side-timeout $((CONC_TIME / 2)) \
        --json-file "$LOGS/concurrency.jsonl" >>"$TABLE" || status=$?
else
    echo "[gpu_bench] no time left for the concurrency run" >&2
fi

if [[ $TEST == 1 ]] && "$PY" -c "import pytest" 2>/dev/null; then
    # Each compiled variant is captured as CUDA graphs (no skips) and gives the regular path's tokens,
    # greedy and sampled, with an eos stop (the tests skip themselves without CUDA).
    TEST_TIME=$((BUDGET - (SECONDS - START)))
    if (( TEST_TIME < 45 )); then
        echo "[gpu_bench] no time left for the CUDA-graph tests (run them on their own)" >&2
    else
        test_status=0
        timeout "$TEST_TIME" "$PY" -m pytest -q -p no:cacheprovider tests/test_fast.py -k "cuda_graph" >&2 \
            || test_status=$?
        if [[ $test_status == 124 ]]; then
            echo "[gpu_bench] the CUDA-graph tests did not finish in $TEST_TIME s (not a failure)" >&2
        elif [[ $test_status != 0 ]]; then
            echo "[gpu_bench] a CUDA-graph correctness test FAILED" >&2
            status=1
        fi
    fi
fi

cat "$JSONL" "$LOGS/concurrency.jsonl" 2>/dev/null || true
cat "$TABLE" >&2
echo "[gpu_bench] done in $((SECONDS - START)) s (exit code $status)" >&2
exit $status
