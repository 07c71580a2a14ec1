"""Save every activation of one forward pass to a safetensors file, with a JSON summary beside it.

    summary = minillama.dump_activations(model, input_ids, "acts.safetensors", names=["*.resid_post"])

Tensors go to disk one by one as the forward computes them (`SafetensorsStreamWriter`), so memory
holds one activation at a time however long the prompt. Next to the file, `FILE.summary.json` lists
each tensor's name, shape, dtype and statistics, like transformers' model debugger. `minillama dump`
is the command-line front end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from minillama.capture import capture, select
from minillama.errors import MinillamaError
from minillama.files import partial_path
from minillama.model import LlamaForCausalLM

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time, without holding them all in memory.

    A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range),
    then the tensors' bytes back to back. The header comes first but is known only at the end, so
    room for it is reserved up front (the format allows padding it with spaces) and filled in by `close`.
    """

    def __init__(self, path: Path, keys: list[str]):
        self.path = path
        self.header: dict[str, Any] = {}
        # Generous room per entry: '"name": {"dtype": "BF16", "shape": [...], "data_offsets": [a, b]}'.
        self.reserved = 8 * ((sum(len(json.dumps(k)) + 200 for k in keys) + 4096) // 8 + 1)
        self.file = open(path, "wb")
        self.file.write(b"\0" * (8 + self.reserved))
        self.offset = 0

    def add(self, key: str, x: torch.Tensor) -> None:
        if key in self.header:
            raise MinillamaError(f"{key} was captured twice; dump records a single forward pass")
        if x.dtype not in ST_DTYPES:
            raise MinillamaError(f"{key}: cannot store dtype {x.dtype} in safetensors")
        data = x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.header[key] = {"dtype": ST_DTYPES[x.dtype], "shape": list(x.shape),
                            "data_offsets": [self.offset, self.offset + data.size]}
        self.offset += data.size

    def close(self, metadata: dict[str, str] | None = None) -> None:
        header = dict(self.header)
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > self.reserved:
            raise MinillamaError(f"{self.path}: header ({len(text)} bytes) outgrew its reserved room")
        self.file.seek(0)
        self.file.write(self.reserved.to_bytes(8, "little") + text + b" " * (self.reserved - len(text)))
        self.file.close()


def tensor_summary(key: str, x: torch.Tensor) -> dict[str, Any]:
    """Name, shape, dtype and mean/std/min/max (over the finite entries; masked scores hold -inf)."""
    values = x.detach().float()
    finite = torch.isfinite(values)
    nonfinite = int((~finite).sum())
    if nonfinite:
        values = values[finite]
    entry: dict[str, Any] = {"name": key, "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
    if values.numel():
        entry.update(mean=values.mean().item(), std=values.std(correction=0).item(),
                     min=values.min().item(), max=values.max().item())
    else:
        entry.update(mean=None, std=None, min=None, max=None)
    entry["nonfinite"] = nonfinite
    return entry


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".summary.json")


def dump_activations(model: LlamaForCausalLM, input_ids: torch.Tensor, out: str | Path,
                     names: list[str] | None = None, force: bool = False,
                     metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one forward over input_ids (1, T), writing the named activations to `out` as they come.

    Writes `out` (safetensors) and its summary JSON, and returns the summary. Refuses to replace an
    existing file unless `force`; a failed run leaves no partial file behind.
    """
    out = Path(out)
    for path in (out, summary_path(out)):
        if path.exists() and not force:
            raise MinillamaError(f"{path} exists; pass force=True to overwrite it")
    keys = [t.key for targets in select(model, names).values() for t in targets]
    tmp = partial_path(out)  # a fresh name: never a file of the user's called X.partial
    writer = SafetensorsStreamWriter(tmp, keys)
    tensors: list[dict[str, Any]] = []

    def write(key: str, x: torch.Tensor) -> None:
        tensors.append(tensor_summary(key, x))  # on the model's device, before the copy to disk
        writer.add(key, x)

    try:
        with torch.no_grad(), capture(model, names, callback=write):
            model(input_ids)
        meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()}
        writer.close({"format": "pt", "input_ids": json.dumps(input_ids.tolist()), **meta})
        os.replace(tmp, out)
    except BaseException:
        writer.file.close()
        tmp.unlink(missing_ok=True)
        raise
    summary = {"file": out.name, **(metadata or {}), "input_ids": input_ids[0].tolist(), "tensors": tensors}
    summary_path(out).write_text(summary_json(summary), encoding="utf-8")
    return summary


def summary_json(summary: dict[str, Any]) -> str:
    """The summary as JSON with one line per tensor, so it reads well in a pager and diffs well."""
    head = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in summary.items() if k != "tensors"]
    tensors = [f"  {json.dumps(t)}" for t in summary["tensors"]]
    return "{\n" + ",\n".join(head) + ',\n "tensors": [\n' + ",\n".join(tensors) + "\n ]\n}\n"
