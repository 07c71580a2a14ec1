#!/usr/bin/env bash
# The one prepared GPU run: minillama vs transformers on a random Llama-3.2-1B-shaped model, bf16, bs=1.
#
#   scripts/gpu_bench.sh            # full run: GPU correctness tests, then the benchmark (about 6-7 minutes)
#   scripts/gpu_bench.sh --tiny     # the same steps on a tiny model (works on CPU too: a smoke test)
#   scripts/gpu_bench.sh --no-test  # skip the correctness test
#
# Prints one JSON object per figure on stdout; progress, environment and a closing table go to stderr. Installs nothing:
# it needs torch, transformers, safetensors and tokenizers, and finds minillama through PYTHONPATH.
# Extra arguments after the flags are passed to `minillama bench` (e.g. --repeats 5, --sides minillama).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"

TINY=0
TEST=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tiny) TINY=1; shift ;;
        --no-test) TEST=0; shift ;;
        *) break ;;
    esac
done

"$PY" - >&2 <<'PY'
import platform, torch, transformers
cuda = torch.cuda.is_available()
print(f"[gpu_bench] python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, device: "
      f"{torch.cuda.get_device_name() if cuda else 'cpu (no CUDA)'}", flush=True)
PY

if [[ $TEST == 1 ]] && "$PY" -c "import pytest" 2>/dev/null; then
    # The compiled CUDA-graph path gives the regular path's tokens (skips itself without CUDA).
    "$PY" -m pytest -q -p no:cacheprovider tests/test_fast.py -k "cuda_graph" >&2 \
        || echo "[gpu_bench] the CUDA-graph correctness test FAILED (the benchmark still runs)" >&2
fi

# Two variants of the fast path, each in its own process: SDPA attention (the default) and "math" attention
# (two matmuls and a softmax that Inductor schedules itself). Both compile with CUDA graphs and
# coordinate-descent tuning (about a minute each for this shape); the faster one should become the default.
VARIANTS="minillama,minillama:attention=math"
if [[ $TINY == 1 ]]; then
    ARGS=(--tiny --prompt-len 32 --new-tokens 16 --repeats 1 --sides "$VARIANTS,transformers")
else
    # A side that fails or hangs past --side-timeout is reported and the others still run.
    ARGS=(--config scripts/configs/llama-3.2-1b.json --dtype bfloat16 --prompt-len 2048 --new-tokens 256 --repeats 3
          --sides "$VARIANTS,transformers-static,transformers" --side-timeout 180)
fi
# The JSON lines go to stdout (and stay in $OUT/gpu_bench.jsonl when $OUT is set: the device tool brings
# that folder back); the readable table comes last, on stderr, so the end of a captured log shows it.
JSONL="${OUT:-$(mktemp -d)}/gpu_bench.jsonl"
TABLE="$(mktemp)"
status=0
"$PY" -m minillama.cli.bench "${ARGS[@]}" --json-file "$JSONL" "$@" >"$TABLE" || status=$?
cat "$JSONL" 2>/dev/null || true
cat "$TABLE" >&2
exit $status
