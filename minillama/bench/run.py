"""Running a benchmark: parse the sides, run each in its own process (with time limits), collect figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from minillama.bench.report import figures, summary
from minillama.bench.workers import RESULT_MARK, WORKERS, warm_page_cache, write_random_checkpoint
from minillama.errors import MinillamaError

# Variants of the minillama side, named "minillama:attention=math/tuning=off": engine options to compare in
# one run (each variant is its own side, in its own process; see workers.run_minillama).
VARIANT_OPTIONS = {"compile": {"on": True, "off": False}, "pack": {"on": True, "off": False},
                   "attention": {"sdpa": "sdpa", "math": "math"}, "tuning": {"on": True, "off": False},
                   "pdl": {"on": True, "off": False}, "lag": {str(n): n for n in range(9)},
                   "quantize": {"int8": "int8", "int4": "int4"}, "group": {"32": 32, "64": 64, "128": 128},
                   "weights": {"gguf": "gguf"}}
# Sides that run the GGUF file the model came from: minillama on its blocks as they are, and llama.cpp.


def parse_side(side: str) -> tuple[str, dict[str, Any]]:
    """'minillama:attention=math/tuning=off' -> ('minillama', {'attention': 'math', 'tuning': False})."""
    name, _, variant = side.partition(":")
    if name not in WORKERS or name == "copy":
        raise MinillamaError(f"unknown side {name!r}; choose from minillama, transformers, transformers-static, "
                             "llama.cpp")
    options: dict[str, Any] = {}
    if variant and name != "minillama":
        raise MinillamaError(f"side {side!r}: only minillama has variants (minillama:attention=math)")
    for item in filter(None, variant.split("/")):
        key, _, value = item.partition("=")
        if key not in VARIANT_OPTIONS or value not in VARIANT_OPTIONS[key]:
            choices = "; ".join(f"{k}={'|'.join(v) if k != 'lag' else '0..8'}" for k, v in VARIANT_OPTIONS.items())
            raise MinillamaError(f"side {side!r}: unknown option {item!r}; choose from {choices}")
        options[key] = VARIANT_OPTIONS[key][value]
    return name, options


def _keep_output(side: str, status: str, stdout: str | bytes | None, stderr: str | bytes | None) -> None:
    """Append a side's whole output (compiler logs included) to $MINILLAMA_BENCH_LOG, if it is set."""
    log = os.environ.get("MINILLAMA_BENCH_LOG")
    if not log:
        return
    text = "".join(out.decode(errors="replace") if isinstance(out, bytes) else (out or "") for out in (stdout, stderr))
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"===== {side} ({status}) =====\n{text}\n")


def run_worker(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run one side in a fresh Python process and return its figures."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # so the child imports this same minillama
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "minillama.bench", "--worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        _keep_output(spec["side"], "timed out", e.stdout, e.stderr)
        raise MinillamaError(f"the {spec['side']} side did not finish within {timeout:g} s "
                             "(--side-timeout / --time-budget)") from None
    _keep_output(spec["side"], f"exit code {proc.returncode}", proc.stdout, proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise MinillamaError(f"the {spec['side']} side failed (exit code {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK):])


# ---- The parent: run every side, then report ---------------------------------------------------------

def default_sides(device: torch.device) -> list[str]:
    """minillama and transformers eager everywhere; on a GPU also transformers' compiled static-cache path."""
    if device.type == "cuda":
        return ["minillama", "transformers-static", "transformers"]
    return ["minillama", "transformers"]


def run_bench(model: str | Path | None, *, config: dict[str, Any] | None = None, device: str | None = None,
              dtype: str | None = None, prompt_len: int = 512, new_tokens: int = 256, repeats: int = 1,
              sides: list[str] | None = None, compile: bool | None = None, seed: int = 0,
              side_timeout: float | None = None, time_budget: float | None = None, gguf: str | Path | None = None,
              progress=None) -> list[dict[str, Any]]:
    """Benchmark every side; returns one record per figure ({"figure", "side", "value", "unit", ...}).

    model:  a checkpoint directory, or None with `config` (a config.json dict) to benchmark random weights.
    gguf:   the GGUF file `model` was converted from, for the sides that run it (`is_gguf_side`): minillama on its
            blocks as they are (converted with keep_quantized into a temporary directory) and llama.cpp.
    A side that fails (or runs past side_timeout seconds) gets an "error" record and the others still run.
    time_budget: seconds for the whole run; a side is cut off when it runs out and later sides are skipped
    (so list the sides in order of importance).
    """
    from minillama.checkpoint import resolve_device

    dev = resolve_device(device)
    if "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank of a tensor-parallel model
        if sides and any(parse_side(side)[0] != "minillama" or parse_side(side)[1] for side in sides):
            raise MinillamaError("under torchrun only the minillama side runs (transformers has no tensor "
                                 "parallelism here); leave out --sides")
        return run_ranks(model, config, dev, dtype, prompt_len, new_tokens, repeats, compile, seed, progress)
    sides = sides or default_sides(dev)
    variants = {side: parse_side(side)[1] for side in sides}  # checks every side before any work
    if len(set(sides)) != len(sides):
        raise MinillamaError("a side is named twice in --sides")
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise MinillamaError("--prompt-len, --new-tokens and --repeats must be at least 1")
    _check_gguf_sides(sides, gguf)
    progress = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="minillama-bench-") as tmp:
        model_dir, model_config, torch_dtype, name = _checkpoint(model, config, dtype, dev, seed, Path(tmp),
                                                                 progress)
        if prompt_len + new_tokens > model_config.max_position_embeddings:
            raise MinillamaError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the model's context of "
                                 f"{model_config.max_position_embeddings}")
        base = {"device": str(dev), "dtype": str(torch_dtype).removeprefix("torch."), "model": str(model_dir),
                "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "seed": seed,
                "compile": compile}
        specs = {side: {**base, "side": side, "options": options} for side, options in variants.items()}
        _add_gguf(specs, gguf, Path(tmp), progress)
        warm_page_cache(model_dir)  # the first side must not pay for the disk reads that the next one skips
        progress("measuring the copy bandwidth")
        copy = run_worker({**base, "side": "copy"})
        results = _run_sides(specs, side_timeout, time_budget, progress)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    context = {"device": device_name,
               "dtype": base["dtype"], "model": name, "prompt_len": prompt_len, "new_tokens": new_tokens}
    return figures(results, copy["copy_gb_s"], context)


def _check_gguf_sides(sides: list[str], gguf: str | Path | None) -> None:
    """The GGUF sides need the file, and llama.cpp its Python package: said before any work."""
    wanted = [side for side in sides if is_gguf_side(side)]
    if wanted and gguf is None:
        raise MinillamaError(f"the {wanted[0]} side runs the GGUF file the model came from: give it with --gguf FILE")
    if wanted and not Path(gguf).is_file():
        raise MinillamaError(f"{gguf}: no such GGUF file (--gguf)")
    if "llama.cpp" in sides:
        from minillama.optional import require

        require("llama_cpp", "the llama.cpp side")


def _add_gguf(specs: dict[str, dict[str, Any]], gguf: str | Path | None, tmp: Path, progress) -> None:
    """Point the GGUF sides at the file; minillama's at the file converted with its quantized blocks kept."""
    for side in filter(is_gguf_side, specs):
        specs[side]["gguf"] = str(gguf)
    minillama_sides = [side for side in specs if is_gguf_side(side) and side != "llama.cpp"]
    if minillama_sides:
        from minillama.gguf import convert_gguf

        progress(f"converting {gguf} with its quantized blocks kept")
        converted = str(convert_gguf(gguf, tmp / "gguf-blocks", progress=False, keep_quantized=True))
        for side in minillama_sides:
            specs[side]["model"] = converted


def is_gguf_side(side: str) -> bool:
    """llama.cpp, or a minillama side on the GGUF's own blocks (minillama:weights=gguf, with other options too)."""
    return side == "llama.cpp" or (side.startswith("minillama:") and "weights=gguf" in side.split(":", 1)[1].split("/"))


def run_ranks(model, config, dev, dtype, prompt_len, new_tokens, repeats, compile, seed,
              progress) -> list[dict[str, Any]]:
    """Under torchrun: every rank runs the minillama side in its own process on its shard of the model; rank 0
    gets every rank's figures (sides "minillama:tp=N/rank=R") and returns them, the other ranks return [].

    Rank 0 writes the random checkpoint of --config into a temporary directory the others read (one node; across
    nodes give a MODEL directory that every node has) and measures the copy bandwidth first, in a subprocess.
    """
    import shutil

    import torch.distributed as dist

    from minillama.bench.workers import reset_peak_rss, run_minillama
    from minillama.config import LlamaConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = Path(tempfile.mkdtemp(prefix="minillama-bench-")) if rank == 0 and model is None else None
    try:
        shared = [None]
        if rank == 0:
            model_dir, model_config, torch_dtype, name = _checkpoint(model, config, dtype, dev, seed, tmp, progress)
            shared = [(str(model_dir), str(torch_dtype).removeprefix("torch."), name)]
            reset_peak_rss()  # rank 0's peak memory is its shard's, not the random model's it just wrote
        dist.broadcast_object_list(shared, src=0)
        model_dir, dtype_name, name = shared[0]
        model_config = LlamaConfig.from_file(Path(model_dir))
        if prompt_len + new_tokens > model_config.max_position_embeddings:
            raise MinillamaError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the model's context of "
                                 f"{model_config.max_position_embeddings}")
        base = {"device": str(dev), "dtype": dtype_name, "model": model_dir, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "repeats": repeats, "seed": seed, "compile": compile}
        copy = [None]
        if rank == 0:
            warm_page_cache(Path(model_dir))
            progress("measuring the copy bandwidth")
            copy = [run_worker({**base, "side": "copy"})["copy_gb_s"]]
        dist.broadcast_object_list(copy, src=0)
        progress(f"running minillama on {world} ranks x {torch.get_num_threads()} threads")
        result = run_minillama({**base, "side": "minillama", "options": {}, "tp": True})
        result["threads"] = torch.get_num_threads()
        results = [None] * world
        dist.all_gather_object(results, result)
        dist.barrier()  # every rank has finished reading the checkpoint
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if rank != 0:
        return []
    for r, res in enumerate(results):
        progress(f"rank {r} ({res['threads']} threads): " + summary(res))
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    context = {"device": device_name, "dtype": dtype_name, "model": name, "prompt_len": prompt_len,
               "new_tokens": new_tokens, "ranks": world, "threads_per_rank": results[0]["threads"]}
    return figures({f"minillama:tp={world}/rank={r}": res for r, res in enumerate(results)}, copy[0], context)


def _checkpoint(model, config, dtype, dev, seed, tmp: Path, progress):
    """The checkpoint to benchmark: the given directory, or random weights of `config` written into tmp."""
    from minillama.checkpoint import resolve_dtype
    from minillama.config import LlamaConfig

    if model is not None:
        model_config = LlamaConfig.from_file(Path(model))
        return Path(model), model_config, resolve_dtype(dtype, model_config, dev), str(model)
    if config is None:
        raise MinillamaError("give a model directory or a config file (--config / --tiny)")
    model_config = LlamaConfig.from_dict(config, source="the --config file")
    torch_dtype = resolve_dtype(dtype, model_config, dev)
    progress(f"writing a random {model_config.num_hidden_layers}-layer checkpoint to {tmp}")
    model_dir = write_random_checkpoint(config, tmp / "model", torch_dtype, seed)
    return model_dir, model_config, torch_dtype, f"random:{config.get('_name_or_path', 'config')}"


def _run_sides(specs: dict[str, dict[str, Any]], side_timeout: float | None, time_budget: float | None,
               progress) -> dict[str, dict[str, Any]]:
    """Each side's figures (or {"error": ...}), in order, within the time budget."""
    results = {}
    started = time.perf_counter()
    for side, spec in specs.items():
        timeout = side_timeout
        if time_budget is not None:
            left = time_budget - (time.perf_counter() - started)
            if left < 20:
                results[side] = {"error": f"skipped: the --time-budget of {time_budget:g} s ran out"}
                progress(f"{side}: skipped (time budget)")
                continue
            timeout = left if timeout is None else min(timeout, left)
        progress(f"running {side}")
        try:
            results[side] = run_worker(spec, timeout)
        except MinillamaError as e:  # one side's failure must not lose the others' figures
            results[side] = {"error": str(e)}
            progress(f"{side}: FAILED: {e}")
            continue
        progress(f"{side}: " + summary(results[side]))
    return results
