"""The decode step compiled ahead of time and kept on disk: the compiled engine of a CPU chat (AOTInductor).

torch.compile (fast.py) traces and compiles the step in every process: ~45 s on a 2-core CPU, and still ~15 s
with Inductor's caches warm, since Dynamo and AOTAutograd run again each time. AOTInductor compiles the same
forward once into a shared library with its own C++ wrapper (no Python between the kernels, no guards);
minillama keeps it in its cache directory under a key of everything the graph depends on (`package_key`), and
a later process loads it in milliseconds. The library holds no weights: it runs on the model's own tensors and
the engine's KV cache, passed by pointer (`load_constants(user_managed=True)`), so nothing is held twice.

    engine = AotEngine(model, max_seq_len=4096, build="now")   # or "background": eager until built
    minillama.generate(model, ids, engine=engine)

The step is model.py's forward for one token at slot `pos`, attending over the first `span` slots of the cache
(a dynamic length: the filled slots rounded up to SPAN_STEP), so a long context costs only what it holds, as on
the eager engine. Prompts (T > 1) run through the same forward eagerly, into the same cache.

`build="background"` starts `python -m minillama.aot SPEC` (one process at idle priority, one thread) that loads the
model the same way (`load_args`: load_model's arguments), compiles and writes the package; the engine decodes
eagerly until the package appears and switches at the next prompt. The child checks that its model gives the
same key, so a package always matches the weights it runs on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillama.capture import active_taps
from minillama.errors import MinillamaError
from minillama.generation import EagerEngine
from minillama.kv_cache import CacheRows, KVCache
from minillama.packing import is_packed

SPAN_STEP = 64  # attended slots rounded up to this: fewer distinct sizes, aligned rows
SOURCES = ("model.py", "kv_cache.py", "quant.py", "kernels.py", "kernels.cpp", "aot.py", "config.py")
KEEP = 8  # packages kept in the cache directory (each ~4 MB for the default model), the most recently used
BUILD_TIMEOUT_S = 1800  # a background build that takes longer is given up (the chat stays eager)


class Step(nn.Module):
    """What AOTInductor compiles: logits (1, V) of token (1, 1) at slot pos (1,), attending over the first
    marker.shape[0] slots of the cache (marker's values are never read: its length is the graph's span)."""

    def __init__(self, model: nn.Module, cache: KVCache):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, token: torch.Tensor, pos: torch.Tensor, marker: torch.Tensor) -> torch.Tensor:
        rows = CacheRows(self.cache, slice(None), marker.shape[0])  # every row (one), `span` slots
        return self.model(token, cache=rows, input_pos=pos, logits_to_keep=1)[:, -1]


def applies(model: nn.Module) -> str | None:
    """None where the ahead-of-time step can run this model, else why not (one phrase)."""
    if model.device.type != "cpu":
        return "it runs on a CPU (on a GPU the compiled engine is torch.compile with CUDA graphs)"
    if model.config.rope_type == "dynamic":
        return "dynamic RoPE scaling reads the position on the host every step"
    if is_packed(model):
        return "it needs plain weights, not oneDNN-packed ones"
    if getattr(model, "tp_layout", None) is not None:
        return "tensor parallelism runs on the eager engine"
    return None


def default_applies(model: nn.Module) -> bool:
    """Whether a CPU chat takes this step by default: it applies, a compiler is there, and minillama's own int8
    kernels run the weights (measured: 43 vs 27-35 tok/s eager on the default model's Q4_1, docs/benchmarks.md)."""
    from minillama import kernels

    return (applies(model) is None and kernels.compiler() is not None
            and any(getattr(m, "kernel", None) == "minillama" for m in model.modules()))


def package_key(model: nn.Module, max_seq_len: int) -> str:
    """A hash of everything the compiled graph depends on: torch, the CPU, minillama's model and kernel
    sources, the config, each tensor's name, shape and dtype, each module's kernel choice, the cache length."""
    from minillama import kernels

    here = Path(__file__).parent
    tensors = named_tensors(model)
    parts = {
        "torch": torch.__version__, "python": list(sys.version_info[:2]), "cpu": kernels.cpu_flags(),
        "kernels": kernels.describe() if any(hasattr(m, "kernel") for m in model.modules()) else None,
        "sources": hashlib.sha256(b"".join((here / f).read_bytes() for f in SOURCES)).hexdigest(),
        "config": repr(model.config), "max_seq_len": max_seq_len, "device": str(model.device),
        "tensors": sorted((name, list(t.shape), str(t.dtype)) for name, t in tensors.items()),
        "modules": sorted((name, type(m).__name__, str(getattr(m, "kernel", "")), str(getattr(m, "passes", "")),
                           str(getattr(m, "attn_implementation", ""))) for name, m in model.named_modules()),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def is_built(model: nn.Module, max_seq_len: int) -> bool:
    """Whether the step for this model and context is in the cache already (an engine then starts at once)."""
    return package_path(package_key(model, max_seq_len)).exists()


def package_path(key: str) -> Path:
    from minillama.hub import cache_dir

    return cache_dir() / "aot" / f"step-{key}.pt2"


def build_package(model: nn.Module, max_seq_len: int, path: Path) -> Path:
    """Export the step and compile it with AOTInductor into `path` (atomically: written, then renamed)."""
    import torch._inductor

    cache = model.new_cache(1, max_seq_len + 1)  # the graph's own; the engine passes its cache at load
    step = Step(model, cache).eval()
    args = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
            torch.empty(min(SPAN_STEP, max_seq_len)))
    # one slot more than a request can fill: a span of the whole cache would be a second case (a contiguous
    # view) that export specializes on
    span = torch.export.Dim("span", min=2, max=max_seq_len)
    with torch.no_grad():
        exported = torch.export.export(step, args, dynamic_shapes=(None, None, {0: span}), strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    try:
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(partial), inductor_configs={"aot_inductor.package_constants_in_so": False})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    for old in sorted(path.parent.glob("step-*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]:
        old.unlink(missing_ok=True)  # packages of older sources or other contexts, least recently used first
    return path


class AotEngine:
    """One prompt (B = 1) on a KV cache; each decode step the ahead-of-time compiled graph once it is built,
    model.forward (the eager engine) before that and for prompts.

    max_seq_len: tokens of context (the engine's KV cache holds one slot more, never filled).
    build:     "now" (compile in this process if the package is not cached: ~1 min on a 2-core CPU),
               "background" (a child process compiles it; needs load_args), or "never" (use a cached one only).
    load_args: `load_model`'s arguments that give this model (path, dtype, quantize, group_size), for the child.
    """

    kind = "compiled"
    lag = 0

    def __init__(self, model: nn.Module, max_seq_len: int, *, build: str = "now", load_args: dict | None = None):
        why = applies(model)
        if why is not None:
            raise MinillamaError(f"the ahead-of-time compiled step does not apply here: {why}; use engine='eager'")
        if build not in ("now", "background", "never"):
            raise MinillamaError(f"build={build!r}: choose 'now', 'background' or 'never'")
        max_seq_len = max(2, min(max_seq_len, model.config.max_position_embeddings))
        self.model, self.max_seq_len = model, max_seq_len
        self.key = package_key(model, max_seq_len)
        self.path = package_path(self.key)
        self.runner = None
        # A loaded package keeps its constants (this cache among them) for the life of the process: torch frees
        # neither. So the next engine of the same model and context, once this one is gone, takes both over.
        last = getattr(model, "_aot_steps", {}).get(self.key)
        if last is not None and last[0]() is None:
            self.cache, self.runner = last[1], last[2]
            model._aot_steps[self.key][0] = weakref.ref(self)
        else:
            self.cache = model.new_cache(1, max_seq_len + 1)
        self.eager = EagerEngine(model, self.cache)
        self.eager.max_seq_len = max_seq_len
        self.builder: subprocess.Popen | None = None
        self.build_error: str | None = None
        self._news: list[str] = []  # one-line notes for the user: the build ended (ready, or why not)
        self.token = torch.zeros(1, 1, dtype=torch.long)  # (1, 1)
        self.pos = torch.zeros(1, dtype=torch.long)  # (1,)
        self.marker = torch.empty(max_seq_len)  # its first `span` elements give the graph its span
        if self.runner is None and self.path.exists() and not self._load():
            self.path.unlink(missing_ok=True)  # unreadable (a torch or disk problem): built again below
        if self.ready or build == "never":
            return
        if build == "now":
            build_package(model, max_seq_len, self.path)
            if not self._load():
                raise MinillamaError(f"the compiled step was built but does not load ({self.path}); use engine='eager'")
        else:
            if load_args is None:
                raise MinillamaError("build='background' needs load_args (how the child process loads the model)")
            self._start_builder(load_args)

    @property
    def ready(self) -> bool:
        """Whether decode steps run on the compiled graph (else eagerly, until a background build ends)."""
        return self.runner is not None

    def _load(self) -> bool:
        """Load the package onto this model's tensors and the engine's cache; False if it cannot be read."""
        try:
            loader = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, -1)
        except (RuntimeError, OSError):
            return False
        tensors = named_tensors(Step(self.model, self.cache))
        names = loader.get_constant_fqns()
        missing = [n for n in names if n not in tensors]
        if missing:
            raise MinillamaError(f"{self.path} does not match this model ({missing[0]} is not one of its tensors); "
                                 "delete it and start again")
        loader.load_constants({n: tensors[n] for n in names}, False, True, True)  # user-managed: no copies
        self.runner = loader
        os.utime(self.path)  # recently used: kept when newer packages are built
        if not hasattr(self.model, "_aot_steps"):
            self.model._aot_steps = {}
        self.model._aot_steps[self.key] = [weakref.ref(self), self.cache, loader]
        return True

    def _start_builder(self, load_args: dict) -> None:
        spec = {"load_args": load_args, "max_seq_len": self.max_seq_len, "key": self.key, "threads": 1}
        self._threads = torch.get_num_threads()  # one fewer while the build runs: it takes a core (threads.py)
        torch.set_num_threads(max(1, self._threads - 1))
        self._builder_log = tempfile.TemporaryFile("w+")  # not a pipe: compiler warnings could fill one and stall it
        self.builder = subprocess.Popen([sys.executable, "-m", "minillama.aot", json.dumps(spec)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self._builder_log, start_new_session=True)
        self._builder_started = time.monotonic()

    def poll(self) -> bool:
        """Pick up a finished background build; True once the compiled step runs. Called before each prompt."""
        if self.runner is None and self.builder is not None and self.builder.poll() is not None:
            self._builder_log.seek(0)
            err = self._builder_log.read()
            self._builder_log.close()
            code, self.builder = self.builder.returncode, None
            torch.set_num_threads(self._threads)
            seconds = time.monotonic() - self._builder_started
            if code == 0 and self._load():
                self._news.append(f"the compiled decode step is ready (built in {seconds:.0f} s; later chats load it)")
            else:
                lines = err.strip().splitlines() or [f"exit code {code}"]
                self._failed(next((line for line in reversed(lines) if "Error:" in line), lines[-1])[:300])
        elif self.builder is not None and time.monotonic() - self._builder_started > BUILD_TIMEOUT_S:
            self.stop_builder()
            self._failed(f"it took over {BUILD_TIMEOUT_S} s")
        return self.runner is not None

    def _failed(self, why: str) -> None:
        self.build_error = why
        self._news.append(f"the compiled decode step could not be built ({why}); replies stay eager "
                          "(--engine eager skips the build)")

    def news(self) -> str | None:
        """A one-line note, once, when a background build has ended: ready, or why not."""
        self.poll()
        return self._news.pop(0) if self._news else None

    def stop_builder(self) -> None:
        """End a background build still running (its partial file is removed by the child or on the next build)."""
        if self.builder is not None and self.builder.poll() is None:
            self.builder.terminate()
            try:
                self.builder.wait(10)
            except subprocess.TimeoutExpired:
                self.builder.kill()
                self.builder.wait()
        if self.builder is not None:
            torch.set_num_threads(self._threads)
        self.builder = None

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, input_pos: int, position_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last position's logits (1, V) for ids (1, T) written at slot input_pos: a prompt (T > 1) and any
        step before the graph is ready by the plain forward, a decode step by the graph."""
        if ids.shape[0] != 1 or position_ids is not None or key_padding_mask is not None:
            raise MinillamaError("the compiled engine runs one unpadded prompt; use engine='eager' for batches")
        if ids.shape[1] > 1:
            self.poll()
        if ids.shape[1] > 1 or self.runner is None or active_taps(self.model):
            return self.eager.forward(ids, input_pos)
        if input_pos >= self.max_seq_len:
            raise ValueError(f"{input_pos + 1} tokens do not fit a cache of {self.max_seq_len}")
        span = min(self.max_seq_len, -(-(input_pos + 1) // SPAN_STEP) * SPAN_STEP)
        self.token.copy_(ids)
        self.pos.fill_(input_pos)
        return self.runner.boxed_run([self.token, self.pos, self.marker[:span]])[0]

    def warmup(self) -> None:
        """Nothing to compile at the first step (the package is built or loading); kept for the engine API."""


def _build_from_spec(spec: dict[str, Any]) -> int:
    """The child of build="background": load the model as the parent did, check the key, build the package."""
    import ctypes
    import signal

    from minillama.checkpoint import load_model

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the partial file goes (build_package's finally)
    try:  # Linux: end with the process that started it (PR_SET_PDEATHSIG), however that one ends
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    try:  # run only when the chat leaves a core idle
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    torch.set_num_threads(spec.get("threads", 1))
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    model = load_model(**spec["load_args"], pack=False)
    key = package_key(model, spec["max_seq_len"])
    if key != spec["key"]:
        print("the model loaded in the build process differs from the chat's (its package key differs)",
              file=sys.stderr)
        return 1
    build_package(model, spec["max_seq_len"], package_path(key))
    return 0


if __name__ == "__main__":
    sys.exit(_build_from_spec(json.loads(sys.argv[1])))
