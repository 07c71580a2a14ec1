"""The logit lens: what each layer would predict if it were the last.

    lens = minillama.logit_lens(model, input_ids, top=5)   # top ids and probabilities per layer and position
    print(minillama.format_lens(lens, input_ids[0].tolist(), tokenizer.piece_text, positions=[-1]))

Each layer's residual stream is read out through the final norm and lm_head (the norm matters: the raw
stream's scale grows with depth): what the model would predict after the embeddings alone, after layer 0,
..., after the last layer, which is the model's real prediction. `minillama lens` is the command-line front end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minillama.capture import capture
from minillama.errors import MinillamaError
from minillama.model import LlamaForCausalLM
from minillama.model_info import visible
from minillama.optional import pyplot


@dataclass
class Lens:
    layers: list[str]  # "embeddings", "layer 0", ..., "layer L-1"
    top_ids: torch.Tensor  # (L + 1, T, k): the k likeliest next tokens at each position
    top_probs: torch.Tensor  # (L + 1, T, k)


def logit_lens(model: LlamaForCausalLM, input_ids: torch.Tensor, top: int = 5) -> Lens:
    """The top-`top` next tokens each residual stream predicts at each position of input_ids (1, T)."""
    if not 1 <= top <= model.config.vocab_size:
        raise MinillamaError(f"top must be between 1 and the vocabulary size {model.config.vocab_size}, got {top}")
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


def format_lens(lens: Lens, input_ids: list[int], piece: Callable[[int], str],
                positions: list[int] | None = None) -> str:
    """One block per position (default: all; negative counts from the end): the token there, then per
    layer its top predictions with probabilities."""
    T = len(input_ids)
    bad = [p for p in positions or [] if not -T <= p < T]
    if bad:
        raise MinillamaError(f"position {bad[0]} is outside the prompt's {T} tokens (0..{T - 1}, or -1 for the last)")
    width = max(len(name) for name in lens.layers)
    out = []
    for t in range(T) if positions is None else [p % T for p in positions]:
        token = input_ids[t]
        out.append(f"position {t}: '{visible(piece(token))}' ({token}) -> next token")
        for layer, ids, probs in zip(lens.layers, lens.top_ids[:, t], lens.top_probs[:, t]):
            # visible() already escaped what cannot be shown: quoted, not repr()'d again ('\\xa0' for a no-break space)
            preds = "  ".join(f"'{visible(piece(int(i)))}' {p:.2f}" for i, p in zip(ids, probs))
            out.append(f"  {layer:<{width}}  {preds}")
    return "\n".join(out)


def plot_lens(lens: Lens, input_ids: list[int], piece: Callable[[int], str], path: str | Path) -> Path:
    """Heatmap of every position: layers down, positions across, colour = top-1 probability, cell text =
    top-1 token. Returns the path written."""
    plt = pyplot()
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
    return Path(path)
