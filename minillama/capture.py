"""Record named activations from a forward pass.

    with minillama.capture(model, names=["model.layers.*.resid_post", "lm_head"]) as acts:
        model(input_ids)
    acts["model.layers.3.resid_post"]  # (B, T, C)

Names are Hugging Face module paths; a name that is a module's path holds that module's output.
Values computed inside a forward that no module returns get a suffix on the nearest module's path.
`names` takes fnmatch globs (`*` also matches dots). Per layer i, with `L = model.layers.{i}`:

| name                               | shape          | what it holds                            | TransformerLens alias            |
|------------------------------------|----------------|------------------------------------------|----------------------------------|
| model.embed_tokens                 | (B, T, C)      | token embeddings                         | hook_embed                       |
| L.resid_pre                        | (B, T, C)      | residual stream entering layer i         | blocks.{i}.hook_resid_pre        |
| L.input_layernorm                  | (B, T, C)      | normed input of attention (weight incl.) | blocks.{i}.ln1.hook_normalized   |
| L.self_attn.q_proj                 | (B, T, H*D)    | queries before RoPE                      | blocks.{i}.attn.hook_q  (B,T,H,D)   |
| L.self_attn.k_proj                 | (B, T, Hkv*D)  | keys before RoPE                         | blocks.{i}.attn.hook_k  (B,T,Hkv,D) |
| L.self_attn.v_proj                 | (B, T, Hkv*D)  | values                                   | blocks.{i}.attn.hook_v  (B,T,Hkv,D) |
| L.self_attn.q_rot                  | (B, H, T, D)   | queries after RoPE                       | blocks.{i}.attn.hook_rot_q (B,T,H,D)   |
| L.self_attn.k_rot                  | (B, Hkv, T, D) | keys after RoPE (new tokens only)        | blocks.{i}.attn.hook_rot_k (B,T,Hkv,D) |
| L.self_attn.attn_scores            | (B, H, T, S)   | scaled q.k, masked entries -inf          | blocks.{i}.attn.hook_attn_scores |
| L.self_attn.attn_weights           | (B, H, T, S)   | attention pattern, rows sum to 1         | blocks.{i}.attn.hook_pattern     |
| L.self_attn.o_proj_input           | (B, T, H*D)    | heads' outputs side by side (z)          | blocks.{i}.attn.hook_z  (B,T,H,D)   |
| L.self_attn.o_proj                 | (B, T, C)      | attention output, added to the residual  | blocks.{i}.hook_attn_out         |
| L.resid_mid                        | (B, T, C)      | residual stream after attention          | blocks.{i}.hook_resid_mid        |
| L.post_attention_layernorm         | (B, T, C)      | normed input of the MLP                  | blocks.{i}.ln2.hook_normalized   |
| L.mlp.gate_proj                    | (B, T, F)      | gate, before SiLU                        | blocks.{i}.mlp.hook_pre          |
| L.mlp.up_proj                      | (B, T, F)      | up projection                            | blocks.{i}.mlp.hook_pre_linear   |
| L.mlp.down_proj_input              | (B, T, F)      | silu(gate) * up                          | blocks.{i}.mlp.hook_post         |
| L.mlp.down_proj                    | (B, T, C)      | MLP output, added to the residual        | blocks.{i}.hook_mlp_out          |
| L.resid_post                       | (B, T, C)      | residual stream leaving layer i          | blocks.{i}.hook_resid_post       |
| model.norm                         | (B, T, C)      | final norm output (input of lm_head)     | ln_final.hook_normalized         |
| lm_head                            | (B, T, V)      | logits                                   |                                  |

F is the MLP width; S the keys attended to (T without a cache). `resid_post` of layer i is
`resid_pre` of layer i + 1; transformers' `output_hidden_states[i]` is `resid_pre` of layer i, except the
last entry, which is `model.norm`. TransformerLens aliases come in TransformerLens' layout (shapes shown
where it differs) and are views of the same values. TransformerLens' `hook_normalized` comes before the
norm's weight when it folds the weights away; here it is the norm module's output, weight included.

Patterns are matched against the names in the first column; a pattern that matches none of them is
matched against the aliases, and a pattern that matches nothing at all is an error.
Capturing `attn_scores` or `attn_weights` switches attention to the eager path (SDPA never forms the
pattern) for the duration of the capture. Only the selected names get hooks, and every hook is removed
on exit, so a model outside a capture runs exactly as before. One capture records one forward: a
second forward inside the same `with` overwrites the recorded values.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from minillama.errors import MinillamaError
from minillama.model import LlamaForCausalLM, Observable

# Per-layer names, in the order the forward computes them, with their TransformerLens alias.
LAYER_NAMES = {
    "resid_pre": "hook_resid_pre",
    "input_layernorm": "ln1.hook_normalized",
    "self_attn.q_proj": "attn.hook_q",
    "self_attn.k_proj": "attn.hook_k",
    "self_attn.v_proj": "attn.hook_v",
    "self_attn.q_rot": "attn.hook_rot_q",
    "self_attn.k_rot": "attn.hook_rot_k",
    "self_attn.attn_scores": "attn.hook_attn_scores",
    "self_attn.attn_weights": "attn.hook_pattern",
    "self_attn.o_proj_input": "attn.hook_z",
    "self_attn.o_proj": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "post_attention_layernorm": "ln2.hook_normalized",
    "mlp.gate_proj": "mlp.hook_pre",
    "mlp.up_proj": "mlp.hook_pre_linear",
    "mlp.down_proj_input": "mlp.hook_post",
    "mlp.down_proj": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
# Values that only the eager attention path computes.
EAGER_ONLY = ("self_attn.attn_scores", "self_attn.attn_weights")

Callback = Callable[[str, torch.Tensor], None]


def activation_names(model: LlamaForCausalLM, aliases: bool = False) -> list[str]:
    """Every name `capture` knows for this model, in forward order (TransformerLens aliases if `aliases`)."""
    n_layers = len(model.model.layers)
    if aliases:
        layer = [f"blocks.{i}.{tl}" for i in range(n_layers) for tl in LAYER_NAMES.values()]
        return ["hook_embed", *layer, "ln_final.hook_normalized"]
    layer = [f"model.layers.{i}.{name}" for i in range(n_layers) for name in LAYER_NAMES]
    return ["model.embed_tokens", *layer, "model.norm", "lm_head"]


def _alias_target(alias: str) -> str:
    """The HF-style name a TransformerLens alias stands for."""
    if alias == "hook_embed":
        return "model.embed_tokens"
    if alias == "ln_final.hook_normalized":
        return "model.norm"
    i, tl = re.fullmatch(r"blocks\.(\d+)\.(.+)", alias).groups()
    hf = next(name for name, a in LAYER_NAMES.items() if a == tl)
    return f"model.layers.{i}.{hf}"


def _to_transformerlens(model: LlamaForCausalLM, name: str, x: torch.Tensor) -> torch.Tensor:
    """Reshape a value to TransformerLens' layout: heads get their own axis, positions come before heads."""
    suffix = name.split(".", 3)[-1]
    c = model.config
    if suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj_input"):
        return x.unflatten(-1, (-1, c.head_dim))  # (B, T, heads * D) -> (B, T, heads, D)
    if suffix in ("self_attn.q_rot", "self_attn.k_rot"):
        return x.transpose(1, 2)  # (B, heads, T, D) -> (B, T, heads, D)
    return x


def _from_transformerlens(model: LlamaForCausalLM, name: str, x: torch.Tensor) -> torch.Tensor:
    """The inverse of `_to_transformerlens`: a value in TransformerLens' layout back to the HF-style one."""
    suffix = name.split(".", 3)[-1]
    if suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj_input"):
        return x.flatten(-2)  # (B, T, heads, D) -> (B, T, heads * D)
    if suffix in ("self_attn.q_rot", "self_attn.k_rot"):
        return x.transpose(1, 2)  # (B, T, heads, D) -> (B, heads, T, D)
    return x


@dataclass
class _Target:
    """One requested key and how to make it from the value recorded under an HF-style name."""
    key: str
    alias: bool


def select(model: LlamaForCausalLM, names: list[str] | None) -> dict[str, list[_Target]]:
    """Map each HF-style name to record onto the keys it is stored under (itself and/or its alias)."""
    hf_names = activation_names(model)
    if names is None:
        return {name: [_Target(name, False)] for name in hf_names}
    tl_names = activation_names(model, aliases=True)
    chosen: dict[str, list[_Target]] = {}
    for pattern in names:
        hits = [n for n in hf_names if fnmatch.fnmatchcase(n, pattern)]
        alias = not hits
        if alias:
            hits = [n for n in tl_names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise MinillamaError(f"no activation is named {pattern!r}; names look like "
                                 f"'model.layers.0.resid_post' or 'blocks.0.hook_resid_post' (see minillama.capture)")
        for key in hits:
            target = _alias_target(key) if alias else key
            if all(t.key != key for t in chosen.get(target, [])):
                chosen.setdefault(target, []).append(_Target(key, alias))
    order = {n: i for i, n in enumerate(hf_names)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


@contextlib.contextmanager
def capture(model: LlamaForCausalLM, names: list[str] | None = None, offload: str | torch.device | None = None,
            callback: Callback | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record activations of the forward passes run inside the `with` block.

    names:    fnmatch globs over the names in this module's table (default: all HF-style names).
    offload:  a device ("cpu") each value is copied to as soon as it is computed, so GPU memory holds
              no more than the forward itself needs.
    callback: called as `callback(key, tensor)` for every value instead of storing it, so a caller
              can write each one out as it comes (the yielded dict then stays empty).
    Yields a dict from requested name to detached tensor, filled in forward order.
    """
    chosen = select(model, names)
    acts: dict[str, torch.Tensor] = {}

    def recorder(hf_name: str) -> Tap:
        def record(x: torch.Tensor) -> None:  # None: a capture never changes the value
            x = x.detach()
            if offload is not None:
                x = x.to(offload)
            for target in chosen[hf_name]:
                value = _to_transformerlens(model, hf_name, x) if target.alias else x
                if callback is not None:
                    callback(target.key, value)
                else:
                    acts[target.key] = value
        return record

    with tap(model, {hf_name: recorder(hf_name) for hf_name in chosen}):
        yield acts


# ---- The one hook mechanism ------------------------------------------------------------------------
# A tap is a function from the value at a name to its replacement (None: keep the value). `capture` taps
# to record, `minillama.intervene` to replace. Where the value lives decides only how the tap is attached:
# a module's output (a forward hook), a module's input (a forward pre-hook), or a value inside a forward
# that no module returns (model.py's `Observable.observe`). Each returns the tap's replacement to the
# forward, and taps on one name run in the order their `with` blocks were entered.

Tap = Callable[[torch.Tensor], "torch.Tensor | None"]


def site(name: str) -> tuple[str, str, str]:
    """Where the value of an HF-style name is found: (module path, "output" | "input" | "inside", the
    name `observe` reports it under, for "inside")."""
    if name in ("model.embed_tokens", "model.norm", "lm_head"):
        return name, "output", ""
    layer, suffix = re.fullmatch(r"(model\.layers\.\d+)\.(.+)", name).groups()
    if suffix == "resid_pre":
        return layer, "input", ""
    if suffix == "resid_post":
        return layer, "output", ""
    if suffix == "resid_mid":
        return layer, "inside", "resid_mid"
    if suffix in ("self_attn.q_rot", "self_attn.k_rot", *EAGER_ONLY):
        attention, inner = suffix.split(".")
        return f"{layer}.{attention}", "inside", inner
    if suffix.endswith("_input"):  # the input of o_proj / down_proj
        return f"{layer}.{suffix.removesuffix('_input')}", "input", ""
    return name, "output", ""


def active_taps(model: LlamaForCausalLM) -> list[str]:
    """The names tapped on this model right now (by capture or intervene), in the order they were tapped."""
    return [name for taps in model.__dict__.get("_minillama_taps", []) for name in taps]


@contextlib.contextmanager
def tap(model: LlamaForCausalLM, taps: dict[str, Tap]) -> Iterator[None]:
    """Run taps[name] on the value of each HF-style name in the forwards inside the `with` block.

    Only the given names are hooked (a name nobody taps costs nothing), and everything is undone on exit,
    also on error. Tapping `attn_scores` or `attn_weights` switches attention to the eager path (SDPA
    never forms them) for the duration.
    """
    modules = dict(model.named_modules())
    handles: list[torch.utils.hooks.RemovableHandle] = []
    inside: dict[Observable, dict[str, Tap]] = {}
    for name, fn in taps.items():
        path, where, inner = site(name)
        if where == "output":
            handles.append(modules[path].register_forward_hook(lambda m, args, out, fn=fn: fn(out)))
        elif where == "input":
            handles.append(modules[path].register_forward_pre_hook(lambda m, args, fn=fn: _first_arg(args, fn)))
        else:
            inside.setdefault(modules[path], {})[inner] = fn
    outers = {module: _set_observer(module, fns) for module, fns in inside.items()}
    attention = [layer.self_attn for layer in model.model.layers]
    saved_impl = [a.attn_implementation for a in attention]
    if any(name.endswith(EAGER_ONLY) for name in taps):
        model.set_attn_implementation("eager")  # every layer: the mask is built for all or none
    registry, entry = model.__dict__.setdefault("_minillama_taps", []), list(taps)  # read by fast.CompiledEngine
    registry.append(entry)
    try:
        yield
    finally:
        registry.remove(entry)
        if not registry:
            del model.__dict__["_minillama_taps"]
        for handle in handles:
            handle.remove()
        for module, outer in outers.items():
            if outer is None:
                del module.observer  # back to the class default, None
            else:
                module.observer = outer
        for a, impl in zip(attention, saved_impl):
            a.attn_implementation = impl


def _first_arg(args: tuple, fn: Tap) -> tuple | None:
    """A pre-hook's result: the arguments with the first one replaced, or None to keep them."""
    x = fn(args[0])
    return None if x is None else (x, *args[1:])


def _set_observer(module: Observable, fns: dict[str, Tap]) -> object:
    """Give `module` an observer that runs the taps of an outer `with` first, then fns. Returns the
    observer it had before (None, or an outer block's), to put back on exit."""
    outer = module.__dict__.get("observer")

    def observer(m: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        if outer is not None:
            x = outer(m, name, x)
        fn = fns.get(name)
        y = None if fn is None else fn(x)
        return x if y is None else y

    module.observer = observer
    return outer
