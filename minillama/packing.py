"""Packed weights for the CPU: `nn.Linear` swapped for `PackedLinear`, whose weight lives in oneDNN's layout.

A bs=1 decode step multiplies one vector by every weight matrix, so its speed is the speed of reading the
weights. On this project's 2-core test machine MKL's `x @ W.T` streamed SmolLM2-135M's layers at ~20 GB/s;
oneDNN's linear on a weight reordered once into its own blocked layout streamed them at ~30 GB/s, and the
49152 x 576 head went from 7.3 ms to 2.7 ms (docs/benchmarks.md).

`pack_linears(model)` swaps every Linear of the decoder and the head in place. The module names stay
(`model.layers.0.self_attn.q_proj`), `state_dict()` gives the weights back in their usual layout under the
usual keys, and the packed copy is the only copy: the model holds each matrix once. Every forward uses it,
prefill and decode alike. The price is float rounding: oneDNN sums in another order than MKL (~1e-6
relative), so the exact-parity tools (diff, dump, the parity tests) run on unpacked models.

Linears that read the same input (q/k/v, gate/up: `FUSED_SIBLINGS`) are then stacked into one packed matrix
(`pack_linears`, `FusedLinear`): one oneDNN call instead of three, which made SmolLM2's decode step ~7% faster
on the test machine (docs/benchmarks.md). The modules keep their names and state_dict keys all the same.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing: a CPU float32 model, a torch built with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 (out, in) matrix reordered into oneDNN's blocked layout (an opaque mkldnn tensor, (out, in))."""
    if weight.is_mkldnn:
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def incoming_weight(module: nn.Module, state_dict: dict, prefix: str, missing_keys: list,
                    error_msgs: list) -> torch.Tensor | None:
    """The weight a state_dict brings for `module`, if present and of its (out, in) shape; else None, with the
    problem recorded where `load_state_dict` reports it."""
    if prefix + "weight" not in state_dict:
        missing_keys.append(prefix + "weight")
        return None
    weight = state_dict[prefix + "weight"]
    if tuple(weight.shape) != (module.out_features, module.in_features):
        error_msgs.append(f"size mismatch for {prefix}weight: {tuple(weight.shape)} vs "
                          f"{(module.out_features, module.in_features)}")
        return None
    return weight


class PackedLinear(nn.Module):
    """y = x W^T + b with W (out, in) held in oneDNN's blocked layout: a drop-in for an `nn.Linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(pack_weight(weight), requires_grad=False)  # opaque (out, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """The weight in the usual (out, in) layout: a fresh copy."""
        return self.weight.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Checkpoints hold plain tensors: unpack on the way out.
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = incoming_weight(self, state_dict, prefix, missing_keys, error_msgs)
        if weight is None:
            return
        with torch.no_grad():
            self.weight = nn.Parameter(pack_weight(weight.float()), requires_grad=False)
            if self.bias is not None:
                self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Stack:
    """What the members of one fused group share: each member's number of outputs, and the outputs of the
    last input until every member has taken its own."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.input: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.pending: set[int] = set()


class FusedLinear(nn.Module):
    """One of several Linears that read the same input (q_proj, k_proj, v_proj), their weights stacked in one
    oneDNN-packed matrix. The first member called on an input computes every member's output in one call;
    each member returns its own slice, and the group then lets go of them. A member called on another input
    (or twice on one) computes afresh, so it always returns x W^T + b: only the cost changes.

    The first member (the lead) holds the stacked matrix as its `weight` (sum of outputs, in); the others point
    to it without registering it, so `parameters()` counts it once. `state_dict()` gives each member's own rows
    under its own name, as the separate Linears had them.
    """

    def __init__(self, stack: Stack, index: int, in_features: int, lead: FusedLinear | None = None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.stack, self.index = stack, index
        self.in_features, self.out_features = in_features, stack.sizes[index]
        start = sum(stack.sizes[:index])
        self.rows = slice(start, start + self.out_features)
        if lead is None:
            self.weight = nn.Parameter(pack_weight(weight), requires_grad=False)  # opaque (sum of outs, in)
            self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
            lead = self
        object.__setattr__(self, "lead", lead)  # a plain reference: not a submodule, not a second parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stack, lead = self.stack, self.lead
        if x is not stack.input or self.index not in stack.pending:  # a new input: every member's output at once
            y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), lead.weight, lead.bias, "none", [], "")
            stack.input, stack.outputs, stack.pending = x, y.split(stack.sizes, dim=-1), set(range(len(stack.sizes)))
        stack.pending.discard(self.index)
        out = stack.outputs[self.index]
        if not stack.pending:  # every member has its slice: hold nothing between forwards
            stack.input, stack.outputs = None, ()
        return out

    def has_bias(self) -> bool:
        return self.lead.bias is not None

    def dense_weight(self) -> torch.Tensor:
        """This member's rows of the stacked matrix, in the usual (out, in) layout: a fresh copy."""
        return self.lead.weight.to_dense()[self.rows].clone()

    def dense_bias(self) -> torch.Tensor | None:
        return None if self.lead.bias is None else self.lead.bias[self.rows].detach().clone()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.has_bias():
            destination[prefix + "bias"] = self.dense_bias()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = incoming_weight(self, state_dict, prefix, missing_keys, error_msgs)
        if weight is None:
            return
        lead = self.lead
        with torch.no_grad():  # this member's rows replaced, the stack packed again
            dense = lead.weight.to_dense()
            dense[self.rows] = weight.float()
            lead.weight = nn.Parameter(pack_weight(dense), requires_grad=False)
            if lead.bias is not None:
                lead.bias[self.rows] = state_dict[prefix + "bias"]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias()}, "
                f"rows {self.rows.start}:{self.rows.stop} of one packed matrix")


# Linears of one module that read the same input: stacked by `pack_linears` into one packed matrix each.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fusable(members: list) -> bool:
    """Plain Linears with the same input size, all with a bias or none, and no hooks."""
    return all(type(m) is nn.Linear for m in members) and \
        len({(m.in_features, m.bias is None) for m in members}) == 1 and \
        not any(m._forward_hooks or m._forward_pre_hooks for m in members)


def fused_groups(model: nn.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{member weight name: (parent module name, group)} for every group `pack_linears` will stack."""
    groups = {}
    for prefix, module in model.named_modules():
        for group in FUSED_SIBLINGS:
            if _fusable([getattr(module, name, None) for name in group]):
                groups |= {f"{prefix}.{name}.weight".lstrip("."): (prefix, group) for name in group}
    return groups


class Stacker:
    """Stacks each fused group's weights as a loader reads them, packing a stack as soon as its group is complete:
    no member is packed alone (to be unpacked again), and only one group's plain rows are held at a time, so
    loading a packed model never holds more than the packed model and one group."""

    def __init__(self, model: nn.Module):
        self.groups = fused_groups(model)
        self.rows: dict[tuple, dict[str, torch.Tensor]] = {}  # an incomplete group's members so far
        self.stacks: dict[tuple, torch.Tensor] = {}  # (parent name, group) -> the packed stack

    def add(self, name: str, weight: torch.Tensor) -> bool:
        """Take a member's weight (True), or leave a tensor that is not one (False)."""
        key = self.groups.get(name)
        if key is None:
            return False
        rows = self.rows.setdefault(key, {})
        rows[name] = weight.clone()  # `weight` may be a view of a file about to be closed
        if len(rows) == len(key[1]):
            del self.rows[key]
            prefix = f"{key[0]}." if key[0] else ""
            self.stacks[key] = pack_weight(torch.cat([rows.pop(prefix + f"{name}.weight") for name in key[1]]))
        return True

    def stacked(self) -> set[str]:
        """The member weights now in a packed stack (a group missing a member has none)."""
        return {name for name, key in self.groups.items() if key in self.stacks}


def _check_packable(module: nn.Module, names, prefix: str) -> None:
    for name in names:
        child = getattr(module, name, None)
        weight = child.weight if type(child) is nn.Linear else None
        if weight is not None and not (weight.is_mkldnn or can_pack(weight.device, weight.dtype)):
            raise ValueError(f"{prefix}.{name}: packing needs a CPU float32 weight with oneDNN, "
                             f"got {weight.dtype} on {weight.device}")


def _fuse(module: nn.Module, names: tuple[str, ...], packed: torch.Tensor | None = None) -> None:
    """module.q_proj, .k_proj, .v_proj (nn.Linear) -> FusedLinears over one stacked packed matrix (`packed`, as
    a `Stacker` made it while loading, or stacked here from the members' weights)."""
    members = [getattr(module, name) for name in names]
    sizes, in_features = [m.out_features for m in members], members[0].in_features
    if packed is None:
        packed = torch.cat([m.weight.to_dense() if m.weight.is_mkldnn else m.weight for m in members])
    bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
    stack = Stack(sizes)
    lead = FusedLinear(stack, 0, in_features, weight=packed, bias=bias)
    setattr(module, names[0], lead)
    for index, name in enumerate(names[1:], start=1):
        setattr(module, name, FusedLinear(stack, index, in_features, lead=lead))


@torch.no_grad()
def pack_linears(model: nn.Module, stacks: dict[tuple, torch.Tensor] | None = None) -> int:
    """Swap every `nn.Linear` under `model` for a `PackedLinear` holding the same weight (CPU, float32); the
    siblings in FUSED_SIBLINGS (which read the same input) become `FusedLinear`s over one matrix.

    A tied head (lm_head sharing the embedding matrix) gets a packed copy of its own, since the embedding
    lookup needs the plain rows: that one matrix is then held twice. Returns how many Linears were swapped.
    Modules are swapped one parent at a time, so a replaced weight is freed before the next is packed.
    stacks: the groups' packed stacks, made while loading (`Stacker.stacks`; their members hold no weight yet).
    """
    swapped = 0
    parents = [name for name, m in model.named_modules() if any(type(c) is nn.Linear for c in m.children())]
    for name in parents:  # names, not modules: holding the old Linears would hold their weights
        module = model.get_submodule(name)
        for group in FUSED_SIBLINGS:
            packed = (stacks or {}).pop((name, group), None)
            if packed is None:
                _check_packable(module, group, name)
            if _fusable([getattr(module, child_name, None) for child_name in group]):
                _fuse(module, group, packed)
                swapped += len(group)
        linears = [n for n, c in module.named_children() if type(c) is nn.Linear]
        _check_packable(module, linears, name)
        for child_name in linears:
            setattr(module, child_name, PackedLinear.from_linear(getattr(module, child_name)))
            swapped += 1
    return swapped


@torch.no_grad()
def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears`: every `PackedLinear` becomes an `nn.Linear` again (the tied head is re-tied)."""
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (PackedLinear, FusedLinear)):
                bias = child.dense_bias() if isinstance(child, FusedLinear) else \
                    None if child.bias is None else child.bias.detach().clone()
                linear = nn.Linear(child.in_features, child.out_features, bias=bias is not None, device="meta")
                linear.weight = nn.Parameter(child.dense_weight(), requires_grad=False)
                if bias is not None:
                    linear.bias = nn.Parameter(bias, requires_grad=False)
                setattr(module, child_name, linear)
                swapped += 1
    config = getattr(model, "config", None)
    if swapped and config is not None and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return swapped


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, (PackedLinear, FusedLinear)) for m in model.modules())
