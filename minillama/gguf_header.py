"""Checking a GGUF file's header against the file before the `gguf` reader touches it.

The `gguf` package trusts every count in the header: a 67-byte file whose one metadata array claims 2**62
items makes its reader loop and allocate without end. So we walk the header first, with nothing but
`struct` over the bytes, and check every count and length against the bytes left before reading on:

    magic "GGUF", version (2 or 3), tensor count, metadata count
    metadata entries: key (a string), value type, value (scalars, strings, arrays of either)
    tensor infos: name, dimension count and sizes, tensor type, data offset

Strings must be UTF-8, keys and tensor names unique, value and tensor types known, and each tensor's data
must lie inside the file. A problem is one `MinillamaError` line naming the file and the offset.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf

from minillama.errors import MinillamaError

# GGUFValueType -> struct format of one scalar (8 = string and 9 = array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
MAX_NAME_BYTES = 64 * 1024  # a key or tensor name (real ones: < 100 bytes)


class _Cursor:
    """Reads little- or big-endian values off the header, refusing to run past the end of the file."""

    def __init__(self, data: mmap.mmap | bytes, path: Path):
        self.data, self.path, self.pos, self.order = data, path, 0, "<"

    def fail(self, why: str) -> MinillamaError:
        return MinillamaError(f"{self.path}: not a valid GGUF file ({why}, at byte {self.pos}); re-download it")

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(f"{what} needs {n:,} bytes but only {self.left():,} are left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        return struct.unpack(self.order + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n:,} bytes long (limit {limit:,})")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_value(self, kind: int, what: str, in_array: bool = False) -> None:
        if kind in _SCALARS:
            self.take(struct.calcsize(_SCALARS[kind]), what)
        elif kind == _STRING:
            self.take(self.scalar("Q", f"the length of {what}"), what)
        elif kind == _ARRAY and not in_array:
            item = self.scalar("I", f"the item type of {what}")
            count = self.scalar("Q", f"the item count of {what}")
            smallest = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8 if item == _STRING else None
            if smallest is None:
                raise self.fail(f"{what} is an array of unsupported type {item}")
            if count * smallest > self.left():  # checked before a single item is read
                raise self.fail(f"{what} claims {count:,} items, more than the {self.left():,} bytes left")
            if item in _SCALARS:
                self.take(count * smallest, what)
            else:
                for _ in range(count):
                    self.take(self.scalar("Q", f"the length of an item of {what}"), what)
        else:
            raise self.fail(f"{what} has unsupported value type {kind}")


def _supported_tensor_types() -> set[int]:
    """Tensor types `convert_gguf` can turn into floats: F32, F16 and what gguf's dequantizer knows."""
    kinds = gguf.GGMLQuantizationType
    known = set(getattr(gguf.quants, "_type_traits", {}))  # registry of dequantizers (BF16, Q4_0, Q8_0, K-quants, ...)
    return {int(k) for k in known | {kinds.F32, kinds.F16}}


def _check_tensor_infos(cur: _Cursor, count: int) -> list[tuple[str, int, int]]:
    """Read the tensor infos; returns (name, data offset, byte size) per tensor."""
    supported, names, infos = _supported_tensor_types(), set(), []
    if count * 24 > cur.left():  # a name length, a dim count, a type and an offset at the least
        raise cur.fail(f"header claims {count:,} tensors, more than the file can hold")
    for i in range(count):
        name = cur.string(f"the name of tensor {i}", MAX_NAME_BYTES)
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.scalar("I", f"the dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
        dims = [cur.scalar("Q", f"a dimension of {name}") for _ in range(n_dims)]
        kind = cur.scalar("I", f"the type of {name}")
        offset = cur.scalar("Q", f"the data offset of {name}")
        if kind not in supported:
            label = gguf.GGMLQuantizationType(kind).name if kind in gguf.GGMLQuantizationType._value2member_map_ \
                else str(kind)
            raise MinillamaError(f"{cur.path}: tensor {name!r} has type {label}, which minillama cannot convert "
                                 "(it reads F32, F16, BF16 and llama.cpp's quantized types such as Q8_0 and Q4_K)")
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        elements = 1
        for d in dims:
            elements *= d
        if dims[0] % block:
            raise cur.fail(f"tensor {name!r} has rows of {dims[0]} values, not a multiple of its block of {block}")
        infos.append((name, offset, elements // block * type_size))
    return infos


def check_gguf_header(path: str | Path) -> None:
    """Walk the whole header of a GGUF file and check it against the file (see the module docstring)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise MinillamaError(f"{path}: {size} bytes is too short to be a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cur = _Cursor(data, path)
            if cur.take(4, "the magic") != b"GGUF":
                raise MinillamaError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
            version = cur.scalar("I", "the version")
            if version & 0xFFFF == 0:  # written on a big-endian machine
                cur.order = ">"
                version = struct.unpack(">I", struct.pack("<I", version))[0]
            if version not in (2, 3):
                raise MinillamaError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors = cur.scalar("Q", "the tensor count")
            n_keys = cur.scalar("Q", "the metadata count")
            if n_keys * 13 > cur.left():  # a key length, a one-byte key, a type and a one-byte value at the least
                raise cur.fail(f"header claims {n_keys:,} metadata entries, more than the file can hold")
            keys: set[str] = set()
            alignment = 32
            for i in range(n_keys):
                key = cur.string(f"metadata key {i}", MAX_NAME_BYTES)
                if key in keys:
                    raise cur.fail(f"metadata key {key!r} appears twice")
                keys.add(key)
                kind = cur.scalar("I", f"the value type of {key!r}")
                if key == "general.alignment" and kind == 4:
                    alignment = cur.scalar("I", key)
                    if alignment == 0 or alignment & (alignment - 1):
                        raise cur.fail(f"general.alignment {alignment} is not a power of two")
                else:
                    cur.skip_value(kind, f"metadata {key!r}")
            infos = _check_tensor_infos(cur, n_tensors)
            start = -(-cur.pos // alignment) * alignment
            for name, offset, nbytes in infos:
                if start + offset + nbytes > size:
                    raise MinillamaError(f"{path}: tensor {name!r} lies past the end of the file "
                                         f"(needs {start + offset + nbytes:,} bytes, the file has {size:,}); "
                                         "the file is truncated, re-download it")
