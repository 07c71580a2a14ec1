"""Layer-by-layer comparison with transformers: where do minillama and the reference part ways?

    rows = minillama.diff_against_transformers(model_dir, input_ids)   # one DiffRow per compared output
    minillama.first_divergence(rows)                                   # None when every row is within tol

Both sides run the same ids in the same dtype with the same attention kernel (SDPA against SDPA, or
eager against eager: `attention=`), so the verdict compares like with like. transformers' own two kernels
differ by rounding (up to ~1e-4 relative in fp32 on a real model); that gap is reported beside each row
(`cross_rel`: minillama against transformers' *other* kernel) and never counts toward the verdict.

Outputs compared: the embeddings, each layer's output, the final norm and the logits. transformers'
`output_hidden_states` has L + 1 entries: [0] the embeddings, [i] layer i-1's output, but [L] is already
through the final norm, so the last layer's own output is caught with a hook on `model.layers[-1]`.
Needs transformers (`pip install 'minillama[reference]'`); `minillama diff` is the command-line front end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minillama.capture import capture
from minillama.checkpoint import load_model, resolve_device, resolve_dtype
from minillama.config import LlamaConfig
from minillama.errors import MinillamaError
from minillama.optional import pyplot, require

KERNELS = ("sdpa", "eager")


@dataclass
class DiffRow:
    name: str  # "embeddings", "layer 0", ..., "final norm", "logits"
    max_abs: float  # max |minillama - transformers|, same attention kernel
    rel: float  # max_abs / max |transformers|: what the verdict uses
    diverged: bool  # rel > tol
    cross_rel: float | None = None  # rel error against transformers' other kernel (the kernels' own gap)


def load_transformers_model(model_dir: Path, dtype: torch.dtype, device: torch.device, attention: str = "eager"):
    """transformers' LlamaForCausalLM with the given attention kernel ("eager" or "sdpa"): the reference.

    Its loading progress bar is switched off for the call: stderr is for minillama's own messages.
    """
    require("transformers", "comparing against transformers")
    import transformers
    from transformers.utils import logging as hf_logging

    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention,
                                                                  **{dtype_arg: dtype})
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def _our_outputs(model_dir: Path, input_ids: torch.Tensor, dtype: torch.dtype, device: torch.device,
                 attention: str, **quantize) -> list[torch.Tensor]:
    """minillama's embeddings, layer outputs, final norm and logits (on the CPU), in forward order."""
    model = load_model(model_dir, device=device, dtype=dtype, **quantize)
    model.set_attn_implementation(attention)
    names = ["model.embed_tokens", "model.layers.*.resid_post", "model.norm", "lm_head"]
    with torch.no_grad(), capture(model, names, offload="cpu") as acts:
        model(input_ids.to(device))
    return list(acts.values())


def _reference_outputs(ref, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The same outputs from transformers' model, in the same order."""
    last_layer = {}
    hook = ref.model.layers[-1].register_forward_hook(lambda m, args, out: last_layer.update(out=out))
    try:
        with torch.no_grad():
            out = ref(input_ids.to(ref.device), output_hidden_states=True)
    finally:
        hook.remove()
    last = last_layer["out"][0] if isinstance(last_layer["out"], tuple) else last_layer["out"]
    hidden = [h.cpu() for h in out.hidden_states]  # L + 1: embeddings, layers 0..L-2, the final norm's output
    return [hidden[0], *hidden[1:-1], last.cpu(), hidden[-1], out.logits.cpu()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that divided by max |b|), in fp32."""
    max_abs = (a.float() - b.float()).abs().max().item()
    return max_abs, max_abs / max(b.float().abs().max().item(), 1e-30)


def diff_against_transformers(model_dir: str | Path, input_ids: torch.Tensor, *,
                              reference_dir: str | Path | None = None, tol: float = 1e-4,
                              dtype: str | torch.dtype = "float32", device: str | None = "cpu",
                              attention: str = "sdpa", cross_kernel: bool = True, quantize: str | None = None,
                              group_size: int | None = None) -> list[DiffRow]:
    """Compare minillama (loaded from model_dir) with transformers (from reference_dir, default the same).

    input_ids: (1, T). Both sides use the `attention` kernel ("sdpa", minillama's default, or "eager").
    Returns one row per compared output, in forward order; a row diverges when its max abs error exceeds
    `tol` times the largest reference value. With `cross_kernel`, each row also carries the relative error
    against transformers' other kernel. A second directory lets the two sides differ on purpose, e.g. a
    converted checkpoint against its original. quantize, group_size: as `load_model`'s (--quantize int8 shows
    where quantized weights move each layer).
    """
    if attention not in KERNELS:
        raise MinillamaError(f"attention must be one of {', '.join(KERNELS)}, got {attention!r}")
    require("transformers", "comparing against transformers")
    model_dir = Path(model_dir)
    reference_dir = Path(reference_dir) if reference_dir is not None else model_dir
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, LlamaConfig.from_file(model_dir), device)

    ours = _our_outputs(model_dir, input_ids, dtype, device, attention, quantize=quantize, group_size=group_size)
    ref = load_transformers_model(reference_dir, dtype, device, attention)
    same = _reference_outputs(ref, input_ids)
    if len(same) != len(ours):
        raise MinillamaError(f"{reference_dir} has {len(same) - 3} layers but {model_dir} has {len(ours) - 3}")
    other = None
    if cross_kernel:
        ref.set_attn_implementation(KERNELS[1 - KERNELS.index(attention)])
        other = _reference_outputs(ref, input_ids)
    del ref

    names = ["embeddings", *(f"layer {i}" for i in range(len(ours) - 3)), "final norm", "logits"]
    rows = []
    for i, (name, a, b) in enumerate(zip(names, ours, same)):
        max_abs, rel = _rel(a, b)
        rows.append(DiffRow(name, max_abs, rel, rel > tol, None if other is None else _rel(a, other[i])[1]))
    return rows


def first_divergence(rows: list[DiffRow]) -> DiffRow | None:
    return next((row for row in rows if row.diverged), None)


def plot_diff(rows: list[DiffRow], tol: float, path: str | Path, title: str = "minillama vs transformers") -> Path:
    """Relative error against layer with the tolerance line (the verdict's measure), max abs error below.

    Log scale; zeros are drawn at 1e-12. Returns the path written.
    """
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6, 0.35 * len(rows)), 6))
    x = range(len(rows))
    top.semilogy(x, [max(r.rel, 1e-12) for r in rows], "s-", label="relative error (same kernel)")
    if all(r.cross_rel is not None for r in rows):
        top.semilogy(x, [max(r.cross_rel, 1e-12) for r in rows], ".:", color="gray",
                     label="against transformers' other kernel (not judged)")
    top.axhline(tol, color="red", linestyle="--", label=f"tol {tol:g}: above it a row diverges")
    top.set_ylabel("max |error| / max |reference|\n(zeros drawn at 1e-12)")
    top.set_title(title)
    top.legend(fontsize=8, framealpha=0.6)
    bottom.semilogy(x, [max(r.max_abs, 1e-12) for r in rows], "o-", label="max abs error")
    bottom.set_ylabel("max |error|\n(zeros drawn at 1e-12)")
    bottom.set_xticks(list(x), [r.name for r in rows], rotation=90)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
