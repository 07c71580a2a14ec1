"""`minillama bench` end to end on a tiny random model: it runs, and its JSON has every figure (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minillama.bench import TINY_CONFIG, figures, format_table, write_random_checkpoint
from minillama.checkpoint import load_model
from minillama.cli import main
from minillama.config import LlamaConfig
from minillama.errors import MinillamaError

ROOT = Path(__file__).resolve().parents[1]


def test_bench_json_tiny(capsys):
    assert main(["bench", "--tiny", "--prompt-len", "8", "-n", "6", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by = {(r["figure"], r["side"]): r for r in records}
    for side in ("minillama", "transformers"):
        for figure in ("load_s", "warmup_s", "prompt_tok_s", "ttft_s", "decode_tok_s", "peak_mem_mb",
                       "bandwidth_fraction"):
            assert by[(figure, side)]["value"] > 0, (figure, side)
    for ratio in ("decode_ratio", "prompt_ratio", "ttft_ratio", "load_ratio", "peak_mem_mb_ratio"):
        assert by[(ratio, "minillama/transformers")]["value"] > 0
    assert by[("copy_gb_s", "device")]["value"] > 0
    assert by[("peak_mem_mb", "minillama")]["mem_kind"] in ("peak_rss", "rss")
    # fp32, same random weights, greedy: both sides pick the same 6 tokens.
    assert by[("tokens_agree", "minillama/transformers")]["value"] == 6
    assert by[("tokens_checked", "minillama")]["value"] == 1.0  # the timed tokens are model.forward's argmax
    assert all(r["device"].startswith("cpu") and r["dtype"] == "float32" for r in records)


def test_bench_table_and_engine_variants(capsys, tmp_path):
    """The plain weights and the compiled engine as variant sides: each runs, and its tokens check."""
    jsonl = tmp_path / "figures.jsonl"
    assert main(["bench", "--tiny", "--prompt-len", "4", "-n", "3", "--sides", "minillama:pack=off,minillama:compile=on",
                 "--json-file", str(jsonl)]) == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "minillama:compile=on" in out  # the table; the JSON lines went to the file
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for side in ("minillama:pack=off", "minillama:compile=on"):
        assert any(r["figure"] == "decode_tok_s" and r["side"] == side for r in records)
        assert any(r["figure"] == "tokens_checked" and r["side"] == side and r["value"] == 1.0 for r in records)


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--tiny", "--sides", "minillama,vllm"]) == 2
    assert "unknown side 'vllm'" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--prompt-len", "1000", "-n", "100"]) == 2
    assert "context" in capsys.readouterr().err


def test_random_checkpoint_loads(tmp_path):
    path = write_random_checkpoint(TINY_CONFIG, tmp_path / "m", torch.bfloat16)
    model = load_model(path, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert LlamaConfig.from_file(path).torch_dtype == "bfloat16"


def test_llama32_1b_config_has_the_real_shape():
    config = LlamaConfig.from_file(ROOT / "scripts" / "configs" / "llama-3.2-1b.json")
    with torch.device("meta"):
        from minillama.model import LlamaForCausalLM

        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # tied head counted once
    assert (config.rope_type, config.rope_scaling["factor"], config.rope_theta) == ("llama3", 32.0, 500000.0)


def test_ratios_and_bandwidth_fraction():
    results = {"minillama": {"load_s": 1.0, "decode_tok_s": 50.0, "prompt_tok_s": 100.0, "ttft_s": 0.5,
                             "peak_mem_mb": 500.0, "mem_kind": "peak_rss", "weight_bytes": 2e8, "tokens": [1, 2, 3]},
               "transformers": {"load_s": 2.0, "decode_tok_s": 25.0, "prompt_tok_s": 100.0, "ttft_s": 1.0,
                                "peak_mem_mb": 1000.0, "mem_kind": "peak_rss", "tokens": [1, 2, 4]}}
    context = {"device": "cpu", "dtype": "float32", "model": "m", "prompt_len": 8, "new_tokens": 3, "fast": True}
    records = figures(results, 20.0, context)
    by = {(r["figure"], r["side"]): r["value"] for r in records}
    assert by[("decode_ratio", "minillama/transformers")] == 2.0
    assert by[("load_ratio", "minillama/transformers")] == 0.5
    assert by[("bandwidth_fraction", "minillama")] == pytest.approx(50 * 2e8 / 20e9)
    assert by[("tokens_agree", "minillama/transformers")] == 2
    assert "decode 2.00x" in format_table(records)


def test_variant_sides_parse_and_get_their_own_ratios():
    from minillama.bench import parse_side

    assert parse_side("minillama:attention=math/tuning=off/lag=2") == (
        "minillama", {"attention": "math", "tuning": False, "lag": 2})
    assert parse_side("transformers-static") == ("transformers-static", {})
    for bad, message in (("minillama:attention=flash", "unknown option 'attention=flash'"),
                         ("transformers:attention=math", "only minillama has variants"),
                         ("vllm", "unknown side 'vllm'")):
        with pytest.raises(MinillamaError, match=message):
            parse_side(bad)
    side = {"load_s": 1.0, "decode_tok_s": 50.0, "prompt_tok_s": 100.0, "ttft_s": 0.5, "peak_mem_mb": 500.0,
            "mem_kind": "cuda_max_allocated", "weight_bytes": 2e8, "tokens": [1, 2, 3], "cudagraph_skips": 0}
    results = {"minillama": side, "minillama:attention=math": {**side, "decode_tok_s": 100.0, "cudagraph_skips": 1},
               "transformers-static": {**side, "decode_tok_s": 25.0, "tokens": [1, 5, 3]}}
    context = {"device": "cuda", "dtype": "bfloat16", "model": "m", "prompt_len": 8, "new_tokens": 3, "fast": True}
    records = figures(results, 20.0, context)
    by = {(r["figure"], r["side"]): r["value"] for r in records}
    assert by[("decode_ratio", "minillama/transformers-static")] == 2.0
    assert by[("decode_ratio", "minillama:attention=math/transformers-static")] == 4.0
    assert ("decode_ratio", "minillama:attention=math/minillama") not in by  # variants are not compared to each other
    assert by[("tokens_agree", "minillama:attention=math/transformers-static")] == 1
    assert by[("cudagraph_skips", "minillama:attention=math")] == 1
    table = format_table(records)
    assert "minillama:attention=math: 1 CUDA graph(s) skipped" in table and "minillama: 0" not in table


def test_bench_runs_a_variant(capsys, tmp_path, monkeypatch):
    log = tmp_path / "sides.log"
    monkeypatch.setenv("MINILLAMA_BENCH_LOG", str(log))
    assert main(["bench", "--tiny", "--prompt-len", "4", "-n", "3", "--json",
                 "--sides", "minillama,minillama:attention=math/compile=off"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    decode = {r["side"]: r["value"] for r in records if r["figure"] == "decode_tok_s"}
    assert set(decode) == {"minillama", "minillama:attention=math/compile=off"}
    text = log.read_text()  # every side's whole output, for the compiler's own logs
    assert "===== minillama (exit code 0) =====" in text and "===== minillama:attention=math/compile=off" in text
    assert "===== copy (exit code 0) =====" in text
    assert main(["bench", "--tiny", "--sides", "minillama,minillama"]) == 2
    assert "named twice" in capsys.readouterr().err


def test_a_failing_side_keeps_the_others(monkeypatch, capsys):
    """One side crashing (or timing out) is reported; the other sides' figures still come out, exit code 1."""
    import minillama.bench.run as bench

    real = bench.run_worker

    def run_worker(spec, timeout=None):
        if spec["side"] == "transformers":
            raise MinillamaError("the transformers side failed (exit code 1):\nRuntimeError: boom")
        return real(spec, timeout)

    monkeypatch.setattr(bench, "run_worker", run_worker)
    assert main(["bench", "--tiny", "--prompt-len", "4", "-n", "3"]) == 1
    captured = capsys.readouterr()
    assert "transformers: FAILED: the transformers side failed" in captured.out
    assert "decode tok/s" in captured.out and "minillama " in captured.out  # minillama's row is there
    assert "transformers failed" in captured.err


def test_time_budget_skips_the_last_sides(monkeypatch, capsys):
    """Sides run in the order given; each gets what is left of the budget, and once it is gone the rest are
    reported as skipped (a fake clock: every side takes 25 s)."""
    import minillama.bench.run as bench

    now = [0.0]
    timeouts = {}
    canned = {"load_s": 1.0, "warmup_s": 1.0, "decode_tok_s": 50.0, "prompt_tok_s": 100.0, "ttft_s": 0.5,
              "peak_mem_mb": 500.0, "mem_kind": "peak_rss", "weight_bytes": 2e8, "tokens": [1, 2, 3]}

    def run_worker(spec, timeout=None):
        if spec["side"] == "copy":
            return {"copy_gb_s": 10.0}
        timeouts[spec["side"]] = timeout
        now[0] += 25.0
        return dict(canned)

    monkeypatch.setattr(bench, "run_worker", run_worker)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    assert main(["bench", "--tiny", "--time-budget", "60", "--side-timeout", "50",
                 "--sides", "minillama,transformers,minillama:attention=math"]) == 1
    assert timeouts == {"minillama": 50, "transformers": 35}
    out = capsys.readouterr().out
    assert "minillama:attention=math: FAILED: skipped: the --time-budget of 60 s ran out" in out
    assert "minillama/transformers" in out  # the sides that ran are still compared


def test_side_timeout_is_reported(tmp_path, monkeypatch):
    from minillama.bench import TINY_CONFIG, run_worker

    log = tmp_path / "sides.log"
    monkeypatch.setenv("MINILLAMA_BENCH_LOG", str(log))

    path = write_random_checkpoint(TINY_CONFIG, tmp_path / "m", torch.float32)
    spec = {"side": "transformers", "device": "cpu", "dtype": "float32", "model": str(path), "prompt_len": 4,
            "new_tokens": 3, "repeats": 1, "seed": 0, "compile": None}
    with pytest.raises(MinillamaError, match="did not finish within 0.01 s"):
        run_worker(spec, timeout=0.01)
    assert "===== transformers (timed out) =====" in log.read_text()


def test_tokens_checked_catches_wrong_tokens(tiny_llama32):
    """The bench's correctness figure: 1.0 for the real greedy tokens, far below for a broken decoder's."""
    from minillama.bench import tokens_checked
    from minillama.generation import generate

    model = load_model(tiny_llama32, device="cpu")
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    tokens = list(generate(model, prompt, max_new_tokens=20, eos_token_id=[], engine="eager"))
    assert tokens_checked(model, prompt, tokens) == 1.0
    noise = torch.randint(0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    assert tokens_checked(model, prompt, noise) < 0.2  # what a decoder reading the wrong cache slots would give
    assert tokens_checked(model, prompt, tokens[:10] + noise[:1]) == pytest.approx(10 / 11)


def test_config_without_a_model_is_an_error():
    from minillama.bench import run_bench

    with pytest.raises(MinillamaError, match="config"):
        run_bench(None)


def test_random_checkpoint_keeps_tied_weights_tied(tmp_path):
    from safetensors import safe_open

    path = write_random_checkpoint(TINY_CONFIG, tmp_path / "m", torch.float32)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in list(f.keys())  # tied: stored once, as the embedding
        assert float(f.get_tensor("model.norm.weight").mean()) == 1.0


def test_gpu_bench_script_runs_the_compiled_engine_on_cpu(tmp_path):
    """scripts/gpu_bench.sh, the one prepared GPU run, works as it is: here on a tiny model, the compiled side,
    its JSON in $OUT and its table at the end (on a GPU the same script runs every side)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_BENCH_SIDES": "minillama:compile=on",
           "GPU_BENCH_CONCURRENCY": "1,2"}
    r = subprocess.run(["bash", str(root / "scripts" / "gpu_bench.sh"), "--tiny", "--no-test"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines()]
    checked = [(rec["side"], rec["value"]) for rec in records if rec["figure"] == "tokens_checked"]
    assert checked == [("minillama:compile=on", 1.0)]
    assert "minillama:compile=on: 100% of its first 16 tokens" in r.stderr  # the closing table
    concurrency = [json.loads(line) for line in (tmp_path / "concurrency.jsonl").read_text().splitlines()]
    assert {(rec["side"], rec["concurrency"]) for rec in concurrency} == \
        {(side, c) for side in ("minillama", "transformers") for c in (1, 2)}
    assert all(rec["output_tokens"] == 2 * rec["concurrency"] * 8 for rec in concurrency)


def test_the_serving_benchmark_runs_end_to_end(chat_model, tmp_path):
    """scripts/bench_serving.py on a tiny model: two minillama servers (the weights as stored, and
    --dtype float32), two levels, the JSON lines and the table. (Its transformers serve side was run by hand:
    starting transformers serve costs ~25 s, too much for every CI run.)"""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "serving.jsonl"
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench_serving.py"), "--model", str(chat_model),
                        "--servers", "minillama,minillama:float32", "--concurrency", "1,2", "--max-tokens", "4",
                        "--threads", "1", "--json-file", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(rec["server"], rec["concurrency"]) for rec in records} == \
        {(s, c) for s in ("minillama", "minillama:float32") for c in (1, 2)}
    assert all(rec["requests"] == 2 * rec["concurrency"] and rec["output_tokens"] == 4 * rec["requests"]
               for rec in records)
    assert all(rec["ttft_p50_ms"] > 0 and rec["itl_p99_ms"] >= rec["itl_p50_ms"] for rec in records)
    assert "minillama: output tok/s at 2 =" in r.stdout


def test_the_decode_profile_splits_each_step(smollm2_q4_dir, smollm2_cache):
    """scripts/profile_decode.py on the default model's Q4_1 weights: one table row per case whose categories
    add up to the step's wall time (Python/dispatch is the rest), with the matrix kernels a real share."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "profile_decode.py"), "--rows", "1,2", "--steps", "3",
                        "--prompt-len", "8"], env={**os.environ, "MINILLAMA_CACHE": str(smollm2_cache)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| engine")]
    assert [row[0].strip() for row in rows] == ["engine, 1 row", "engine, 2 rows"]
    for row in rows:
        ms, *parts = map(float, row[1:])
        assert abs(sum(parts) - ms) <= 0.02 * ms + 0.1 and parts[0] > 0.1 * ms  # matrix kernels
