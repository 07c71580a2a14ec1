"""The fast bs=1 decode path: static shapes, fused projections, compiled (CUDA graphs on a GPU).

`model.py` is the readable decoder. This file computes the same thing one token at a time, arranged so that
`torch.compile` can turn a whole decode step into one graph that CUDA replays with no Python in between:

- Static shapes. The KV cache (`minillama.kv_cache` buffers) is allocated once at `max_seq_len`. A step writes
  its key and value at a *tensor* position with `index_copy_` and attends over the whole buffer under a mask
  (slot <= position), so no shape depends on the step number and one compiled graph serves every step.
- Fused projections (`fuse_projections`): q, k and v are one matmul, gate and up another. The model keeps its
  parameter names; its q/k/v and gate/up weights become views into the fused tensors, so no memory is doubled.
- No host synchronisation per token. The next token is chosen on the device and written straight into the
  step's input buffer; tokens travel to the host through pinned buffers a few steps behind (`lag`), so the
  GPU always has work queued while Python checks for eos.
- Prefill runs the same layer code over the whole prompt (SDPA's causal kernels: flash on a GPU), eagerly,
  and computes the head for the last position only.
- On CPU (float32) both use oneDNN-packed copies of the weight matrices, which stream ~1.5x faster than MKL's.

Shapes follow model.py's legend (B=1 here, T=1 in a step, S = max_seq_len: every cache slot).
Design notes and measurements: docs/fast-path.md, docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from minillama.errors import MinillamaError
from minillama.kv_cache import LayerKVCache
from minillama.model import LlamaForCausalLM, LlamaRMSNorm, attention_mask
from minillama.sampling import SamplingSettings, next_token, seen_tokens

SPAN_STEP = 256  # the eager step attends over the filled cache slots rounded up to this

# ---- Fused projections ------------------------------------------------------------------------------

class FusedProjections(nn.Module):
    """One layer's fused weights: [q; k; v] and [gate; up], stacked along the output dim.

    The layer's own q/k/v/gate/up Linear weights are views into these tensors (see `fuse_projections`).
    """

    def __init__(self, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                 gate_up_weight: torch.Tensor, gate_up_bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("qkv_weight", qkv_weight, persistent=False)  # ((H + 2 Hkv) D, C)
        self.register_buffer("qkv_bias", qkv_bias, persistent=False)  # ((H + 2 Hkv) D,) or None
        self.register_buffer("gate_up_weight", gate_up_weight, persistent=False)  # (2 F, C)
        self.register_buffer("gate_up_bias", gate_up_bias, persistent=False)  # (2 F,) or None


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the Linears' weights (and biases) along the output dim and make each Linear's
    parameters views of the result, so the separate copies are freed and the names stay as they were."""
    weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum of out, C)
    bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight = nn.Parameter(weight[start:end], requires_grad=lin.weight.requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:end], requires_grad=lin.bias.requires_grad)
        start = end
    return weight, bias


def _is_fused(fused: FusedProjections, layer: nn.Module) -> bool:
    """True while the layer's weights still live inside `fused` (a later load_state_dict(assign=True) breaks this)."""
    a, m = layer.self_attn, layer.mlp
    return (a.q_proj.weight.data_ptr() == fused.qkv_weight.data_ptr()
            and m.gate_proj.weight.data_ptr() == fused.gate_up_weight.data_ptr())


@torch.no_grad()
def fuse_projections(model: LlamaForCausalLM) -> nn.ModuleList:
    """Fuse every layer's q/k/v and gate/up projections; returns one `FusedProjections` per layer.

    The fusion happens in place but invisibly: parameter names, values and the eager forward are unchanged
    (each `q_proj.weight` etc. becomes a contiguous slice of the fused tensor), and the extra memory is one
    layer's projections for a moment. Calling it again returns the same fused tensors.
    Caveat: `safetensors.torch.save_file(model.state_dict())` refuses tensors that share storage; use
    `safetensors.torch.save_model`, or save before fusing.
    """
    cached = getattr(model, "_minillama_fused", None)
    if cached is not None and all(_is_fused(f, layer) for f, layer in zip(cached, model.model.layers)):
        return cached
    fused = nn.ModuleList()
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv_w, qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj])
        gate_up_w, gate_up_b = _fuse([m.gate_proj, m.up_proj])
        fused.append(FusedProjections(qkv_w, qkv_b, gate_up_w, gate_up_b))
    object.__setattr__(model, "_minillama_fused", fused)  # a plain attribute: not a submodule, not saved
    return fused


# ---- Packed weights on CPU ---------------------------------------------------------------------------
# A bs=1 step multiplies one vector by every weight matrix, so its speed is the speed of reading the weights.
# On the 2-core test machine MKL's x @ W.T streamed the 30 layers of SmolLM2-135M at ~20 GB/s; oneDNN's linear
# on weights reordered once into its own blocked layout streamed them at ~30 GB/s, and the 49152 x 576 head went
# from 7.3 ms to 2.7 ms. The price is a second copy of the matrices (the model keeps its own for model(...)).

class PackedLayer(nn.Module):
    """One layer's matrices in oneDNN's blocked layout (opaque mkldnn tensors), for `_linear`."""

    def __init__(self, qkv: torch.Tensor, o: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        for name, weight in (("qkv", qkv), ("o", o), ("gate_up", gate_up), ("down", down)):
            self.register_buffer(name, torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)


@torch.no_grad()
def packed_weights(model: LlamaForCausalLM, fused: nn.ModuleList) -> tuple[nn.ModuleList, torch.Tensor]:
    """Every layer's matrices and the head in oneDNN's layout; made once per model and shared by its decoders
    (so a chat session and `generate` calls do not each pay for another copy)."""
    cached = getattr(model, "_minillama_packed", None)
    if cached is not None and cached[0] is fused:
        return cached[1], cached[2]
    packed = nn.ModuleList(
        PackedLayer(f.qkv_weight, layer.self_attn.o_proj.weight, f.gate_up_weight, layer.mlp.down_proj.weight)
        for f, layer in zip(fused, model.model.layers))
    head = torch.ops.mkldnn._reorder_linear_weight(model.lm_head.weight.detach(), 1)
    object.__setattr__(model, "_minillama_packed", (fused, packed, head))  # a plain attribute, as for fusion
    return packed, head


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing: CPU, float32, a torch built with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or oneDNN's linear on the packed copy of `weight` when there is one."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


# ---- The static-shape decode step -------------------------------------------------------------------

def _rms_norm(x: torch.Tensor, norm: LlamaRMSNorm) -> torch.Tensor:
    """LlamaRMSNorm's exact numerics (fp32 statistics, cast back, then scale), written out for the compiler."""
    input_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(input_dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (1, heads, T, D) with cos/sin (1, 1, T, D): model.apply_rotary_pos_emb, written for the compiler."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _cudagraph_skips() -> int:
    """Inductor's running count of graphs it compiled without CUDA graphs (it logs each reason)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet, and not worth importing for the answer
        return 0
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def cuda_graphs_recorded(device: torch.device) -> int:
    """How many CUDA graphs Inductor's graph trees have recorded on this device (a diagnostic: a skip is not
    always counted, e.g. when graph partitioning finds nothing to capture). -1 when this torch cannot say."""
    if device.type != "cuda" or "torch._inductor.cudagraph_trees" not in sys.modules:
        return 0
    try:
        from torch._inductor.cudagraph_trees import get_manager

        manager = get_manager(device.index if device.index is not None else torch.cuda.current_device(),
                              create_if_none_exists=False)
        return 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())
    except Exception:  # an internal API: tolerate its changes
        return -1


def compile_options(device: torch.device, tuning: bool | None = None, pdl: bool = False) -> dict[str, bool] | None:
    """Inductor options for the step: on CUDA, CUDA graphs (mode="reduce-overhead") plus coordinate-descent
    tuning unless tuning=False, and programmatic dependent launch if pdl; elsewhere the defaults."""
    if device.type != "cuda":
        return None
    options = {"triton.cudagraphs": True, "coordinate_descent_tuning": tuning is not False}
    if pdl:
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config.triton, "enable_pdl"):
            raise MinillamaError(f"pdl=True needs torch >= 2.10 (this is {torch.__version__}); leave it off")
        options["triton.enable_pdl"] = True
    return options


def default_compile(device: torch.device) -> bool:
    """Compile by default on CUDA (CUDA graphs); eager elsewhere unless MINILLAMA_COMPILE=1."""
    env = os.environ.get("MINILLAMA_COMPILE")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return device.type == "cuda"


class FastDecoder(nn.Module):
    """A bs=1 generator over a static KV cache, optionally compiled (CUDA graphs on a GPU).

        fast = FastDecoder(model, max_seq_len=4096)
        for token_id in fast.generate(prompt_ids, max_new_tokens=256, eos_token_ids=[2]):
            ...

    model:       a loaded LlamaForCausalLM (any device/dtype). Its projections get fused in place (names kept).
    max_seq_len: cache length (rounded up to a multiple of 8); prompt + new tokens must fit. Each step attends
                 over all of it, so keep it to what you need (a step reads 2 * L * Hkv * max_seq_len * D cache
                 values besides the weights).
    compile:     torch.compile the step (CUDA: CUDA graphs, see compile_options). None: on CUDA only,
                 or as the MINILLAMA_COMPILE environment variable says.
    fuse:        fuse q/k/v and gate/up projections (default True).
    lag:         how many steps behind the device the host reads tokens; None: 4 on CUDA, 0 elsewhere.
    pack:        keep oneDNN-packed copies of the matrices for step and prefill (CPU, float32, eager: ~1.9x faster
                 decode, one more copy of the weights in memory). None: whenever possible.
    attention:   how the step attends over the cache: "sdpa" (F.scaled_dot_product_attention, one fused kernel)
                 or "math" (model.py's eager attention: two matmuls and an fp32 softmax, which the compiler
                 schedules its own way). The same numbers up to rounding; which is faster is a benchmark's call.
    tuning:      when compiling on CUDA, Inductor's coordinate-descent tuning (it also turns each 1-row matmul
                 into a reduction kernel that fuses with its neighbours); None: on. Costs compile time.
    pdl:         when compiling on CUDA, Inductor's programmatic dependent launch (torch >= 2.10, Hopper or
                 newer): each generated kernel may start while the one before it drains. Off by default.
    """

    def __init__(self, model: LlamaForCausalLM, max_seq_len: int | None = None, compile: bool | None = None,
                 fuse: bool = True, lag: int | None = None, pack: bool | None = None, attention: str = "sdpa",
                 tuning: bool | None = None, pdl: bool = False):
        super().__init__()
        if attention not in ("sdpa", "math"):
            raise MinillamaError(f"attention={attention!r}: choose 'sdpa' or 'math'")
        self.attention = attention
        config = model.config
        self.model = model
        max_seq_len = max_seq_len or min(config.max_position_embeddings, 4096)
        if max_seq_len % 8 and -(-max_seq_len // 8) * 8 <= config.max_position_embeddings:
            max_seq_len = -(-max_seq_len // 8) * 8  # aligned mask rows keep CUDA's fused attention kernels
        self.max_seq_len = max_seq_len
        if max_seq_len > config.max_position_embeddings and config.rope_type == "dynamic":
            raise MinillamaError("max_seq_len past max_position_embeddings is not supported with dynamic RoPE "
                                 "in the fast path; use fast=False")
        device, dtype = model.device, model.dtype
        self.cache = model.new_cache(1, max_seq_len)
        self.fused = fuse_projections(model) if fuse else None
        self.H, self.Hkv, self.D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scaling = self.D**-0.5

        # RoPE angles for every slot, computed once by the model's own rotary module.
        positions = torch.arange(max_seq_len, device=device)[None]  # (1, S)
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(positions, dtype)  # (1, S, D) each
        self.register_buffer("rope_cos", cos[0], persistent=False)  # (S, D)
        self.register_buffer("rope_sin", sin[0], persistent=False)  # (S, D)
        self.register_buffer("slots", torch.arange(max_seq_len, device=device), persistent=False)  # (S,)
        self.register_buffer("zeros_or_inf", torch.tensor([0.0, float("-inf")], dtype=dtype, device=device),
                             persistent=False)  # (2,): mask values for a visible / an empty slot
        # The step's state lives in buffers (static addresses: CUDA graphs replay them as they are).
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long, device=device), persistent=False)  # (1,)
        self.register_buffer("token", torch.zeros(1, 1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("seen", torch.zeros(1, config.vocab_size, dtype=torch.bool, device=device),
                             persistent=False)  # (1, V): tokens the repetition penalty applies to
        self.register_buffer("healthy", torch.ones(1, dtype=torch.long, device=device),
                             persistent=False)  # (1,): 0 once any logits held NaN/inf (checked as tokens are read)
        self.stop_reason: str | None = None  # after generate: "eos" or "length"
        self.cached_tokens = 0  # tokens the cache holds after the last generate (pass as input_pos to go on)
        self.host_pos = 0  # the slot the next step writes, as the host knows it (sizes the eager step's attention)

        self.compiled = default_compile(device) if compile is None else compile
        if pack is None:
            pack = can_pack(device, dtype) and not self.compiled and fuse
        if pack and not (can_pack(device, dtype) and fuse and not self.compiled):
            raise MinillamaError("packed weights need a CPU float32 model, torch with oneDNN, fuse=True and "
                                 "compile=False")
        self.packed, head = packed_weights(model, self.fused) if pack else (None, None)
        self.register_buffer("packed_head", head, persistent=False)  # (V, C) in oneDNN's layout, or None
        self.lag = (4 if device.type == "cuda" else 0) if lag is None else lag
        self._step_greedy = self._decode_greedy
        self._step_logits = self._decode_logits
        self.cudagraph_skips = 0  # after warmup(): how many graphs Inductor could not capture (0 is right)
        if pdl and not (self.compiled and device.type == "cuda"):
            raise MinillamaError("pdl=True needs the compiled step on a CUDA device (programmatic dependent launch)")
        if self.compiled:
            options = compile_options(device, tuning, pdl)
            self._step_greedy = torch.compile(self._decode_greedy, fullgraph=True, options=options)
            self._step_logits = torch.compile(self._decode_logits, fullgraph=True, options=options)

    # -- one token ---------------------------------------------------------------------------------------

    def _layer(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """Decoder layer i on x (1, T, C) with the fused (and packed) weights; model.py's math, fewer kernels.

        attend(cache, q, k, v) writes k, v into layer i's cache and returns attention output (1, T, H * D).
        """
        H, Hkv, D = self.H, self.Hkv, self.D
        T = x.shape[1]
        layer = self.model.model.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        packed = None if self.packed is None else self.packed[i]

        residual = x
        h = _rms_norm(x, layer.input_layernorm)
        if self.fused is not None:
            qkv = _linear(h, self.fused[i].qkv_weight, self.fused[i].qkv_bias,
                          None if packed is None else packed.qkv)  # (1, T, (H + 2 Hkv) D)
        else:
            qkv = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)
        qkv = qkv.view(1, T, H + 2 * Hkv, D).transpose(1, 2)  # (1, H + 2 Hkv, T, D)
        qk = _rotate(qkv[:, : H + Hkv], cos, sin)  # (1, H + Hkv, T, D): q and k rotated together
        q, k = qk.split([H, Hkv], dim=1)  # (1, H, T, D), (1, Hkv, T, D)
        v = qkv[:, H + Hkv :]  # (1, Hkv, T, D)
        y = attend(self.cache[i], q, k, v)  # (1, T, H * D)
        x = residual + _linear(y, attn.o_proj.weight, attn.o_proj.bias, None if packed is None else packed.o)

        residual = x
        h = _rms_norm(x, layer.post_attention_layernorm)
        if self.fused is not None:
            gate_up = _linear(h, self.fused[i].gate_up_weight, self.fused[i].gate_up_bias,
                              None if packed is None else packed.gate_up)  # (1, T, 2 F)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        down = None if packed is None else packed.down
        return residual + _linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias, down)  # (1, T, C)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the last position of x (1, T, C): logits (1, V)."""
        x = _rms_norm(x[:, -1:], self.model.model.norm)  # (1, 1, C)
        return _linear(x, self.model.lm_head.weight, None, self.packed_head).view(1, -1)

    def _forward_one(self) -> torch.Tensor:
        """Logits (1, V) for `self.token` at slot `self.pos`; writes that token's keys/values into the cache."""
        H, Hkv, D = self.H, self.Hkv, self.D
        pos = self.pos  # (1,) a tensor, so the graph is the same for every position
        cos = self.rope_cos[pos].view(1, 1, 1, D)
        sin = self.rope_sin[pos].view(1, 1, 1, D)
        # Additive mask (1, 1, 1, S): 0 for this token and the ones before it, -inf for empty slots.
        # (A float mask, not a boolean one: CPU SDPA was ~4x slower with a boolean mask.)
        # Eager, attend over the filled part of the cache rounded up to SPAN_STEP slots; compiled (a graph
        # per shape), over all of it.
        S = self.max_seq_len
        if not self.compiled:
            S = min(S, -(-(self.host_pos + 1) // SPAN_STEP) * SPAN_STEP)
        mask = self.zeros_or_inf[(self.slots[:S] > pos).long()].view(1, 1, 1, S)

        def attend(cache: LayerKVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k.index_copy_(2, pos, k)  # write slot `pos` of (1, Hkv, S, D)
            cache.v.index_copy_(2, pos, v)
            # GQA without repeating keys: the n_rep query heads that share a kv head sit at one position,
            # so they go in as n_rep "queries" of that kv head, under the same mask row.
            q = q.reshape(1, Hkv, H // Hkv, D)  # (1, Hkv, n_rep, D): query head h -> kv head h // n_rep
            keys, values = cache.k[:, :, :S], cache.v[:, :, :S]  # (1, Hkv, S, D)
            if self.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            else:  # model.py's eager attention, with the mask added
                scores = (q @ keys.transpose(2, 3)) * self.scaling + mask  # (1, Hkv, n_rep, S)
                y = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values  # (1, Hkv, n_rep, D)
            return y.reshape(1, 1, H * D)  # (1, Hkv, n_rep, D) flattens in query-head order h = kv * n_rep + r

        x = F.embedding(self.token, self.model.model.embed_tokens.weight)  # (1, 1, C)
        for i in range(len(self.model.model.layers)):
            x = self._layer(i, x, cos, sin, attend)
        return self._head(x)

    def _check(self, logits: torch.Tensor) -> None:
        """Note NaN/inf logits on the device (a max propagates them); the host reads the flag with the token."""
        self.healthy.mul_(torch.isfinite(logits.amax()).long())

    def _decode_logits(self) -> torch.Tensor:
        """One step; returns the logits (1, V) and advances `pos`. The caller picks the next token."""
        logits = self._forward_one()
        self.pos.add_(1)
        return logits

    def _decode_greedy(self) -> None:
        """One greedy step entirely on the device: the argmax becomes the next step's input token."""
        logits = self._forward_one()
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))
        self._check(logits)
        self.pos.add_(1)

    # -- prefill -------------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, input_pos: int = 0) -> torch.Tensor:
        """Run input_ids (1, T) into the cache at slots [input_pos, input_pos + T) with SDPA (flash on a GPU).

        Returns the last position's logits (1, V) and leaves `pos` at input_pos + T. Shapes change with T,
        so this runs eagerly; it uses the same fused (and packed) weights as the step.
        """
        H, D = self.H, self.D
        T = input_ids.shape[1]
        end = input_pos + T
        cos = self.rope_cos[input_pos:end].view(1, 1, T, D)
        sin = self.rope_sin[input_pos:end].view(1, 1, T, D)
        plain_causal = input_pos == 0 or T == 1  # SDPA's own causal kernels are right then
        mask = None if plain_causal else attention_mask(input_pos, T, None, input_ids.device)  # (1, 1, T, S)

        def attend(cache: LayerKVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[:, :, input_pos:end] = k  # (1, Hkv, T, D) into (1, Hkv, S_max, D)
            cache.v[:, :, input_pos:end] = v
            y = F.scaled_dot_product_attention(q, cache.k[:, :, :end], cache.v[:, :, :end], attn_mask=mask,
                                               is_causal=mask is None and T > 1, scale=self.scaling,
                                               enable_gqa=True)  # (1, H, T, D)
            return y.transpose(1, 2).reshape(1, T, H * D)

        x = F.embedding(input_ids, self.model.model.embed_tokens.weight)  # (1, T, C)
        for i in range(len(self.model.model.layers)):
            x = self._layer(i, x, cos, sin, attend)
        self.pos.fill_(end)
        self.host_pos = end
        return self._head(x)  # only the last position's logits: a (T, V) head would cost more than a layer

    # -- generation ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def warmup(self, settings: SamplingSettings | None = None) -> None:
        """Compile (and on CUDA record the graph of) the decode step now, so the first request is not slow.

        settings: warm up the step these settings use (greedy: argmax inside the graph; otherwise the graph
        that returns logits); None warms up both. Writes garbage into the cache, which is harmless: a later
        prefill overwrites what it needs.
        """
        todo = [settings] if settings is not None else [SamplingSettings(), SamplingSettings(do_sample=True)]
        skips_before = _cudagraph_skips()
        for s in todo:
            self.pos.zero_()
            self.host_pos = 0
            self.token.zero_()
            self.seen.zero_()
            for _ in range(3):  # cudagraph trees record on the second or third call
                self._step(s, None)
        self.pos.zero_()
        self.host_pos = 0
        if self.compiled and self.pos.device.type == "cuda":
            self.cudagraph_skips += _cudagraph_skips() - skips_before
            if self.cudagraph_skips:
                warnings.warn("torch.compile could not capture the decode step as a CUDA graph, so decoding is several "
                              "times slower; run with TORCH_LOGS=cudagraphs to see why", RuntimeWarning, stacklevel=2)

    def fits(self, prompt_len: int, max_new_tokens: int, input_pos: int = 0) -> bool:
        """Whether a prompt of this length plus max_new_tokens fit the cache."""
        return input_pos + prompt_len + max_new_tokens <= self.max_seq_len

    @torch.inference_mode()
    def _start(self, input_ids: torch.Tensor, input_pos: int, settings: SamplingSettings,
               generator: torch.Generator | None, history: list[int] | None = None) -> None:
        """Prefill and choose the first token into `self.token`."""
        self.healthy.fill_(1)
        penalised = input_ids if not history else torch.cat([input_ids.new_tensor([list(history)]), input_ids], 1)
        self.seen.copy_(seen_tokens(penalised, self.seen.shape[1]))  # what the repetition penalty counts
        logits = self.prefill(input_ids, input_pos)  # (1, V)
        self._choose(logits, settings, generator)

    def _choose(self, logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> None:
        """sampling.next_token on the device: the pick becomes the next step's input and is marked seen."""
        self._check(logits)
        ids = next_token(logits, self.seen, settings, generator)  # (1,)
        self.token.copy_(ids.view(1, 1))
        self.seen.scatter_(1, ids.view(1, 1), True)

    @torch.inference_mode()
    def _step(self, settings: SamplingSettings, generator: torch.Generator | None) -> None:
        """Advance one token: the cache gains `self.token`'s keys/values and `self.token` becomes the next one."""
        if settings.is_greedy and settings.repetition_penalty == 1.0:
            self._step_greedy()  # the whole step, argmax included, in one graph
        else:
            self._choose(self._step_logits(), settings, generator)
        self.host_pos += 1

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, settings: SamplingSettings | None = None, *,
                 eos_token_ids: list[int] | tuple[int, ...] | set[int] = (),
                 generator: torch.Generator | None = None, input_pos: int = 0,
                 history: list[int] | None = None) -> Iterator[int]:
        """Yield up to max_new_tokens token ids after the prompt (1, T) or (T,); stops after yielding an eos id.

        settings:  `sampling.SamplingSettings` (a `GenerationConfig` works too); default greedy. Tokens are
                   chosen by `sampling.next_token` on the device, so a seeded `generator` draws what the
                   regular `generate` draws.
        input_pos: the cache already holds this many tokens from an earlier call (a chat's earlier turns);
                   input_ids are the new tokens only. After a call, `self.cached_tokens` says how many it holds.
        history:   ids already in the cache that the repetition penalty counts too (a chat's earlier turns).
        NaN or inf logits raise `MinillamaError` when the token they produced is read.
        Afterwards `self.stop_reason` is "eos" or "length".
        """
        settings = settings or SamplingSettings()
        input_ids = input_ids.reshape(1, -1).to(self.model.device)
        T = input_ids.shape[1]
        if T == 0:
            raise MinillamaError("the prompt is empty; generation needs at least one token")
        if not self.fits(T, max_new_tokens, input_pos):
            raise MinillamaError(f"{input_pos + T} prompt tokens + max_new_tokens={max_new_tokens} exceed the fast "
                                 f"path's cache of {self.max_seq_len} tokens; raise max_seq_len or use fast=False")
        eos = {int(t) for t in eos_token_ids}
        self.stop_reason = None
        self._start(input_ids, input_pos, settings, generator, history)
        self.cached_tokens = input_pos + T
        tokens = self._tokens_pipelined if self.lag else self._tokens_sync
        for i, token_id in enumerate(tokens(max_new_tokens, settings, generator)):
            self.cached_tokens = input_pos + T + i  # the token just yielded is not in the cache yet
            yield token_id
            if token_id in eos or i == max_new_tokens - 1:
                self.stop_reason = "eos" if token_id in eos else "length"
                return

    def _tokens_sync(self, n_tokens: int, settings: SamplingSettings,
                     generator: torch.Generator | None) -> Iterator[int]:
        """CPU: reading a token is a plain memory read, so hand each one over as it comes."""
        for i in range(n_tokens):
            if i > 0:
                self._step(settings, generator)
            self._raise_if_unhealthy(int(self.healthy))
            yield int(self.token)

    def _tokens_pipelined(self, n_tokens: int, settings: SamplingSettings,
                          generator: torch.Generator | None) -> Iterator[int]:
        """GPU: keep `lag` steps queued ahead of the token being handed over.

        Each token is copied to pinned host memory without blocking, and read once its copy event has
        completed, `lag` steps later; the GPU never waits for Python. Steps run past an eos are wasted
        work (at most `lag`), never a stall.
        """
        ring = self.lag + 1
        cuda = self.token.device.type == "cuda"
        host = torch.empty(ring, 2, dtype=torch.long, pin_memory=cuda)  # (ring, [token, healthy]) pinned: async copy
        copied = [torch.cuda.Event() if cuda else None for _ in range(ring)]  # (on CPU the copy is immediate)
        for i in range(n_tokens + self.lag):
            if i < n_tokens:
                if i > 0:
                    self._step(settings, generator)
                with torch.inference_mode():
                    host[i % ring, 0].copy_(self.token[0, 0], non_blocking=cuda)
                    host[i % ring, 1].copy_(self.healthy[0], non_blocking=cuda)
                if cuda:
                    copied[i % ring].record()
            j = i - self.lag  # the token whose copy was queued `lag` steps ago
            if 0 <= j < n_tokens:
                if cuda:
                    copied[j % ring].synchronize()
                self._raise_if_unhealthy(int(host[j % ring, 1]))
                yield int(host[j % ring, 0])


    @staticmethod
    def _raise_if_unhealthy(healthy: int) -> None:
        if not healthy:
            raise MinillamaError("the model produced NaN or infinite logits; its weights or the dtype do not work "
                                 "(try float32)")


def fast_path_applies(model: LlamaForCausalLM) -> bool:
    """Whether a FastDecoder can run this model: its RoPE table is computed once, which dynamic NTK
    scaling (frequencies that change with the sequence length) does not allow."""
    return model.config.rope_type != "dynamic"


def decoder_for(model: LlamaForCausalLM, seq_len: int, **kwargs) -> FastDecoder:
    """The model's FastDecoder with room for seq_len tokens, made once and kept on the model.

    Built again (and compiled again) only when a request needs more room or other options; the new cache
    length rounds up to a multiple of 1024 (at most the model's context), so growing prompts rebuild rarely.
    kwargs go to FastDecoder (compile, fuse, pack, lag).
    """
    decoder = getattr(model, "_minillama_fast_decoder", None)
    if decoder is not None and decoder.max_seq_len >= seq_len and decoder.options == kwargs:
        return decoder
    context = model.config.max_position_embeddings
    if seq_len > context:
        raise MinillamaError(f"{seq_len} tokens exceed the model's context of {context}")
    max_seq_len = min(context, -(-seq_len // 1024) * 1024)
    decoder = FastDecoder(model, max_seq_len, **kwargs)
    decoder.options = dict(kwargs)
    object.__setattr__(model, "_minillama_fast_decoder", decoder)  # a plain attribute: not a submodule
    return decoder
