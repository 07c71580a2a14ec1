"""Tensor parallelism: one model across several processes, each holding a slice of every large matrix.

Megatron's layout, as in gpt-fast's tp.py: model.py's own modules run on every rank, sharded in place.

    q/k/v, gate/up    split by output rows: whole heads (and whole MLP channels) per rank
    o_proj, down_proj split by input columns; each rank's partial sums are added by one all-reduce
    embed_tokens      vocab-parallel: each rank holds V/N rows, looks up the ids it holds, all-reduce
    lm_head           vocab-parallel: each rank scores its V/N tokens, all-gather of the logits
    norms, RoPE       replicated (small)

So per layer and token there are exactly two all-reduces (after o_proj and after down_proj), of the hidden
state (B, T, C); the residual stream is whole and identical on every rank. Key/value heads are split like
the query heads, or, when there are fewer of them than ranks, each rank holds the one head its query heads
read (a kv head is then replicated on N / Hkv ranks). Attention runs on the rank's heads only: tp.py sets
`LlamaAttention.num_heads` / `num_key_value_heads` to the local counts, and the KV cache follows them.

Communication is torch's own functional collectives (`torch.distributed._functional_collectives`): forward
hooks on o_proj, down_proj and lm_head, which torch.compile traces into the compiled decode step; each result
is waited for at once (the next operation needs it anyway). NCCL on CUDA, gloo on CPU. Each rank reads only
its own slices of the checkpoint (`safe_open(...).get_slice`), one tensor at a time, so no rank ever holds
the whole model.

    torch.distributed.init_process_group(...)   # or minillama.tp.init() under torchrun
    model = minillama.load_model(path, tp=True)  # this rank's shard; every rank runs the same calls
    minillama.generate(model, ids, generator=minillama.tp.same_generator(model.device, seed=0))

Every rank must make the same calls with the same inputs, and sample with the same seed, so that every
rank picks the same token (the logits are identical on every rank after the all-gather).
Running it, and the memory per rank: docs/tensor-parallel.md.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from minillama.config import LlamaConfig
from minillama.errors import MinillamaError

DEFAULT_TIMEOUT_S = 600  # a rank that waits this long for the others gives up (MINILLAMA_TP_TIMEOUT overrides)


# ---- The process group --------------------------------------------------------------------------------

def init(timeout_s: float | None = None) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment):
    NCCL with one GPU per process (LOCAL_RANK) when there is CUDA, gloo for CPU tensors. Collectives that wait
    longer than `timeout_s` (default MINILLAMA_TP_TIMEOUT or 600 s) fail instead of hanging when a rank dies."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        raise MinillamaError("tensor parallelism needs a process group: launch with torchrun --nproc-per-node N")
    timeout_s = timeout_s or float(os.environ.get("MINILLAMA_TP_TIMEOUT", DEFAULT_TIMEOUT_S))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # With CUDA: NCCL for CUDA tensors, gloo for CPU ones (a --device cpu model, the chat's input lines).
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the process group (after every rank is done)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def same_generator(device: torch.device, seed: int | None = None) -> torch.Generator:
    """A sampling generator seeded alike on every rank (rank 0 draws the seed when none is given)."""
    from minillama.sampling import make_generator

    return make_generator(device, seed if seed is not None else common_seed())


def common_seed() -> int:
    """A fresh random seed, drawn by rank 0 and sent to every rank."""
    box = [random.SystemRandom().randrange(2**63) if rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def lost_rank_reason(error: BaseException) -> str:
    """The gist of a failed collective's message ("Connection reset by peer", "Timed out ..."), one line."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line  # gloo's [file:line]
    return line.split(". This is typically")[0]


def lost_rank(error: BaseException) -> bool:
    """Whether an exception is a collective that failed because another rank exited or stopped answering."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in ("gloo", "NCCL", "Connection closed",
                                                                          "Timed out", "timed out")))


# ---- The layout: which slice of each tensor a rank holds ---------------------------------------------

@dataclass(frozen=True)
class Layout:
    """This rank's share of the model. Ranges are [start, start + count) in heads, channels or tokens."""

    rank: int
    world: int
    head_dim: int
    heads: int            # query heads per rank
    kv_heads: int         # key/value heads per rank
    kv_start: int         # this rank's first key/value head
    mlp: int              # MLP channels per rank
    vocab: int            # embedding rows (tokens) per rank; the whole vocabulary when replicated
    vocab_parallel: bool  # False: embedding and head replicated (the vocabulary does not split evenly)

    def slices(self, name: str, shape: list[int]) -> tuple[slice, ...]:
        """The index of this rank's part of the checkpoint tensor `name` (full shape `shape`)."""
        r, D = self.rank, self.head_dim
        rows = lambda start, count: (slice(start, start + count),)  # noqa: E731
        cols = lambda start, count: (slice(None), slice(start, start + count))  # noqa: E731
        if ".q_proj." in name:
            return rows(r * self.heads * D, self.heads * D)
        if ".k_proj." in name or ".v_proj." in name:
            return rows(self.kv_start * D, self.kv_heads * D)
        if ".gate_proj." in name or ".up_proj." in name:
            return rows(r * self.mlp, self.mlp)
        if name.endswith("o_proj.weight"):
            return cols(r * self.heads * D, self.heads * D)
        if name.endswith("down_proj.weight"):
            return cols(r * self.mlp, self.mlp)
        if name in ("model.embed_tokens.weight", "lm_head.weight") and self.vocab_parallel:
            return rows(r * self.vocab, self.vocab)
        return (slice(None),) * len(shape)  # norms, and the biases of o_proj/down_proj (see read_slice)

    def read_slice(self, name: str, tensor_slice) -> torch.Tensor:
        """This rank's part of one checkpoint tensor, from its safetensors slice (only those rows are read).

        The biases of o_proj and down_proj are added after the all-reduce sums the ranks' parts, so only
        rank 0 keeps them; the others add zeros.
        """
        shape = tensor_slice.get_shape()
        part = tensor_slice[self.slices(name, shape)]
        if self.rank != 0 and name.endswith(("o_proj.bias", "down_proj.bias")):
            part = torch.zeros_like(part)
        return part


def layout(config: LlamaConfig, rank: int, world: int) -> Layout:
    """How `config`'s model splits across `world` ranks; a one-line error when it cannot."""
    H, Hkv, F_, V = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size,
                     config.vocab_size)
    if world > H:
        raise MinillamaError(f"the model has {H} attention heads, fewer than the {world} ranks: "
                             f"run it on at most {H} processes")
    if H % world:
        raise MinillamaError(f"{H} attention heads do not split evenly across {world} ranks; "
                             f"use a number of processes that divides {H}")
    if Hkv % world and world % Hkv:
        raise MinillamaError(f"{Hkv} key/value heads cannot be shared by {world} ranks (the world size must "
                             f"divide {Hkv} or be a multiple of it)")
    if F_ % world:
        raise MinillamaError(f"the MLP's {F_} channels do not split evenly across {world} ranks")
    heads = H // world
    if Hkv >= world:  # split like the query heads
        kv_heads, kv_start = Hkv // world, rank * (Hkv // world)
    else:  # fewer kv heads than ranks: each rank holds the one its query heads read
        kv_heads, kv_start = 1, rank * heads // (H // Hkv)
    vocab_parallel = V % world == 0
    return Layout(rank, world, config.head_dim, heads, kv_heads, kv_start, F_ // world,
                  V // world if vocab_parallel else V, vocab_parallel)


# ---- Sharding the model in place ----------------------------------------------------------------------

class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding rows [start, start + num_embeddings) of the vocabulary: ids outside that range
    give zeros here, and the all-reduce adds the one rank's row that holds each id (exactly: the others add 0).
    The name and `weight` key are the embedding's own, so the checkpoint loads into it unchanged."""

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int, group: dist.ProcessGroup, **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start  # (B, T)
        here = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)  # (B, T, C)
        return funcol.wait_tensor(funcol.all_reduce(x.masked_fill(~here[..., None], 0), "sum", self.group))

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.start + self.num_embeddings}) of the vocabulary, {self.embedding_dim}"


def shard_model(model: nn.Module, plan: Layout, group: dist.ProcessGroup) -> None:
    """Give a model built on the meta device this rank's shapes, before its weights are loaded: Linears get
    their local sizes, attention its local head counts, the embedding its vocabulary rows."""
    C, D = model.config.hidden_size, plan.head_dim
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.num_heads, attn.num_key_value_heads = plan.heads, plan.kv_heads  # read by forward's .view
        _resize(attn.q_proj, plan.heads * D, C)
        _resize(attn.k_proj, plan.kv_heads * D, C)
        _resize(attn.v_proj, plan.kv_heads * D, C)
        _resize(attn.o_proj, C, plan.heads * D)
        _resize(mlp.gate_proj, plan.mlp, C)
        _resize(mlp.up_proj, plan.mlp, C)
        _resize(mlp.down_proj, C, plan.mlp)
    if plan.vocab_parallel:
        rows = torch.empty(plan.vocab, C, device="meta")  # given, so no random init (which imports dynamo)
        model.model.embed_tokens = VocabParallelEmbedding(plan.vocab, C, plan.rank * plan.vocab, group, _weight=rows)
        _resize(model.lm_head, plan.vocab, C)


def _resize(linear: nn.Linear, out_features: int, in_features: int) -> None:
    """A meta Linear with this rank's shape (its values come from the checkpoint)."""
    linear.out_features, linear.in_features = out_features, in_features
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"))
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.empty(out_features, device="meta"))


def connect(model: nn.Module, plan: Layout, group: dist.ProcessGroup) -> None:
    """The collectives, as forward hooks on the (possibly packed) Linears: an all-reduce of o_proj's and
    down_proj's partial sums, an all-gather of the head's vocabulary slices. Call after any module swap."""
    def all_reduce(module, args, out):
        return funcol.wait_tensor(funcol.all_reduce(out, "sum", group))

    def all_gather_vocab(module, args, out):  # (B, T, V/N) on each rank -> (B, T, V) on every rank
        return funcol.wait_tensor(funcol.all_gather_single(out.contiguous(), out.ndim - 1, group))

    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(all_reduce)
        layer.mlp.down_proj.register_forward_hook(all_reduce)
    if plan.vocab_parallel:
        model.lm_head.register_forward_hook(all_gather_vocab)
    model.tp_layout = plan


def setup(config: LlamaConfig, device: torch.device) -> tuple[Layout, dist.ProcessGroup]:
    """This rank's layout, after checking that a usable process group exists."""
    if not dist.is_initialized():
        raise MinillamaError("tp=True needs an initialised torch.distributed process group: run under torchrun "
                             "and call minillama.tp.init() (or torch.distributed.init_process_group) first")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise MinillamaError(f"the process group uses NCCL, which needs CUDA tensors, but the model is on {device}")
    return layout(config, dist.get_rank(), dist.get_world_size()), dist.group.WORLD
