"""Change activations during a forward: ablation, patching, steering, and the activation-patching grid.

    from minillama.intervene import patch, zero
    with minillama.intervene(model, {"model.layers.1.mlp.down_proj": zero(),            # an MLP's output
                                     "blocks.0.attn.hook_z": zero(head=2),             # one head
                                     "model.layers.3.resid_pre": patch(clean, position=4)}):   # from another run
        logits = model(corrupted_ids)

Names are `minillama.capture`'s (HF-style names and TransformerLens aliases, fnmatch globs), tapped by the
same mechanism (capture.tap). An edit sees and returns the value in the layout of the name it was given
under (an alias: TransformerLens' layout, e.g. hook_z is (B, T, H, D)). An edit is one of:
- a tensor: replaces the value, broadcast over batch and positions (a (C,) vector on a residual stream
  replaces it at every token);
- a function `fn(x) -> y`: y (same shape) replaces x; None keeps x;
- a helper: `zero`, `mean`, `patch` or `add`, each limited by `head=` (values with heads: q/k/v, q_rot/k_rot,
  o_proj_input or hook_z, attention scores and pattern; k and v have the Hkv key/value heads) and by
  `position=` (an int, a list or a slice of the forward's positions).
Positions index the tokens of one forward; in a generation's decode steps T is 1. A patched prefill writes
the patched keys and values into the KV cache, so the decode steps after it see them. Steering (`steer`,
`add`) adds a vector on every forward, prefill and decode steps alike.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minillama.capture import LAYER_NAMES, _from_transformerlens, _to_transformerlens, capture, select, tap
from minillama.errors import MinillamaError
from minillama.files import one_line, read_bytes
from minillama.model import LlamaForCausalLM

Position = int | slice | Sequence[int]
VECTOR_FILE_LIMIT = 64 * 1024**2  # a steering vector file (one hidden-size vector: 2-32 KB)


@dataclass(frozen=True)
class Layout:
    """Where positions and heads are in a value (heads: in its (..., heads, head_dim) view if head_dim)."""
    position_axis: int
    head_axis: int | None = None
    head_dim: int | None = None  # heads side by side in the last axis: viewed as (..., heads, head_dim)


def layout(model: LlamaForCausalLM, hf_name: str, alias: bool = False) -> Layout:
    """The layout of an HF-style name's value, or of its TransformerLens alias' value if `alias`."""
    suffix = hf_name.split(".", 3)[-1]
    if suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj_input"):
        return Layout(1, 2) if alias else Layout(1, 2, model.config.head_dim)  # (B, T, heads[*D], D)
    if suffix in ("self_attn.q_rot", "self_attn.k_rot"):
        return Layout(1, 2) if alias else Layout(2, 1)  # (B, T, heads, D) or (B, heads, T, D)
    if suffix in ("self_attn.attn_scores", "self_attn.attn_weights"):
        return Layout(2, 1)  # (B, H, T, S) in both: positions are the queries
    return Layout(1)  # (B, T, ...)


def _view(x: torch.Tensor, lay: Layout) -> torch.Tensor:
    return x.unflatten(-1, (-1, lay.head_dim)) if lay.head_dim else x


@dataclass
class Edit:
    """A helper's edit: new values for the part of a value that `head` and `position` select."""
    kind: str  # "zero", "mean", "patch" or "add"
    source: torch.Tensor | None = None  # mean: the reference; patch: the values; add: the vector
    scale: float = 1.0
    head: int | None = None
    position: Position | None = None

    def __call__(self, x: torch.Tensor, lay: Layout, name: str) -> torch.Tensor:
        y = x.clone()
        view = _view(y, lay)  # writes into view write into y
        index: list = [slice(None)] * view.ndim
        if self.position is not None:
            index[lay.position_axis] = self.position if isinstance(self.position, (int, slice)) \
                else torch.as_tensor(self.position, device=x.device)
        if self.head is not None:
            if lay.head_axis is None:
                raise MinillamaError(f"head= needs a value with heads (q/k/v, q_rot/k_rot, o_proj_input or hook_z, "
                                     f"attention scores or pattern); {name} has none")
            index[lay.head_axis] = self.head
        source = None if self.source is None else self.source.to(x.device, x.dtype)
        try:
            view[tuple(index)] = self._values(view, tuple(index), source, lay)
        except (RuntimeError, IndexError) as e:
            shape = "" if source is None else f" (source {tuple(source.shape)})"
            raise MinillamaError(f"cannot apply {self.kind} to {name} of shape {tuple(x.shape)}{shape}: "
                                 f"{str(e).splitlines()[0]}") from None
        return y

    def _values(self, view: torch.Tensor, index: tuple, source: torch.Tensor | None, lay: Layout):
        if self.kind == "zero":
            return 0.0
        if self.kind == "add":
            return view[index] + self.scale * source
        reference = view if source is None else _view(source, lay)
        if self.kind == "mean":  # over batch and positions: what the part holds on average
            reference = reference.mean(dim=(0, lay.position_axis), keepdim=True)
        return reference.expand_as(view)[index]


def zero(*, head: int | None = None, position: Position | None = None) -> Edit:
    """Zero ablation: the selected part becomes 0."""
    return Edit("zero", head=head, position=position)


def mean(reference: torch.Tensor | None = None, *, head: int | None = None,
         position: Position | None = None) -> Edit:
    """Mean ablation: the selected part becomes its mean over batch and positions, of `reference` (the same
    name captured on other inputs) or, by default, of the value itself."""
    return Edit("mean", reference, head=head, position=position)


def patch(source: torch.Tensor, *, head: int | None = None, position: Position | None = None) -> Edit:
    """The selected part is taken from `source`: the same name captured on another run (batch 1 broadcasts)."""
    return Edit("patch", source, head=head, position=position)


def add(vector: torch.Tensor, scale: float = 1.0, *, head: int | None = None,
        position: Position | None = None) -> Edit:
    """Steering: scale * vector is added to the selected part (a (C,) vector: to every token's stream)."""
    return Edit("add", vector, scale, head=head, position=position)


@contextlib.contextmanager
def intervene(model: LlamaForCausalLM,
              edits: dict[str, Edit | torch.Tensor | Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Replace activations in the forwards run inside the `with` block (see this module's docstring).

    Every name is checked before anything is hooked: a pattern that matches nothing is an error naming it,
    and so is an activation that two patterns match. Everything is undone on exit, also on error.
    """
    taps, owner = {}, {}
    for pattern, edit in edits.items():
        if not isinstance(edit, (Edit, torch.Tensor)) and not callable(edit):
            raise MinillamaError(f"the edit for {pattern!r} is a {type(edit).__name__}; give a tensor, a function "
                                 "or one of minillama.zero/mean/patch/add")
        for hf_name, (target, *_) in select(model, [pattern]).items():
            if hf_name in owner:
                raise MinillamaError(f"{target.key} is matched by both {owner[hf_name]!r} and {pattern!r}; "
                                     "give each activation one edit")
            owner[hf_name] = pattern
            taps[hf_name] = _edit_tap(model, hf_name, target.key, target.alias, edit)
    with tap(model, taps):
        yield


def _edit_tap(model: LlamaForCausalLM, hf_name: str, key: str, alias: bool, edit) -> Callable:
    """The tap that applies `edit` to hf_name's value, seen in the layout of `key` (itself or an alias)."""
    lay = layout(model, hf_name, alias)

    def apply(x: torch.Tensor) -> torch.Tensor | None:
        seen = _to_transformerlens(model, hf_name, x) if alias else x
        if isinstance(edit, Edit):
            y = edit(seen, lay, key)
        elif isinstance(edit, torch.Tensor):
            try:
                y = edit.to(x.device, x.dtype).expand(seen.shape).contiguous()
            except RuntimeError:
                raise MinillamaError(f"a tensor of shape {tuple(edit.shape)} cannot replace {key}, whose shape is "
                                     f"{tuple(seen.shape)}") from None
        else:
            y = edit(seen)
            if y is None:
                return None
            if not isinstance(y, torch.Tensor) or y.shape != seen.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise MinillamaError(f"the function for {key} returned {got}; it must return a tensor of shape "
                                     f"{tuple(seen.shape)} (or None to keep the value)")
            y = y.to(x.dtype)
        return _from_transformerlens(model, hf_name, y) if alias else y

    return apply


# ---- Steering --------------------------------------------------------------------------------------

def steer(model: LlamaForCausalLM, name: str, vector: torch.Tensor, scale: float = 1.0):
    """A `with` block in which scale * vector is added to the activation(s) `name` on every forward:
    `with minillama.steer(model, "model.layers.4.resid_post", v, 8.0): minillama.generate(...)`.
    generate() then picks the eager engine by default; the compiled one refuses hooked models (its graph
    would not run the hooks)."""
    if not isinstance(vector, torch.Tensor) or not vector.is_floating_point():
        raise MinillamaError(f"a steering vector must be a floating-point tensor, got {type(vector).__name__}")
    return intervene(model, {name: add(vector, scale)})


def parse_steer(spec: str) -> tuple[str, Path, float]:
    """NAME=FILE.safetensors[:SCALE] -> (name, file, scale); the scale defaults to 1."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise MinillamaError(f"--steer {spec!r}: expected NAME=FILE.safetensors[:SCALE], "
                             "e.g. model.layers.4.resid_post=love.safetensors:8")
    path, colon, tail = rest.rpartition(":")
    try:
        scale = float(tail) if colon else 1.0
    except ValueError:  # a ':' that is part of the file name
        path, scale = rest, 1.0
    return name, Path(path or rest).expanduser(), scale


def read_vector(path: Path, name: str, also: Sequence[str] = ()) -> torch.Tensor:
    """A steering vector from a safetensors file: its only tensor, or the one stored under `name` (or under one
    of the names in `also`: the activation's other spellings, as a `minillama dump` file names them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_bytes(path, VECTOR_FILE_LIMIT, "steering vector file")  # regular files only, size-limited
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise MinillamaError(f"{path} is not a readable safetensors file ({one_line(e)})") from None
    stored = next((n for n in (name, *also) if n in tensors), None)
    if len(tensors) != 1 and stored is None:
        raise MinillamaError(f"{path} holds {len(tensors)} tensors and none is named {name!r}; "
                             "save one tensor, or store it under the activation's name")
    vector = tensors[stored] if stored is not None else next(iter(tensors.values()))
    if not vector.is_floating_point() or not torch.isfinite(vector).all():
        raise MinillamaError(f"the steering vector in {path} must hold finite floating-point numbers")
    return vector


def steering(model: LlamaForCausalLM, specs: list[str] | None):
    """The `with` block for the CLI's --steer NAME=FILE[:SCALE] flags (no flags: a block that does nothing).

    Every name and every vector's shape is checked here, before any generation: a vector that does not fit
    its activation would otherwise fail at the first decode step, in the middle of the streamed reply."""
    edits = {}
    for spec in specs or []:
        name, path, scale = parse_steer(spec)
        if name in edits:
            raise MinillamaError(f"--steer names {name} twice; add the vectors into one file")
        chosen = select(model, [name])  # raises for a name that is no activation
        spellings = [*chosen, *(t.key for targets in chosen.values() for t in targets)]  # HF name and alias
        vector = read_vector(path, name, also=spellings if len(chosen) == 1 else ())
        check_steering_shape(model, name, path, vector)
        edits[name] = add(vector, scale)
    return intervene(model, edits)


def check_steering_shape(model: LlamaForCausalLM, name: str, path: Path, vector: torch.Tensor) -> None:
    """A steering vector must fit the activation(s) `name` for a forward of any length: it may not have a
    position axis longer than 1 (a tensor saved by `minillama dump` holds every position of its prompt).
    The activations' shapes come from one forward of one token."""
    with torch.inference_mode(), capture(model, [name]) as acts:
        model(torch.zeros((1, 1), dtype=torch.long, device=model.device))
    for key, value in acts.items():
        shape = tuple(value.shape)
        try:
            fits = torch.broadcast_shapes(tuple(vector.shape), shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            per_token = shape[next((i for i, n in enumerate(shape) if n != 1), len(shape) - 1):]
            raise MinillamaError(
                f"--steer {name}: the vector in {path} has shape {tuple(vector.shape)}, but {key} is {shape} for "
                f"one token; give one value per token, shape {per_token} (a tensor saved by minillama dump holds "
                "every position of its prompt: save one, e.g. t[0, -1], or their mean)")


# ---- Activation patching ---------------------------------------------------------------------------

Metric = Callable[[torch.Tensor], "float | torch.Tensor"]  # last position's logits (V,) -> a number


@dataclass
class PatchingResult:
    names: list[str]  # the per-layer names patched, as given (e.g. "resid_pre")
    layers: list[int]  # the layers patched (default: all)
    scores: torch.Tensor  # (len(names), len(layers), T): the metric on the corrupted prompt with that one
    #                        (layer, position) taken from the clean run
    clean: float  # the metric on the clean prompt
    corrupted: float  # on the corrupted prompt, nothing patched


def logit_difference(correct: int, wrong: int) -> Metric:
    """logits[correct] - logits[wrong] at the last position: above 0 when the model prefers `correct`."""
    return lambda logits: logits[correct] - logits[wrong]


def patching(model: LlamaForCausalLM, clean_ids, corrupted_ids, names: Sequence[str] = ("resid_pre",),
             metric: Metric | None = None, *, answers: tuple[int, int] | None = None,
             layers: Sequence[int] | None = None, batch_size: int = 16, progress: bool = False) -> PatchingResult:
    """Activation patching: where does the model carry what makes the clean answer?

    Runs the clean prompt once and records `names` (per-layer names of minillama.capture, HF-style such as
    "resid_pre", "self_attn.o_proj", "mlp.down_proj", or aliases such as "hook_resid_pre"), then the
    corrupted prompt (the same number of tokens) once per (name, layer, position) with that one activation
    taken from the clean run, and scores each run with `metric` (default, given answers=(clean answer id,
    corrupted answer id): `logit_difference`). `layers` limits the layers patched (default: all of them).
    Runs for one layer go `batch_size` positions per forward. `progress`: a bar on stderr (at a terminal),
    one step per (name, layer).
    """
    clean_ids, corrupted_ids = _prompt_pair(model, clean_ids, corrupted_ids)
    if metric is None:
        if answers is None or len(answers) != 2:
            raise MinillamaError("patching needs a metric, or answers=(clean answer id, corrupted answer id)")
        metric = logit_difference(*answers)
    L, T = model.config.num_hidden_layers, clean_ids.shape[1]
    layers = list(range(L)) if layers is None else [int(i) for i in layers]
    if not all(0 <= i < L for i in layers):
        raise MinillamaError(f"layers must lie in [0, {L}); got {layers}")
    keys = [[_layer_key(name, i) for i in layers] for name in names]
    scores = torch.empty(len(names), len(layers), T)
    with torch.inference_mode():
        with capture(model, [key for row in keys for key in row]) as acts:  # one attention path for all runs
            clean = float(metric(model(clean_ids)[0, -1].float()))
            clean_acts = dict(acts)
            corrupted = float(metric(model(corrupted_ids)[0, -1].float()))
        bar = tqdm(total=len(names) * len(layers), desc="patching", unit="layer", file=sys.stderr,
                   disable=None if progress else True)  # None: shown at a terminal only
        for n, row in enumerate(keys):
            for i, key in enumerate(row):
                bar.update()
                hf_name, alias = _resolve(model, key)
                lay = layout(model, hf_name, alias)
                for start in range(0, T, batch_size):
                    positions = torch.arange(start, min(T, start + batch_size))
                    fn = _patch_row_by_row(clean_acts[key], lay, positions)
                    with intervene(model, {key: fn}):
                        logits = model(corrupted_ids.expand(len(positions), T), logits_to_keep=1)[:, -1].float()
                    scores[n, i, positions] = torch.stack([torch.as_tensor(metric(one)).float().cpu()
                                                           for one in logits])
    bar.close()
    return PatchingResult(list(names), layers, scores, clean, corrupted)


def _prompt_pair(model: LlamaForCausalLM, clean_ids, corrupted_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Both prompts as (1, T) id tensors on the model's device, checked: one prompt each, equal lengths."""
    pair = []
    for what, ids in (("clean", clean_ids), ("corrupted", corrupted_ids)):
        ids = torch.as_tensor(ids, dtype=torch.long)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise MinillamaError(f"the {what} prompt must be one non-empty list of ids, got shape {tuple(ids.shape)}")
        if int(ids.max()) >= model.config.vocab_size or int(ids.min()) < 0:
            raise MinillamaError(f"the {what} prompt has ids outside the vocabulary of {model.config.vocab_size}")
        pair.append(ids.to(model.device))
    if pair[0].shape != pair[1].shape:
        raise MinillamaError(f"the clean prompt has {pair[0].shape[1]} tokens and the corrupted one "
                             f"{pair[1].shape[1]}; patching compares position by position, so reword one")
    return pair[0], pair[1]


def _layer_key(name: str, i: int) -> str:
    """The full name of a per-layer name at layer i: model.layers.{i}.NAME, or blocks.{i}.NAME for an alias."""
    if name in LAYER_NAMES:
        return f"model.layers.{i}.{name}"
    if name in LAYER_NAMES.values():
        return f"blocks.{i}.{name}"
    raise MinillamaError(f"patching takes per-layer names such as 'resid_pre', 'self_attn.o_proj', 'mlp.down_proj' "
                         f"or 'hook_resid_pre'; {name!r} is not one")


def _resolve(model: LlamaForCausalLM, key: str) -> tuple[str, bool]:
    ((hf_name, (target, *_)),) = select(model, [key]).items()
    return hf_name, target.alias


def _patch_row_by_row(source: torch.Tensor, lay: Layout, positions: torch.Tensor) -> Callable:
    """An edit for a batch of len(positions) copies of one prompt: row r gets position positions[r] from
    source (batch 1), so each row is one patched run."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        view, src = _view(y, lay), _view(source.to(x.device), lay)
        rows = torch.arange(len(positions), device=x.device)
        index, src_index = [rows] + [slice(None)] * (view.ndim - 1), [rows * 0] + [slice(None)] * (view.ndim - 1)
        index[lay.position_axis] = src_index[lay.position_axis] = positions.to(x.device)
        view[tuple(index)] = src[tuple(src_index)]
        return y
    return fn


def require_matplotlib() -> None:
    """Fail early, in one line, when a plot is asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MinillamaError("--plot needs matplotlib: pip install 'minillama[plot]'") from None


def plot_patching(result: PatchingResult, labels: list[str], path: Path, title: str = "activation patching") -> Path:
    """One heatmap per name: layers down, positions across (`labels`: one per position), colour = metric.
    Returns the file written."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N, L, T = result.scores.shape
    fig, axes = plt.subplots(1, N, figsize=(N * max(4.0, 0.55 * T + 2), max(3.0, 0.2 * L + 2)), squeeze=False)
    low = min(result.corrupted, result.clean, float(result.scores.min()))
    high = max(result.corrupted, result.clean, float(result.scores.max()))
    for ax, name, grid in zip(axes[0], result.names, result.scores):
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
        ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
        ticks = range(0, L, max(1, L // 15))
        ax.set_yticks(ticks, [result.layers[i] for i in ticks])
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=10)
        fig.colorbar(image, ax=ax, label="metric")
    fig.suptitle(f"{title}\nclean {result.clean:.2f}, corrupted {result.corrupted:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
