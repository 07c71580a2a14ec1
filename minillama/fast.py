"""The compiled decode engine: model.py's own forward, compiled for one token (CUDA graphs on a GPU).

Nothing here computes any of the decoder's math: the engine calls `model(token, cache=..., input_pos=pos)`
with `pos` a (1,) *tensor*. Then the KV cache is written with `index_copy_` and attention runs over every
cache slot under a mask (kv_cache.py), so no shape depends on the step and one compiled graph serves them
all. On a GPU, Inductor records that graph as a CUDA graph: one launch per token, no Python in between.

The step's inputs (`token`, `pos`) and the cache are buffers of this module: their addresses never change,
which CUDA graphs need (Inductor refuses graphs that mutate plain inputs). Prompts (T > 1) run through the
same forward eagerly, on the same cache, with an int position (SDPA's causal kernels: flash on a GPU).

Generation itself (sampling, stop rules, reading tokens a few steps behind the GPU) is generation.py's loop,
which drives this engine and the eager one through the same `forward(ids, input_pos)`.
Design notes and measurements: docs/fast-path.md, docs/benchmarks.md.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from minillama.capture import active_taps
from minillama.errors import MinillamaError
from minillama.model import LlamaForCausalLM
from minillama.packing import is_packed


def compile_options(device: torch.device, tuning: bool | None = None, pdl: bool = False) -> dict[str, bool] | None:
    """Inductor options for the step: on CUDA, CUDA graphs (mode="reduce-overhead") plus coordinate-descent
    tuning unless tuning=False (it also turns each 1-row matmul into a reduction that fuses with its
    neighbours), and programmatic dependent launch if pdl; elsewhere Inductor's defaults."""
    if device.type != "cuda":
        return None
    options = {"triton.cudagraphs": True, "coordinate_descent_tuning": tuning is not False}
    if pdl:
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config.triton, "enable_pdl"):
            raise MinillamaError(f"pdl=True needs torch >= 2.10 (this is {torch.__version__}); leave it off")
        options["triton.enable_pdl"] = True
    return options


def compiled_engine_applies(model: LlamaForCausalLM) -> bool:
    """Dynamic NTK RoPE reads the largest position on the host every step, which a graph cannot do."""
    return model.config.rope_type != "dynamic"


class CompiledEngine(nn.Module):
    """One prompt (B=1) on a static KV cache, each decode step one compiled graph.

        engine = CompiledEngine(model, max_seq_len=4096)
        minillama.generate(model, ids, engine=engine)

    max_seq_len: cache length, rounded up to a multiple of 8 (aligned mask rows keep CUDA's fused attention
                 kernels). Each step attends over all of it: keep it to what you need.
    tuning, pdl: Inductor options on CUDA (see compile_options).
    lag:         how many steps behind the device the generation loop reads tokens; None: 4 on CUDA, 0 elsewhere.
    """

    kind = "compiled"

    def __init__(self, model: LlamaForCausalLM, max_seq_len: int | None = None, *, tuning: bool | None = None,
                 pdl: bool = False, lag: int | None = None):
        super().__init__()
        config = model.config
        if not compiled_engine_applies(model):
            raise MinillamaError("the compiled engine does not support dynamic RoPE scaling; use engine='eager'")
        if is_packed(model):
            raise MinillamaError("the compiled engine needs plain weights (torch.compile cannot trace oneDNN-packed "
                                 "ones); load without pack=True, or use engine='eager'")
        device = model.device
        if pdl and device.type != "cuda":
            raise MinillamaError("pdl=True needs a CUDA device (programmatic dependent launch)")
        max_seq_len = min(max_seq_len or 4096, config.max_position_embeddings)
        if max_seq_len % 8 and -(-max_seq_len // 8) * 8 <= config.max_position_embeddings:
            max_seq_len = -(-max_seq_len // 8) * 8
        self.model = model
        self.cache = model.new_cache(1, max_seq_len)
        self.max_seq_len = max_seq_len
        self.lag = (4 if device.type == "cuda" else 0) if lag is None else lag
        self.register_buffer("token", torch.zeros(1, 1, dtype=torch.long, device=device), persistent=False)  # (1, 1)
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long, device=device), persistent=False)  # (1,)
        self.step = torch.compile(self._step, fullgraph=True, options=compile_options(device, tuning, pdl))
        self.cudagraph_skips = 0  # after warmup(): graphs Inductor could not capture (0 is right)

    def _step(self) -> torch.Tensor:
        """Logits (1, V) of `token` at slot `pos`; writes its keys/values into the cache. This is compiled."""
        return self.model(self.token, cache=self.cache, input_pos=self.pos, logits_to_keep=1)[:, -1]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, input_pos: int, position_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last position's logits (1, V) for ids (1, T) written at slot input_pos: T = 1 by the graph,
        a prompt by the plain forward."""
        if position_ids is not None or key_padding_mask is not None or ids.shape[0] != 1:
            raise MinillamaError("the compiled engine runs one unpadded prompt; use engine='eager' for batches")
        if active_taps(self.model):  # a graph compiled before the hooks never runs them, so refuse them
            raise MinillamaError(f"the compiled engine cannot run capture/intervene/steer hooks "
                                 f"({active_taps(self.model)[0]} is hooked); use engine='eager'")
        if ids.shape[1] > 1:
            return self.model(ids, cache=self.cache, input_pos=input_pos, logits_to_keep=1)[:, -1]
        self.token.copy_(ids)
        self.pos.fill_(input_pos)
        if self.pos.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: reuse them
        return self.step()

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile (and on CUDA record the graph of) the step now, so the first reply is not slow. Writes
        garbage into slot 0 of the cache, which a later prefill overwrites."""
        skips_before = _cudagraph_skips()
        for _ in range(3):  # CUDA graph trees record on the second or third call
            self.forward(self.token, 0)
        if self.pos.device.type == "cuda":
            self.cudagraph_skips = _cudagraph_skips() - skips_before
            if self.cudagraph_skips:
                warnings.warn("torch.compile could not capture the decode step as a CUDA graph, so decoding is "
                              "several times slower; run with TORCH_LOGS=cudagraphs to see why", RuntimeWarning,
                              stacklevel=2)


def compiled_engine_for(model: LlamaForCausalLM, seq_len: int, **options) -> CompiledEngine:
    """The model's compiled engine with room for seq_len tokens, made once and kept on the model.

    Built (and compiled) again only when a request needs more room or other options; the cache length rounds
    up to a multiple of 1024 (at most the model's context), so growing prompts rebuild rarely.
    """
    engine = getattr(model, "_minillama_compiled_engine", None)
    if engine is not None and engine.max_seq_len >= seq_len and engine.options == options:
        return engine
    context = model.config.max_position_embeddings
    if seq_len > context:
        raise MinillamaError(f"{seq_len} tokens exceed the model's context of {context}")
    engine = CompiledEngine(model, min(context, -(-seq_len // 1024) * 1024), **options)
    engine.options = dict(options)
    object.__setattr__(model, "_minillama_compiled_engine", engine)  # a plain attribute: not a submodule
    return engine


# ---- Diagnostics for the GPU run -----------------------------------------------------------------------

def _cudagraph_skips() -> int:
    """Inductor's running count of graphs it compiled without CUDA graphs (it logs each reason)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet, and not worth importing for the answer
        return 0
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def cuda_graphs_recorded(device: torch.device) -> int:
    """How many CUDA graphs Inductor's graph trees have recorded on this device (a skip is not always
    counted, e.g. when graph partitioning finds nothing to capture). -1 when this torch cannot say."""
    if device.type != "cuda" or "torch._inductor.cudagraph_trees" not in sys.modules:
        return 0
    try:
        from torch._inductor.cudagraph_trees import get_manager

        manager = get_manager(device.index if device.index is not None else torch.cuda.current_device(),
                              create_if_none_exists=False)
        return 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())
    except Exception:  # an internal API: tolerate its changes
        return -1
