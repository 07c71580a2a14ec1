"""`minillama diff MODEL --prompt TEXT`: find the first layer where minillama and transformers part ways.

Both run the same ids in the same dtype; their residual streams are compared after the embeddings,
after each layer, after the final norm, and at the logits. transformers' `output_hidden_states` has
L + 1 entries: [0] the embeddings, [i] layer i-1's output, but [L] is already through the final norm,
so the last layer's own output is caught with a hook on its `model.layers[-1]`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minillama.capture import capture
from minillama.checkpoint import load_model, resolve_device, resolve_dtype
from minillama.cli.common import add_model_args, add_prompt_args, prompt_input_ids, resolve_model_arg
from minillama.config import LlamaConfig
from minillama.errors import MinillamaError


@dataclass
class DiffRow:
    name: str  # "embeddings", "layer 0", ..., "final norm", "logits"
    max_abs: float  # max |minillama - transformers|
    rel: float  # max_abs / max |transformers|
    diverged: bool  # rel > tol


def load_transformers_model(model_dir: Path, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM with the eager attention path: the reference."""
    try:
        import transformers
    except ImportError:
        raise MinillamaError("minillama diff compares against transformers, which is not installed: "
                             "pip install 'minillama[reference]'") from None
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                              **{dtype_arg: dtype})
    return model.to(device).eval()


def diff_against_transformers(model_dir: str | Path, input_ids: torch.Tensor, *,
                              reference_dir: str | Path | None = None, tol: float = 1e-4,
                              dtype: str | torch.dtype = "float32", device: str | None = "cpu") -> list[DiffRow]:
    """Compare minillama (loaded from model_dir) with transformers (from reference_dir, default the same).

    input_ids: (1, T). Returns one row per compared output, in forward order; a row diverges when its
    max abs error exceeds `tol` times the largest reference value. A second directory lets the two
    sides differ on purpose, e.g. a converted checkpoint against its original.
    """
    model_dir = Path(model_dir)
    reference_dir = Path(reference_dir) if reference_dir is not None else model_dir
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, LlamaConfig.from_file(model_dir), device)

    ours = load_model(model_dir, device=device, dtype=dtype)
    names = ["model.embed_tokens", "model.layers.*.resid_post", "model.norm", "lm_head"]
    with torch.no_grad(), capture(ours, names, offload="cpu") as acts:
        ours(input_ids.to(device))
    del ours

    ref = load_transformers_model(reference_dir, dtype, device)
    last_layer = {}
    hook = ref.model.layers[-1].register_forward_hook(lambda m, args, out: last_layer.update(out=out))
    try:
        with torch.no_grad():
            out = ref(input_ids.to(device), output_hidden_states=True)
    finally:
        hook.remove()
    hidden = [h.cpu() for h in out.hidden_states]
    L = len(hidden) - 1
    if L != len(acts) - 3:
        raise MinillamaError(f"{reference_dir} has {L} layers but {model_dir} has {len(acts) - 3}")
    last = last_layer["out"][0] if isinstance(last_layer["out"], tuple) else last_layer["out"]

    pairs = [("embeddings", acts["model.embed_tokens"], hidden[0])]
    pairs += [(f"layer {i}", acts[f"model.layers.{i}.resid_post"], hidden[i + 1] if i < L - 1 else last.cpu())
              for i in range(L)]
    pairs += [("final norm", acts["model.norm"], hidden[L]), ("logits", acts["lm_head"], out.logits.cpu())]
    rows = []
    for name, a, b in pairs:
        max_abs = (a.float() - b.float()).abs().max().item()
        rel = max_abs / max(b.float().abs().max().item(), 1e-30)
        rows.append(DiffRow(name, max_abs, rel, rel > tol))
    return rows


def first_divergence(rows: list[DiffRow]) -> DiffRow | None:
    return next((row for row in rows if row.diverged), None)


def plot_rows(rows: list[DiffRow], tol: float, path: Path) -> None:
    """Max abs and relative error against layer, log scale, with the tolerance drawn in."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinillamaError("--plot needs matplotlib: pip install 'minillama[plot]'") from None
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
    x = range(len(rows))
    ax.semilogy(x, [max(r.max_abs, 1e-12) for r in rows], "o-", label="max abs error")
    ax.semilogy(x, [max(r.rel, 1e-12) for r in rows], "s-", label="relative error")
    ax.axhline(tol, color="red", linestyle="--", label=f"tol {tol:g}")
    ax.set_xticks(list(x), [r.name for r in rows], rotation=90)
    ax.set_ylabel("error (zeros drawn at 1e-12)")
    ax.set_title("minillama vs transformers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="compare every layer's output with transformers",
                       description="Run the prompt through minillama and transformers (the reference) and show "
                                   "the error after each layer. Exits 1 when some layer is past --tol.")
    add_model_args(p, optional_model=False, device="cpu", dtype="float32")
    add_prompt_args(p)
    p.add_argument("--tol", type=float, default=1e-4,
                   help="a layer diverges when max|minillama - transformers| > tol * max|transformers| (default 1e-4)")
    p.add_argument("--reference", type=Path, metavar="DIR",
                   help="load transformers from this directory instead of MODEL (e.g. the original of a conversion)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw error against layer")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model_dir = resolve_model_arg(args)
    reference_dir = args.reference or model_dir
    config = LlamaConfig.from_file(model_dir)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, config, device)
    _, ids = prompt_input_ids(model_dir, args.prompt, args.raw, config.vocab_size)
    rows = diff_against_transformers(model_dir, ids, reference_dir=reference_dir, tol=args.tol, dtype=dtype,
                                     device=device)
    bad = first_divergence(rows)
    if args.json:
        print(json.dumps({"tol": args.tol, "rows": [asdict(r) for r in rows],
                          "first_divergence": bad.name if bad else None}, indent=1))
    else:
        print(f"minillama {model_dir} vs transformers {reference_dir}: {ids.shape[1]} tokens, "
              f"{str(dtype).removeprefix('torch.')}, {device}")
        width = max(len(r.name) for r in rows)
        print(f"{'output':<{width}}  {'max abs err':>11}  {'rel err':>9}")
        for r in rows:
            print(f"{r.name:<{width}}  {r.max_abs:>11.3e}  {r.rel:>9.3e}" + ("  <- past tol" if r.diverged else ""))
        if bad:
            print(f"first divergence: {bad.name} (rel err {bad.rel:.3e} > tol {args.tol:g})")
        else:
            print(f"no divergence: every output within tol {args.tol:g}")
    if args.plot:
        plot_rows(rows, args.tol, args.plot)
    return 1 if bad else 0
