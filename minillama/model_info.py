"""A tour of a model directory: files, config, quantization, sampling defaults, special tokens, modules, parameters.

`inspect_model(model_dir)` gathers everything into one JSON-ready dict; `format_report` turns it
into the text `minillama inspect` prints (the module is not called `inspect`, which would shadow the
standard library's). Also the prompt helpers the inspection tools share (`encode_prompt`, `prompt_ids`). No weight is loaded: the module tree and the parameter
counts come from a model built on the meta device, and bytes per dtype from the safetensors headers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from minillama.checkpoint import _ST_DTYPE_BYTES, check_safetensors_header, weight_files
from minillama.config import LlamaConfig
from minillama.errors import MinillamaError
from minillama.files import TOKENIZER_LIMIT, read_json_object
from minillama.model import LlamaForCausalLM
from minillama.tokenizer import added_tokens_decoder

# What each file of a Hugging Face model directory is for.
FILE_PURPOSES = {
    "config.json": "architecture and sizes (read into LlamaConfig)",
    "generation_config.json": "sampling defaults and stop token ids",
    "tokenizer.json": "the tokenizer: vocabulary, merges, pre-tokenizer, added tokens",
    "tokenizer_config.json": "tokenizer settings: special tokens, chat template, max length",
    "special_tokens_map.json": "which added tokens are bos / eos / pad",
    "chat_template.jinja": "the chat template (newer transformers save it apart)",
    "chat_template.json": "the chat template (older separate spelling)",
    "tokenizer.model": "SentencePiece/tiktoken file for other libraries (not read; tokenizer.json has it all)",
    "vocab.json": "slow tokenizer's vocabulary (tokenizer.json has it too)",
    "merges.txt": "slow tokenizer's BPE merges (tokenizer.json has them too)",
    "added_tokens.json": "slow tokenizer's added tokens",
    "model.safetensors": "the weights",
    "model.safetensors.index.json": "which shard holds each tensor",
    "README.md": "model card",
    "USE_POLICY.md": "acceptable use policy",
    ".gitattributes": "git LFS settings of the hub repository",
    "original": "Meta's original checkpoint (.pth, pickled; not used)",
    ".cache": "download bookkeeping of huggingface_hub",
}


def file_purpose(name: str) -> str:
    if name in FILE_PURPOSES:
        return FILE_PURPOSES[name]
    if m := re.fullmatch(r"model-(\d+)-of-(\d+)\.safetensors", name):
        return f"the weights, shard {int(m[1])} of {int(m[2])}"
    if name.endswith((".bin", ".pth", ".pt")):
        return "pickled weights (never read: loading them can run code)"
    if name.endswith(".gguf"):
        return "llama.cpp weights (minillama convert turns them into safetensors)"
    if name.upper().startswith(("LICENSE", "LICENCE")):
        return "license"
    return ""


def _size(path: Path) -> int:
    try:  # a dangling symlink or a symlink loop has no size: count it as 0, it is still listed
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def describe_files(model_dir: Path) -> list[dict[str, Any]]:
    """One entry per file or folder at the top of the directory: name, bytes, purpose."""
    return [{"name": p.name + ("/" if p.is_dir() else ""), "bytes": _size(p), "purpose": file_purpose(p.name)}
            for p in sorted(model_dir.iterdir(), key=lambda p: p.name)]


def config_summary(config: LlamaConfig) -> dict[str, Any]:
    return {
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.context_length,
        "rope_theta": config.rope_theta,
        "rope_type": config.rope_type,
        "rope_scaling": dict(config.rope_scaling),
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": config.torch_dtype,
    }


def chat_sampling(model_dir: Path) -> dict[str, Any]:
    """The sampling settings `minillama chat` and `minillama generate` start from, and where each came from:
    the model's generation_config.json, else the chat defaults (`chat.CHAT_SAMPLING`), else the defaults."""
    from minillama.chat import SHOWN, SOURCE_TEXT, chat_generation_config

    config, sources = chat_generation_config(model_dir)
    return {key: {"value": getattr(config, key), "from": SOURCE_TEXT[sources[key]]} for key in ("do_sample", *SHOWN)}


def quantization(model_dir: Path, model: LlamaForCausalLM) -> dict[str, Any] | None:
    """config.json's quantization_config and the formats the tensors hold ({format: modules}), as the loader
    reads them; None for float weights. A method minillama does not read is reported, not refused."""
    from minillama import quant

    qc = read_json_object(model_dir / "config.json").get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != quant.QUANT_METHOD:
        return {"method": method, "readable": False, "formats": {}}
    header: dict[str, dict] = {}
    for file in weight_files(model_dir):
        header.update(check_safetensors_header(file))
    modules = dict(model.named_modules())
    formats: Counter[str] = Counter()
    for name, (kind, group) in quant.stored_formats(model, header).items():
        per_row = group == modules[name].weight.shape[1]
        formats[kind if per_row else f"{kind}-g{group}"] += 1
    return {"method": method, "readable": True, "formats": dict(formats.most_common())}


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The settings the Python API (`minillama.generate`, `pipeline`) starts from: transformers' defaults under
    the model's generation_config.json; and whether that file set each."""
    from minillama.generation import GenerationConfig

    path = model_dir / "generation_config.json"
    in_file = read_json_object(path) if path.is_file() else {}
    effective = dataclasses.asdict(GenerationConfig.from_model_dir(model_dir))
    return {key: {"value": value, "from": "generation_config.json" if in_file.get(key) is not None else "default"}
            for key, value in effective.items()}


def _content(token: Any) -> str | None:
    """A special token's text: tokenizer configs write it as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def special_tokens(model_dir: Path) -> dict[str, Any]:
    """The bos/eos/pad/unk roles with their ids, and every special added token."""
    tok_config_path, tok_json_path = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    tok_config = read_json_object(tok_config_path) if tok_config_path.is_file() else {}
    ids: dict[str, int] = {}  # token text -> id, for added tokens
    special: list[tuple[int, str]] = []
    if tok_json_path.is_file():
        added = read_json_object(tok_json_path, TOKENIZER_LIMIT).get("added_tokens")
        for t in added if isinstance(added, list) else []:
            if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int):
                ids[t["content"]] = t["id"]
                if t.get("special"):
                    special.append((t["id"], t["content"]))
    for id_, t in added_tokens_decoder(tok_config).items():
        if id_ not in (i for i, _ in special) and t.get("special") and isinstance(t.get("content"), str):
            special.append((id_, t["content"]))
        if isinstance(t.get("content"), str):
            ids.setdefault(t["content"], id_)
    roles_map = tok_config
    if (model_dir / "special_tokens_map.json").is_file():
        roles_map = {**read_json_object(model_dir / "special_tokens_map.json"), **tok_config}
    roles = []
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = _content(roles_map.get(role))
        if text is not None:
            roles.append({"role": role.removesuffix("_token"), "token": text, "id": ids.get(text)})
    return {"roles": roles, "special": [{"id": i, "token": t} for i, t in sorted(set(special))]}


def parameter_counts(model: LlamaForCausalLM) -> dict[str, int]:
    """Parameters per module kind (q_proj, mlp.gate_proj, ...) summed over layers; tied weights once."""
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():  # a tied lm_head is the embedding's tensor: listed once
        kind = re.sub(r"^model\.layers\.\d+\.", "", name).removeprefix("model.")
        counts[kind.rsplit(".", 1)[0] + ("" if name.endswith("weight") else " (bias)")] += p.numel()
    return dict(counts)


def bytes_by_dtype(model_dir: Path) -> dict[str, dict[str, int]]:
    """Tensors and bytes per stored dtype, read from the safetensors headers (no data is read)."""
    totals: dict[str, dict[str, int]] = {}
    for file in weight_files(model_dir):
        for name, info in check_safetensors_header(file).items():
            if name == "__metadata__":
                continue
            entry = totals.setdefault(info["dtype"], {"tensors": 0, "elements": 0, "bytes": 0})
            n = 1
            for dim in info["shape"]:
                n *= dim
            entry["tensors"] += 1
            entry["elements"] += n
            entry["bytes"] += n * _ST_DTYPE_BYTES[info["dtype"]]
    return totals


def visible(text: str) -> str:
    """Whitespace made visible: '␣' for a space, '↵' for a newline, '⇥' for a tab; other controls escaped."""
    text = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def uses_chat_template(tokenizer: Any, raw: bool = False) -> bool:
    return not raw and tokenizer.chat_template_source is not None


def encode_prompt(tokenizer: Any, prompt: str, raw: bool = False) -> tuple[str, list[int]]:
    """The text the model sees for `prompt` and its token ids.

    By default the prompt is one user message rendered through the chat template (with the generation
    prompt), tokenized without adding special tokens again; with `raw`, or when the tokenizer has no
    chat template, it is the plain text, tokenized with the usual bos.
    """
    if not uses_chat_template(tokenizer, raw):
        return prompt, list(tokenizer.encode(prompt, add_special_tokens=True))
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return text, list(tokenizer.encode(text, add_special_tokens=False))


def prompt_ids(tokenizer: Any, prompt: str, raw: bool, vocab_size: int) -> tuple[str, list[int]]:
    """`encode_prompt`, checked: not empty, and every id inside the model's vocabulary of `vocab_size`."""
    text, ids = encode_prompt(tokenizer, prompt, raw)
    if not ids:
        raise MinillamaError("the prompt is empty after tokenization; give some text")
    if max(ids) >= vocab_size:
        raise MinillamaError(f"the tokenizer gave id {max(ids)}, past the model's vocabulary of {vocab_size}; "
                             "tokenizer and weights do not belong together")
    return text, ids


def token_table(tokenizer: Any, ids: list[int]) -> list[dict[str, Any]]:
    """One row per token: index, id, and its text with whitespace made visible."""
    return [{"index": i, "id": id_, "piece": visible(tokenizer.piece_text(id_))} for i, id_ in enumerate(ids)]


def inspect_model(model_dir: str | Path, prompt: str | None = None, raw: bool = False) -> dict[str, Any]:
    """Everything `minillama inspect` shows, as a JSON-ready dict."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MinillamaError(f"{model_dir}: not a directory; pass a model directory")
    config = LlamaConfig.from_file(model_dir)
    with torch.device("meta"):  # shapes without storage: nothing is allocated or read
        model = LlamaForCausalLM(config)
    counts = parameter_counts(model)
    report: dict[str, Any] = {
        "model_dir": str(model_dir),
        "files": describe_files(model_dir),
        "config": config_summary(config),
        "quantization": quantization(model_dir, model),
        "chat_sampling": chat_sampling(model_dir),
        "generation": generation_defaults(model_dir),
        "special_tokens": special_tokens(model_dir),
        "module_tree": str(model),
        "parameters": {"by_kind": counts, "total": sum(counts.values())},
        "stored": bytes_by_dtype(model_dir),
    }
    if prompt is not None:
        from minillama.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        text, ids = encode_prompt(tokenizer, prompt, raw)
        report["prompt"] = {"text": text, "chat_template": tokenizer.chat_template_source if uses_chat_template(
            tokenizer, raw) else None,
                            "tokens": token_table(tokenizer, ids)}
    return report


# ---- Text report ----------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(rows: list[list[Any]], header: list[str], right: set[int] = frozenset()) -> list[str]:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])]


def format_in_words(fmt: str) -> str:
    """'int4-g32' -> 'int4 (4-bit integers, a scale and offset per 32 weights)'; 'int8' -> '... a scale per row'."""
    kind, _, group = fmt.partition("-g")
    scale = "a scale and offset" if kind == "int4" else "a scale"
    return f"{kind} ({kind[3:]}-bit integers, {scale} per {group + ' weights' if group else 'row'})"


def format_report(report: dict[str, Any]) -> str:
    out = [f"# {report['model_dir']}", "", "## Files"]
    out += _table([[f["name"], human_bytes(f["bytes"]), f["purpose"]] for f in report["files"]],
                  ["file", "size", "what it is for"], right={1})

    c = report["config"]
    rope = c["rope_type"] + (f" {c['rope_scaling']}" if c["rope_scaling"] else "")
    out += ["", "## Config",
            f"layers {c['layers']}, hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
            f"heads {c['attention_heads']}, kv heads {c['kv_heads']}, head dim {c['head_dim']}",
            f"vocab {c['vocab_size']}, context length {c['context_length']}, rms_norm_eps {c['rms_norm_eps']}",
            f"rope theta {c['rope_theta']:g}, type {rope}",
            f"tied embeddings {c['tie_word_embeddings']}, dtype {c['dtype']}"]

    q = report["quantization"]
    if q is not None:
        out += ["", "## Quantization"]
        if q["readable"]:
            out.append(f"weights stored quantized (quantization_config: {q['method']}): " + ", ".join(
                f"{format_in_words(fmt)} in {n} module{'s' * (n != 1)}" for fmt, n in q["formats"].items()))
        else:
            out.append(f"quantization_config says {q['method']!r}, which minillama does not read; use a float copy")

    out += ["", "## Sampling of minillama chat and minillama generate"]
    out += [f"{k} = {json.dumps(v['value'])}  ({v['from']})" for k, v in report["chat_sampling"].items()]
    out += ["", "## Generation defaults of the Python API (minillama.generate, pipeline: transformers' defaults)"]
    out += [f"{k} = {json.dumps(v['value'])}" + ("" if v["from"] == "default" else f"  ({v['from']})")
            for k, v in report["generation"].items()]

    s = report["special_tokens"]
    out += ["", "## Special tokens"]
    out += [f"{r['role']:<4} {r['token']!r} = {r['id']}" for r in s["roles"]]
    reserved = [t for t in s["special"] if "reserved" in t["token"]]
    named = [t for t in s["special"] if t not in reserved]
    if named:
        out.append("special: " + ", ".join(f"{t['token']}={t['id']}" for t in named))
    if reserved:
        out.append(f"(and {len(reserved)} reserved special tokens, ids {reserved[0]['id']}..{reserved[-1]['id']})")

    out += ["", "## Modules", report["module_tree"]]

    p = report["parameters"]
    out += ["", "## Parameters"]
    out += _table([[kind, f"{n:,}", f"{100 * n / p['total']:.1f}%"] for kind, n in p["by_kind"].items()]
                  + [["total", f"{p['total']:,}", human_count(p["total"])]], ["module kind", "parameters", ""],
                  right={1, 2})
    out += ["", "## Stored weights"]
    out += _table([[dtype, e["tensors"], f"{e['elements']:,}", human_bytes(e["bytes"])]
                   for dtype, e in report["stored"].items()], ["dtype", "tensors", "elements", "bytes"],
                  right={1, 2, 3})

    if "prompt" in report:
        pr = report["prompt"]
        out += ["", "## Prompt" + (f" (chat template from {pr['chat_template']})" if pr["chat_template"] else " (plain text)"), pr["text"],
                "", f"## Tokens ({len(pr['tokens'])})"]
        out += _table([[t["index"], t["id"], t["piece"]] for t in pr["tokens"]], ["index", "id", "piece"],
                      right={0, 1})
    return "\n".join(out)
