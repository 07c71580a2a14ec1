"""How much memory a device has left, and a check before a large allocation.

A model's own files size some buffers: `max_position_embeddings` and `max_new_tokens` set how many slots a
KV cache has, `head_dim` how wide each is. A hostile or careless file can ask for terabytes; allocating
that fails with a traceback deep in torch (or, on Linux, gets the process killed). `check_allocation` is
called before such buffers are made and turns "too big for this machine" into one line that says what to
lower. Available memory is the smallest of what applies:

- CUDA: free memory on the device, plus what torch's caching allocator holds but does not use;
- CPU: MemAvailable from /proc/meminfo (or physical pages from sysconf), the cgroup's memory.max minus
  memory.current (containers), and RLIMIT_AS minus the address space in use (`ulimit -v`).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from minillama.errors import MinillamaError

# Leave this share of the available memory for activations, the allocator's slack and everything else.
HEADROOM = 0.9


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), if it has a limit."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split(":", 2)[2]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError, IndexError):
        return None


def _address_space_available() -> int | None:
    """RLIMIT_AS (`ulimit -v`) minus the address space this process already uses."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes that can still be allocated on `device` (default: CPU); None when unknown (meta, mps)."""
    device = torch.device(device if device is not None else torch.get_default_device())
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    known = [n for n in (_meminfo_available(), _cgroup_available(), _address_space_available()) if n is not None]
    return max(min(known), 0) if known else None


def check_allocation(nbytes: int, what: str, device: torch.device | str | None = None, hint: str = "") -> None:
    """Raise a one-line `MinillamaError` when `nbytes` would not fit in the memory `device` has left."""
    available = available_bytes(device)
    if available is not None and nbytes > HEADROOM * available:
        device = torch.device(device if device is not None else torch.get_default_device())
        raise MinillamaError(f"{what} needs {nbytes / 1024**3:,.1f} GiB but {device} has "
                             f"{available / 1024**3:,.1f} GiB available{'; ' + hint if hint else ''}")


def check_kv_cache(n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, device: torch.device | str | None) -> None:
    """A KV cache's keys and values (2 x L x B x Hkv x S x D), plus the fp32 RoPE angles whoever fills it
    computes for up to S positions (about 4 x S x D x 4 bytes at once), must fit the device."""
    nbytes = 2 * n_layers * batch_size * n_kv_heads * max_seq_len * head_dim * dtype.itemsize
    nbytes += 16 * max_seq_len * head_dim
    check_allocation(nbytes, f"a KV cache of {max_seq_len:,} tokens", device,
                     "lower max_new_tokens (--max-new-tokens) or the context (--context)")
