"""`minillama lens MODEL --prompt TEXT`: the logit lens.

Each layer's residual stream is read out as if it were the last: through the final norm and lm_head
(the norm matters: the raw stream's scale grows with depth). What the model would predict after the
embeddings alone, after layer 0, ..., after the last layer, which is the model's real prediction.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minillama.capture import capture
from minillama.checkpoint import load_model
from minillama.cli.common import add_model_args, add_prompt_args, prompt_input_ids, resolve_model_arg
from minillama.errors import MinillamaError
from minillama.inspect import visible
from minillama.model import LlamaForCausalLM


@dataclass
class Lens:
    layers: list[str]  # "embeddings", "layer 0", ..., "layer L-1"
    top_ids: torch.Tensor  # (L + 1, T, k): the k likeliest next tokens at each position
    top_probs: torch.Tensor  # (L + 1, T, k)


def logit_lens(model: LlamaForCausalLM, input_ids: torch.Tensor, top: int = 5) -> Lens:
    """The top-`top` next tokens each residual stream predicts at each position of input_ids (1, T)."""
    names = ["model.embed_tokens", "model.layers.*.resid_post"]
    with torch.no_grad(), capture(model, names) as acts:
        model(input_ids)
    ids, probs = [], []
    with torch.no_grad():
        for stream in acts.values():  # one layer at a time: (T, V) logits, never (L, T, V)
            logits = model.lm_head(model.model.norm(stream[0]))  # (T, V)
            p, i = logits.float().softmax(-1).topk(top, dim=-1)  # (T, k)
            ids.append(i.cpu())
            probs.append(p.cpu())
    layers = ["embeddings"] + [f"layer {i}" for i in range(len(acts) - 1)]
    return Lens(layers, torch.stack(ids), torch.stack(probs))


def format_lens(lens: Lens, input_ids: list[int], piece: Callable[[int], str]) -> str:
    """One block per position: the token there, then per layer its top predictions with probabilities."""
    width = max(len(name) for name in lens.layers)
    out = []
    for t, token in enumerate(input_ids):
        out.append(f"position {t}: {visible(piece(token))!r} ({token}) -> next token")
        for layer, ids, probs in zip(lens.layers, lens.top_ids[:, t], lens.top_probs[:, t]):
            preds = "  ".join(f"{visible(piece(int(i)))!r} {p:.2f}" for i, p in zip(ids, probs))
            out.append(f"  {layer:<{width}}  {preds}")
    return "\n".join(out)


def plot_lens(lens: Lens, input_ids: list[int], piece: Callable[[int], str], path: Path) -> None:
    """Heatmap: layers down, positions across, colour = top-1 probability, cell text = top-1 token."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinillamaError("--plot needs matplotlib: pip install 'minillama[plot]'") from None
    n_layers, T = lens.top_probs.shape[:2]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * T + 2), max(3, 0.35 * n_layers + 1.5)))
    image = ax.imshow(lens.top_probs[:, :, 0].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for layer in range(n_layers):
        for t in range(T):
            text = visible(piece(int(lens.top_ids[layer, t, 0])))[:8]
            ax.text(t, layer, text, ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(T), [visible(piece(i))[:10] for i in input_ids], rotation=90)
    ax.set_yticks(range(n_layers), lens.layers)
    ax.set_xlabel("input token (the prediction is for the one after it)")
    fig.colorbar(image, ax=ax, label="top-1 probability")
    ax.set_title("logit lens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lens", help="logit lens: what each layer would predict",
                       description="Apply the final norm and lm_head to every layer's residual stream and show "
                                   "the top next tokens at each position.")
    add_model_args(p, optional_model=False, device="cpu", dtype="float32")
    add_prompt_args(p)
    p.add_argument("--top", type=int, default=5, help="predictions shown per layer and position (default 5)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw a heatmap of the top-1 predictions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillama.tokenizer import load_tokenizer

    model_dir = resolve_model_arg(args)
    model = load_model(model_dir, device=args.device, dtype=args.dtype)
    if not 1 <= args.top <= model.config.vocab_size:
        raise MinillamaError(f"--top must be between 1 and the vocabulary size {model.config.vocab_size}")
    _, ids = prompt_input_ids(model_dir, args.prompt, args.raw, model.config.vocab_size)
    piece = load_tokenizer(model_dir).piece_text
    lens = logit_lens(model, ids.to(model.device), top=args.top)
    print(format_lens(lens, ids[0].tolist(), piece))
    if args.plot:
        plot_lens(lens, ids[0].tolist(), piece, args.plot)
    return 0
