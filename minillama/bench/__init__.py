"""Benchmark minillama against transformers on the same model, prompt and settings, in one run.

Each side runs in its own subprocess (`python -m minillama.bench --worker SPEC`), so one side's imports,
peak memory and compiled code never touch the other's figures. Per side:

    load_s         reading the checkpoint onto the device, ready for a forward (modeling code imported first;
                   the files are read once beforehand, so both sides load from the page cache)
    warmup_s       first runs before timing (minillama: setting up its engine, i.e. compiling and CUDA graph
                   capture; transformers: its static cache compilation). Packing weights counts in load_s
    prompt_tok_s   prompt tokens / time of one prefill forward (last position's logits only)
    ttft_s         time to first token of a generate call
    decode_tok_s   (new tokens - 1) / time from the first token to the last, bs=1, greedy, eos disabled
    peak_mem_mb    CUDA max allocated, or the process's peak RSS on CPU (imports included)
    bandwidth_fraction  decode_tok_s * weight bytes / the measured device copy bandwidth (bytes read + written
                   per second; decoding only reads, which can run a little faster, so ~100% is the ceiling)
    tokens_checked (minillama) the fraction of its first 32 timed tokens that one plain model.forward also
                   ranks first (within rounding): the timed path computes the right thing
    cudagraph_skips (minillama, compiled on CUDA) graphs torch.compile could not capture; should be 0
    cuda_graphs_recorded (the same) graphs Inductor's graph trees recorded; should be at least 1
    MINILLAMA_BENCH_LOG=FILE appends each side's whole output to FILE (set TORCH_LOGS too for compiler logs)

`minillama bench --config scripts/configs/llama-3.2-1b.json` needs no download: it writes a randomly
initialised checkpoint of that shape to a temporary directory and loads both sides from it.
transformers is imported only inside its worker.
"""

from minillama.bench.report import figures, format_table, summary
from minillama.bench.run import parse_side, run_bench, run_worker
from minillama.bench.workers import TINY_CONFIG, tokens_checked, write_random_checkpoint

__all__ = ["TINY_CONFIG", "figures", "format_table", "parse_side", "run_bench", "run_worker", "summary",
           "tokens_checked", "write_random_checkpoint"]
