"""Loading a Hugging Face checkpoint directory into `LlamaForCausalLM`.

The model is built on the meta device (no memory), then each tensor is read from safetensors straight
onto the target device, cast, and assigned in place, so no second full copy ever sits in host memory.
Only safetensors is read: pickled `.bin` / `.pth` weights can run code when loaded, and are refused.
"""

from __future__ import annotations

import contextlib
import gc
import math
import struct
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from safetensors import SafetensorError, safe_open

from minillama import quant
from minillama.config import LlamaConfig, check_generation_file
from minillama.errors import MinillamaError, read_json_object
from minillama.files import parse_json, read_json
from minillama.generation import GenerationConfig
from minillama.model import LlamaForCausalLM, LlamaRotaryEmbedding
from minillama.packing import Stacker, can_pack, pack_linears, pack_weight

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when there is one, else CPU; a clear error for what cannot work."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MinillamaError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinillamaError("CUDA was requested but this machine has no usable CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MinillamaError(f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MinillamaError("MPS was requested but is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise MinillamaError(f"unsupported device {str(device)!r}; use cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, config: LlamaConfig, device: torch.device) -> torch.dtype:
    """The requested dtype; by default the checkpoint's own on CUDA (bf16 if unknown), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(config.torch_dtype or "bfloat16", torch.bfloat16)
    if dtype not in DTYPES:
        raise MinillamaError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError):
            raise MinillamaError(f"{index}: not a valid shard index (needs a 'weight_map' object); "
                                 "re-download the model") from None
        for name in shards:
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise MinillamaError(f"{index}: shard name {name!r} is not a plain file name")
            if not (model_dir / name).is_file():
                raise MinillamaError(f"{index}: names shard {name}, which is missing; re-download the model")
        return [model_dir / name for name in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")) or any(model_dir.glob("*.pt")):
        raise MinillamaError(f"{model_dir}: has only pickled weights (.bin/.pth), which can run code when loaded "
                             "and are never read by minillama; use a safetensors copy of the model")
    raise MinillamaError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")


def check_safetensors_header(path: Path) -> dict:
    """Validate a safetensors header against the file size before reading any tensor.

    A truncated or corrupted file, or one whose header lies about sizes, is caught here with a
    message naming the file, instead of a crash or a huge allocation later.
    """
    size = path.stat().st_size

    def bad(why: str) -> MinillamaError:
        return MinillamaError(f"{path}: corrupted or truncated safetensors file ({why}); re-download it")

    if size < 8:
        raise bad("shorter than its 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            raise bad(f"header length {n} exceeds the file")
        try:
            header = parse_json(f.read(n), f"{path} header")
        except MinillamaError:
            raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = math.prod(shape) * _ST_DTYPE_BYTES[dtype]
            valid = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and end - begin == nbytes
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise bad(f"tensor {name!r} has an invalid entry")
        end_max = max(end_max, end)
    if 8 + n + end_max > size:
        raise bad(f"data needs {8 + n + end_max} bytes, file has {size}")
    return header


def read_weights(model_dir: Path, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype,
                 pack: bool = False, shard: Callable[[str, Any], torch.Tensor] | None = None,
                 expected: dict[str, tuple[int, ...]] | None = None,
                 stacker: Stacker | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the (meta) model expects, read from the checkpoint onto `device`, floats cast to `dtype`.

    expected: name -> shape (default: the model's parameters; a quantized checkpoint's come from `quant`).
    Missing, unexpected and mis-shaped tensors are collected and reported in one error; NaN/inf is refused.
    pack: Linear weights come back in oneDNN's layout (`packing.pack_weight`) and nothing stays memory-mapped,
    so the packed copy is the only one in memory, even at the peak.
    shard: `shard(name, safetensors_slice)` gives the part of each tensor to keep (tensor parallelism:
    `tp.Layout.read_slice`); only that part is read, one tensor at a time. Shapes are checked whole.
    stacker: (with pack) takes the weights of the Linears that `pack_linears` stacks (q/k/v, gate/up) and packs
    each group once; those are then not in the returned state.
    """
    config = model.config
    if expected is None:
        expected = {name: p.shape for name, p in model.named_parameters()}  # tied lm_head is listed once
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for file in weight_files(model_dir):
        check_safetensors_header(file)
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    tied_head = name == "lm_head.weight" and config.tie_word_embeddings
                    if name.endswith("rotary_emb.inv_freq") or tied_head:
                        continue  # recomputed from config / shared with the embedding
                    if name not in expected:
                        problems.append(f"unexpected tensor {name}")
                        continue
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[name]):
                        problems.append(f"{name} has shape {list(shape)} but config.json implies "
                                        f"{list(expected[name])}")
                        continue
                    if pack or shard:
                        state[name] = file
                        continue
                    t = f.get_tensor(name)
                    state[name] = t.to(dtype) if t.is_floating_point() else t  # int8/int4 weights stay so
            for name in [n for n, t in state.items() if t is file]:
                # One tensor at a time from its own mapping, copied out (packed or cloned): the file's pages
                # never pile up in this process's memory next to the packed copies.
                with safe_open(file, framework="pt", device=str(device) if shard is None else "cpu") as f:
                    if shard is None:
                        t = f.get_tensor(name).to(dtype)
                    else:  # a view of the mapped file: copy out just this rank's part
                        t = shard(name, f.get_slice(name)).to(device=device, dtype=dtype, copy=True)
                _refuse_nan_or_inf(model_dir, name, t)
                if stacker is not None and stacker.add(name, t):
                    del state[name]
                    continue
                state[name] = pack_weight(t) if pack and name in linears else t if shard else t.clone()
        except SafetensorError as e:
            raise MinillamaError(f"{file}: cannot read safetensors ({e}); re-download it") from None
    stacked = set() if stacker is None else stacker.stacked()
    problems += [f"missing tensor {name}" for name in expected if name not in state and name not in stacked]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise MinillamaError(f"{model_dir}: weights do not match config.json: {shown}")
    if not (pack or shard):
        for name, t in state.items():
            _refuse_nan_or_inf(model_dir, name, t)
    return state


def _refuse_nan_or_inf(model_dir: Path, name: str, t: torch.Tensor) -> None:
    if _holds_nan_or_inf(t):
        raise MinillamaError(f"{model_dir}: tensor {name} holds NaN or inf values; the checkpoint is broken")


def _holds_nan_or_inf(t: torch.Tensor) -> bool:
    """NaN and +-inf propagate into a tensor's min/max, so two extremes tell: one pass, no tensor-sized
    temporary, no overflow (a float32 sum of huge finite values can overflow, and summing bf16 into float32
    ran ~20x slower on CPU: 1.5 s for a 1B model's weights)."""
    if not t.is_floating_point() or t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t)
    return not bool(torch.isfinite(lo) & torch.isfinite(hi))


@contextlib.contextmanager
def _no_init():
    """Skip the random initialisation of parameters that the checkpoint overwrites anyway.

    On the meta device it computes nothing, but nn.Embedding's normal_() on meta pulls in torch._dynamo
    the first time, which costs ~1 s of a load.
    """
    saved = {name: getattr(nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


@contextlib.contextmanager
def _gc_paused():
    """Building ~400 modules and ~300 tensors allocates enough objects to start a full garbage collection
    over everything torch imported (~0.08 s, most of a small model's load); nothing here is garbage, so
    collection waits until the load is done."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, pack: bool = False, tp: bool = False,
               quantize: str | None = None, group_size: int | None = None) -> LlamaForCausalLM:
    """Load a Hugging Face Llama checkpoint directory; the model comes back in eval mode.

    device:     "cpu", "cuda", ... (default: CUDA if present, else CPU).
    dtype:      "float32", "bfloat16", "float16" (default: the checkpoint's on a GPU, float32 on CPU).
    pack:       swap the Linears for `packing.PackedLinear` (oneDNN layout) where that applies (CPU, float32):
                faster bs=1 decoding (oneDNN streamed weights ~1.5x faster than MKL here), the same names and
                state_dict, rounding-level differences (~1e-6).
                Elsewhere it does nothing, and a quantized model is not packed (its kernels read their own
                layouts). Off by default: a plain load is the exact reference.
    tp:         tensor parallelism: this rank's shard of the model (`minillama.tp`), inside an initialised
                torch.distributed process group in which every rank makes the same calls. Each rank reads only
                its own slices of the files. On CUDA the device defaults to the process's current GPU.
    quantize:   None: the weights as the directory holds them (float, or a quantized directory's int8/int4);
                "int8" / "int4": quantize a float checkpoint's Linears as it loads (`quant.quantize_model`, CPU);
                "none": float weights, dequantizing a quantized directory.
    group_size: int4's group size (32, 64, 128; default 32), or int8 groups instead of one scale per channel.
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise MinillamaError(f"{model_dir}: not a directory; pass a model directory or a hub id")
    config = LlamaConfig.from_file(model_dir)
    device = resolve_device(device)
    if tp and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # one GPU per rank (tp.init sets it)
    dtype = resolve_dtype(dtype, config, device)
    quantized = _check_quantize(model_dir, quantize, group_size, tp)
    plan = group = None
    if tp:
        from minillama import tp as tensor_parallel  # torch.distributed is imported only when used

        plan, group = tensor_parallel.setup(config, device)

    with _gc_paused():
        with torch.device("meta"), _no_init():  # parameters without storage: filled from the checkpoint
            model = LlamaForCausalLM(config)
        stored = {}
        if quantized:
            header = {k: v for file in weight_files(model_dir) for k, v in check_safetensors_header(file).items()}
            stored = quant.stored_formats(model, header)
        pack = pack and can_pack(device, dtype) and not quantized and quantize not in quant.MODES
        stacker = Stacker(model) if pack else None  # q/k/v and gate/up: one packed stack per group
        state = read_weights(model_dir, model, device, dtype, pack=pack, shard=plan and plan.read_slice,
                             expected=quant.expected_shapes(model, stored), stacker=stacker)
        if quantize == "none":
            quant.dequantize_state(state, stored, dtype)
        elif stored:
            quant.use_stored_formats(model, stored, device, dtype)
        if tp:
            tensor_parallel.shard_model(model, plan, group)  # this rank's shapes, so the slices load in place
        model.load_state_dict(state, strict=False, assign=True)
        del state  # the model holds the tensors now; packing below frees each one it replaces
        if config.tie_word_embeddings:
            quant.tie_head(model)
        model.model.rotary_emb = LlamaRotaryEmbedding(config, device=device)  # buffers are not in checkpoints
        if pack:
            pack_linears(model, stacks=stacker.stacks)  # the Linears hold packed weights: make them PackedLinears
        if tp:
            tensor_parallel.connect(model, plan, group)  # the collectives, as hooks on the final modules
        if quantize in quant.MODES:
            quant.quantize_model(model, quantize, group_size)
    # The model's own generation defaults (eos ids, sampling), which `generate` uses unless given others,
    # as transformers' `model.generation_config`.
    check_generation_file(model_dir)
    model.generation_config = GenerationConfig.from_model_dir(model_dir)
    return model.eval()


def _check_quantize(model_dir: Path, quantize: str | None, group_size: int | None, tp: bool):
    """load_model's quantization arguments, checked against what the directory holds; returns its stored
    quantization config (None for float weights)."""
    if quantize not in (None, "none", *quant.MODES):
        raise MinillamaError(f"unknown quantization {quantize!r}; use int8, int4 or none")
    if group_size is not None and quantize not in quant.MODES:
        raise MinillamaError("a group size needs quantize int8 or int4")
    quantized = quant.read_quantization_config(read_json_object(model_dir / "config.json"),
                                               str(model_dir / "config.json"))
    if quantized and quantize in quant.MODES:
        raise MinillamaError(f"{model_dir}: already holds quantized weights; load it as it is (no quantize), "
                             "or dequantized (quantize 'none')")
    if tp and (quantize in quant.MODES or quantized):
        raise MinillamaError("tensor parallelism and int8/int4 weights do not combine yet; use one of them")
    return quantized
