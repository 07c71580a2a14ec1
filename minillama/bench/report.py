"""The benchmark's report: figures as records (JSON lines), ratios against the references, the table."""

from __future__ import annotations

from typing import Any

from minillama.bench.workers import CHECKED_TOKENS

def summary(result: dict[str, Any]) -> str:
    """One side's main figures on one line (progress output, so a cut-short run still shows them)."""
    parts = [f"load {result['load_s']:.2f} s", f"warm-up {result['warmup_s']:.1f} s",
             f"prompt {result['prompt_tok_s']:,.0f} tok/s", f"TTFT {result['ttft_s'] * 1000:.1f} ms"]
    if result.get("decode_tok_s"):
        parts.append(f"decode {result['decode_tok_s']:,.1f} tok/s")
    if "cudagraph_skips" in result:
        parts.append(f"cudagraph skips {result['cudagraph_skips']}, graphs recorded "
                     f"{result['cuda_graphs_recorded']}")
    if "tokens_checked" in result:
        parts.append(f"tokens checked against model.forward {result['tokens_checked']:.0%}")
    return ", ".join(parts)


def quantized_side(side: str) -> bool:
    """A minillama side on int8/int4 weights: quantized as it loads, or a GGUF's own blocks."""
    return "quantize=" in side or "weights=gguf" in side


UNITS = {"load_s": "s", "warmup_s": "s", "prompt_tok_s": "tok/s", "ttft_s": "s", "decode_tok_s": "tok/s",
         "peak_mem_mb": "MB", "bandwidth_fraction": "", "tokens_checked": ""}


def figures(results: dict[str, dict[str, Any]], copy_gb_s: float, context: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten per-side results into figure records, add ratios (minillama / each reference) and bandwidth use."""
    records: list[dict[str, Any]] = [{"figure": "copy_gb_s", "side": "device", "value": copy_gb_s, "unit": "GB/s",
                                      **context}]
    for side, r in results.items():
        if "error" in r:
            records.append({"figure": "error", "side": side, "value": r["error"], "unit": "", **context})
    results = {side: r for side, r in results.items() if "error" not in r}
    ours = [side for side in results if side.partition(":")[0] == "minillama"]  # minillama and its variants
    # The float weights' bytes (what transformers reads); a quantized side (and llama.cpp) reads its own, fewer.
    float_sides = [side for side in ours if not quantized_side(side)] or ours
    weight_bytes = next((results[side]["weight_bytes"] for side in float_sides), None)
    for side, r in results.items():
        read = r.get("weight_bytes", weight_bytes)  # transformers reports none: it reads the float weights
        if read and r.get("decode_tok_s"):
            r["bandwidth_fraction"] = r["decode_tok_s"] * read / (copy_gb_s * 1e9)
        for key, unit in UNITS.items():
            if r.get(key) is not None:
                extra = {"mem_kind": r["mem_kind"]} if key == "peak_mem_mb" else {}
                records.append({"figure": key, "side": side, "value": r[key], "unit": unit, **extra, **context})
        for key in ("cudagraph_skips", "cuda_graphs_recorded"):
            if key in r:
                records.append({"figure": key, "side": side, "value": r[key], "unit": "graphs", **context})
    if weight_bytes:
        records.append({"figure": "weight_bytes", "side": "minillama", "value": weight_bytes, "unit": "B", **context})
    for side in results:  # a quantized side's own bytes
        if (quantized_side(side) or side == "llama.cpp") and results[side].get("weight_bytes"):
            records.append({"figure": "weight_bytes", "side": side, "value": results[side]["weight_bytes"],
                            "unit": "B", **context})
    for side in ours:
        mine = results[side]
        for ref, r in results.items():
            if ref in ours:
                continue
            for key in ("decode_tok_s", "prompt_tok_s", "ttft_s", "load_s", "peak_mem_mb"):
                if mine.get(key) and r.get(key):
                    better = "higher" if key.endswith("tok_s") else "lower"
                    records.append({"figure": key.removesuffix("_tok_s").removesuffix("_s") + "_ratio",
                                    "side": f"{side}/{ref}", "value": mine[key] / r[key], "unit": "x",
                                    "better": better, **context})
            same = 0
            for a, b in zip(mine["tokens"], r["tokens"]):
                if a != b:
                    break
                same += 1
            records.append({"figure": "tokens_agree", "side": f"{side}/{ref}", "value": same, "unit": "tokens",
                            **context})
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """The figures as a human-readable table: one row per side, then the ratios."""
    ctx = records[0]
    lines = [f"minillama bench: {ctx['device']}, {ctx['dtype']}, {ctx['model']}, prompt {ctx['prompt_len']} tokens, "
             f"{ctx['new_tokens']} new tokens, bs=1 greedy",
             f"copy bandwidth: {ctx['value']:.1f} GB/s"]
    columns = [("load_s", "load s", "{:.2f}"), ("warmup_s", "warm-up s", "{:.1f}"),
               ("prompt_tok_s", "prompt tok/s", "{:.1f}"), ("ttft_s", "TTFT ms", "{:.1f}"),
               ("decode_tok_s", "decode tok/s", "{:.1f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
               ("bandwidth_fraction", "of copy bw", "{:.1%}")]
    sides = [r["side"] for r in records if r["figure"] == "load_s"]
    width = max([20] + [len(side) + 2 for side in sides])
    lines.append(f"{'side':<{width}}" + "".join(f"{title:>14}" for _, title, _ in columns))
    for side in sides:
        row = f"{side:<{width}}"
        for key, _, fmt in columns:
            value = next((r["value"] for r in records if r["figure"] == key and r["side"] == side), None)
            if key == "ttft_s" and value is not None:
                value *= 1000
            row += f"{'-' if value is None else fmt.format(value):>14}"
        lines.append(row)
    held = [(r["side"], r["value"]) for r in records if r["figure"] == "weight_bytes"]
    if len(held) > 1:  # quantized sides: their weights' bytes against the float model's
        lines.append("weight bytes: " + ", ".join(f"{side} {value / 1e6:.1f} MB ({value / held[0][1]:.2f}x)"
                                                  for side, value in held))
    # Ratios, one line per pair (higher is better for the tok/s ratios, lower for the others).
    pairs = [r["side"] for r in records if r["figure"] == "tokens_agree"]
    width = max([36] + [len(pair) + 1 for pair in pairs])
    names = {"decode_ratio": "decode", "prompt_ratio": "prompt", "ttft_ratio": "TTFT", "load_ratio": "load",
             "peak_mem_mb_ratio": "peak mem"}
    if pairs:
        lines.append("ratios minillama / reference (tok/s: higher is better; TTFT, load, memory: lower is better)")
    for pair in pairs:
        ratios = [f"{names[r['figure']]} {r['value']:.2f}x" for r in records
                  if r["side"] == pair and r["figure"] in names]
        agree = next(r["value"] for r in records if r["side"] == pair and r["figure"] == "tokens_agree")
        lines.append(f"{pair:<{width}} " + ", ".join(ratios) + f"; greedy tokens agree for the first {agree}")
    checked = min(CHECKED_TOKENS, ctx["new_tokens"])
    for r in records:
        if r["figure"] == "error":
            lines.append(f"{r['side']}: FAILED: " + r["value"].splitlines()[0])
        elif r["figure"] == "tokens_checked":
            lines.append(f"{r['side']}: {r['value']:.0%} of its first {checked} tokens are model.forward's own "
                         "first choice (within rounding)" + ("" if r["value"] == 1 else "  <-- CHECK THIS"))
        elif r["figure"] == "cudagraph_skips" and r["value"]:
            lines.append(f"{r['side']}: {r['value']} CUDA graph(s) skipped by torch.compile (slow decode; "
                         "TORCH_LOGS=cudagraphs says why)")
        elif r["figure"] == "cuda_graphs_recorded" and r["value"] == 0:
            lines.append(f"{r['side']}: no CUDA graph was recorded (slow decode; TORCH_LOGS=cudagraphs says why)")
    return "\n".join(lines)


