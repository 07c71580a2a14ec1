"""The tokenizer: text <-> token ids, chat messages -> prompt, and streaming detokenization.

A thin wrapper over the `tokenizers` library (the Rust core of Hugging Face's fast tokenizers)
reading `tokenizer.json`, so ids match transformers exactly. What `tokenizer.json` does not say,
the names of the special tokens (bos, eos, pad) and the chat template, comes from
`tokenizer_config.json` and `special_tokens_map.json`.

Byte-level BPE (Llama 3, GPT-2, SmolLM) works on UTF-8 bytes, so one character can be split over
several tokens: decoding token by token would print broken characters. `StreamDecoder` holds text
back until the bytes form whole characters.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _BackendTokenizer

from minillama.chat_template import (
    SPECIAL_TOKEN_NAMES,
    ChatTemplate,
    Llama3ChatFormat,
    load_chat_template,
)
from minillama.errors import MinillamaError, read_json_object
from minillama.files import TOKENIZER_LIMIT, one_line, parse_json, read_text

# A Llama 3 vocabulary has these header tokens; with no template shipped, the built-in format fits it.
LLAMA3_HEADER_TOKEN = "<|start_header_id|>"

# Encoded once at load: letters, digits, punctuation, spaces, accents, CJK, emoji. A tokenizer that
# cannot encode this (a model with no usable unknown token, a broken normalizer) fails at load, not mid-chat.
PROBE_TEXT = "Hello, World! 1234 \t\n  naïve café ß Ωμέγα 你好 😀 <tag> 'quoted' x=y+z; ~`^"


def _is_rust_panic(e: BaseException) -> bool:
    """tokenizers' Rust core turns a panic into pyo3_runtime.PanicException, a BaseException (so that
    `except Exception` does not swallow it); a panic in a tokenizer is a broken tokenizer file."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment: a Rust panic prints its message (and, under
    RUST_BACKTRACE, a backtrace) straight to fd 2 before Python sees it, and we report it in one line.
    Used only around loading and probing a tokenizer (milliseconds), never around generation."""
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded, some test runners)
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def rust_call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call into the tokenizers library; its errors and panics become one MinillamaError line."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise MinillamaError(f"{what}: {one_line(e)[:300]}") from None
    except BaseException as e:
        if _is_rust_panic(e):
            raise MinillamaError(f"{what}: the tokenizer library failed ({one_line(e)[:300]})") from None
        raise


class StreamDecoder:
    """Turns token ids, pushed one at a time, into text pieces that never split a character.

    It decodes only a small window: the tokens of the last emitted piece (the "prefix", so
    decoders that depend on the previous token, like SentencePiece's leading space, see context)
    plus the tokens not yet emitted. New text is decode(window) minus decode(prefix). While that
    ends in U+FFFD, the last character is incomplete and the text waits for the next token.
    The concatenated pieces equal `tokenizer.decode(all ids)`.
    """

    # A UTF-8 character is at most 4 bytes; past this many pending tokens the bytes are simply invalid.
    MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: prefix tokens, then pending tokens
        self._prefix_len = 0  # how many of `_ids` were already emitted (kept only as context)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (often "", e.g. mid-character)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[:self._prefix_len])
        text = self._decode(self._ids)
        pending = len(self._ids) - self._prefix_len
        # Wait while the last character's bytes are not all here yet, or while the decoder, seeing
        # more context, still rewrites the prefix; past MAX_PENDING the bytes are just invalid.
        if pending < self.MAX_PENDING and (text.endswith("\ufffd") or not text.startswith(prefix_text)):
            return ""
        # Emit, then the just-emitted tokens become the prefix and older tokens are dropped.
        self._ids = self._ids[self._prefix_len:]
        self._prefix_len = len(self._ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """Return whatever is held back (at the end of generation) and start afresh."""
        prefix_text = self._decode(self._ids[:self._prefix_len])
        text = self._decode(self._ids)
        self._ids, self._prefix_len = [], 0
        return text[len(prefix_text):]


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: each byte is written as one printable character (a space as 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_table()


class Tokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`) with its special tokens and chat template.

    Attributes: `bos_token`, `bos_token_id`, `eos_token`, `eos_token_id`, `pad_token`, `pad_token_id`
    (each may be None), `vocab_size` (all ids, added tokens included), `special_ids`, `path`
    (the directory), `chat_format` (the template object, or None) and `chat_template_source`.
    """

    def __init__(self, backend: _BackendTokenizer, config: Mapping[str, Any], path: Path):
        self.backend = backend
        self.path = path
        self.config = dict(config)  # tokenizer_config.json merged over special_tokens_map.json
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

        # Special token strings by name (bos_token -> "<|begin_of_text|>"), as templates see them.
        self.special_tokens_map: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = _token_content(self.config.get(name), name)
            if token is not None:
                self.special_tokens_map[name] = token
        self.bos_token = self.special_tokens_map.get("bos_token")
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.pad_token = self.special_tokens_map.get("pad_token")
        self.unk_token = self.special_tokens_map.get("unk_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        self.unk_token_id = self.token_to_id(self.unk_token)

        # Special ids: added tokens flagged special in either file, plus the named ones.
        self.special_ids: set[int] = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        for idx, entry in added_tokens_decoder(self.config).items():
            if entry.get("special"):
                self.special_ids.add(idx)
        self.special_ids |= {i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id,
                                         self.unk_token_id) if i is not None}

        self.chat_format: ChatTemplate | Llama3ChatFormat | None = load_chat_template(path, self.config)
        if self.chat_format is None and backend.token_to_id(LLAMA3_HEADER_TOKEN) is not None:
            self.chat_format = Llama3ChatFormat()

    @property
    def chat_template_source(self) -> str | None:
        """Where the chat template came from: "chat_template.jinja", "tokenizer_config.json" or
        "built-in Llama 3 format"; None when this tokenizer has no chat template."""
        return self.chat_format.source if self.chat_format is not None else None

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, chat_template={self.chat_template_source!r})")

    def token_to_id(self, token: str | None) -> int | None:
        """The id of a token string (e.g. "<|eot_id|>"), or None when it is not in the vocabulary."""
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens, the tokenizer's post-processor adds what it
        adds (bos for Llama); special-token text inside `text` (e.g. "<|eot_id|>") becomes that token."""
        if not isinstance(text, str):
            raise MinillamaError(f"can only encode text, got a {type(text).__name__}")
        return rust_call(f"the tokenizer in {self.path} cannot encode this text", self.backend.encode, text,
                         add_special_tokens=add_special_tokens).ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise MinillamaError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; skip_special_tokens drops bos, <|eot_id|>, ... from it."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return rust_call(f"the tokenizer in {self.path} cannot decode these ids", self.backend.decode, ids,
                         skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, id: int) -> str:
        """The raw vocabulary entry of one id, e.g. 'Ġhello' (byte-level BPE writes a space as Ġ)."""
        (id,) = self._check_ids([id])
        return self.backend.id_to_token(id)

    def piece_text(self, id: int) -> str:
        """The text one token decodes to on its own, for tables. A token holding part of a
        multi-byte character decodes to U+FFFD."""
        return self.decode([id])

    def token_bytes(self, id: int) -> bytes:
        """The bytes one token stands for (OpenAI's log-prob `bytes`): exact even for a token that holds part of
        a multi-byte character, where `piece_text` shows U+FFFD."""
        piece = self.id_to_piece(id)
        if id in self.special_ids:
            return piece.encode()
        if type(self.backend.decoder).__name__ == "ByteLevel" and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)  # GPT-2's byte-to-character table, reversed
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece's byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece writes a space as U+2581

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A `StreamDecoder` for printing generated tokens as they come."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool | None = None,
                            tokenize: bool = False, tools: list[dict] | None = None,
                            **variables: Any) -> str | list[int]:
        """Render a chat (a list of {"role", "content"} dicts) with the model's chat template.

        `variables` reach the template (e.g. date_string="26 Jul 2024", documents=[...],
        template_name="tool_use"). add_generation_prompt opens an assistant turn, by default unless
        continue_final_message=True (or a field name such as "reasoning_content") leaves the final message
        open for the model to continue, as in transformers. With tokenize=True the prompt's ids are
        returned, encoded with add_special_tokens=False because the template already wrote the bos.
        """
        messages = list(messages)
        if not messages:
            raise MinillamaError("the chat is empty: give at least one message")
        if self.chat_format is None:
            raise MinillamaError(f"the tokenizer in {self.path} has no chat template (no chat_template in "
                                 "tokenizer_config.json and no chat_template.jinja)")
        if isinstance(self.chat_format, ChatTemplate):
            text = self.chat_format.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                           special_tokens=self.special_tokens_map, **variables)
        else:
            text = self.chat_format.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                           bos_token=self.bos_token, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_content(value: Any, name: str) -> str | None:
    """A special token's string: configs write it as "<s>", {"content": "<s>", ...} or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise MinillamaError(f"tokenizer_config.json: {name} is a {type(value).__name__}, not a token string")


def added_tokens_decoder(config: Mapping[str, Any]) -> dict[int, Mapping[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder` ({"128000": {"content": ..., "special": true}}) by
    integer id; entries whose key is not an id or whose value is not an object are a broken file."""
    value = config.get("added_tokens_decoder") or {}
    if not isinstance(value, Mapping):
        raise MinillamaError(f"tokenizer_config.json: added_tokens_decoder is a {type(value).__name__}; "
                             "it must map token ids to token entries")
    out = {}
    for key, entry in value.items():
        if not (isinstance(key, str) and re.fullmatch(r"[0-9]{1,12}", key)) or not isinstance(entry, Mapping):
            raise MinillamaError(f"tokenizer_config.json: added_tokens_decoder entry {str(key)[:40]!r} is not "
                                 "a token id mapped to a token entry; fix or re-download the file")
        out[int(key)] = entry
    return out


# A group that repeats and holds a repetition itself, e.g. `(a+)+`, `(?:\s*x)*`, `(a{2,})+`: the classic
# exponential-backtracking shape (star height 2). Real tokenizer regexes (GPT-2, Llama 3, Qwen) have none.
_QUANTIFIER = re.compile(r"[+*]|\{\d*,\d*\}|\{\d{3,}\}")


def nested_quantifier(pattern: str) -> bool:
    """Whether a regex repeats a group that itself repeats something (escapes and classes understood)."""
    stack: list[bool] = []  # per open group: does it hold a quantifier?
    closed_with_quantifier = False  # the group just closed held one
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            closed_with_quantifier = False
            continue
        if c == "[":  # skip a character class: its + and * are literal
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            j += pattern[j:j + 1] == "]"
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i, closed_with_quantifier = j + 1, False
            continue
        m = _QUANTIFIER.match(pattern, i)
        if m:
            if closed_with_quantifier:
                return True
            if stack:
                stack[-1] = True
            i = m.end()
            continue
        if c == "(":
            stack.append(False)
        elif c == ")" and stack:
            inner = stack.pop()
            if stack and inner:
                stack[-1] = True
            closed_with_quantifier = inner
            i += 1
            continue
        closed_with_quantifier = False
        i += 1
    return False


def _check_regexes(text: str, source: Path) -> None:
    """Refuse split/replace regexes with nested quantifiers. Oniguruma also stops any one search after
    its retry limit (a panic, caught as an error), so time per search is bounded either way; this check
    keeps the known-catastrophic shapes from being loaded at all."""
    for m in re.finditer(r'"Regex"\s*:\s*("(?:[^"\\]|\\.)*")', text):
        pattern = parse_json(m.group(1), str(source))
        if isinstance(pattern, str) and nested_quantifier(pattern):
            raise MinillamaError(f"{source}: regex {pattern[:60]!r} repeats a repeated group, which can take "
                                 "exponential time on some text; refusing this tokenizer")


def _load_backend(tokenizer_file: Path) -> _BackendTokenizer:
    """The Rust tokenizer, from a size-limited regular file, checked by encoding and decoding a probe."""
    text = read_text(tokenizer_file, TOKENIZER_LIMIT, "tokenizer file")
    _check_regexes(text, tokenizer_file)
    invalid = f"{tokenizer_file} is not a valid tokenizer file"
    with _quiet_stderr():
        backend = rust_call(invalid, _BackendTokenizer.from_str, text)
        # Padding and truncation are for batched training inputs: generation pads its own batches and must
        # never cut a prompt. A file asking for fixed padding to 10**8 would otherwise allocate gigabytes.
        backend.no_padding()
        backend.no_truncation()
        ids = rust_call(f"{tokenizer_file} cannot encode text", backend.encode, PROBE_TEXT).ids
        rust_call(f"{tokenizer_file} cannot decode its own ids", backend.decode, ids)
    return backend


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a model directory (or of a `tokenizer.json` file and its siblings)."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    tokenizer_file = path if path.is_file() else path / "tokenizer.json"
    if not tokenizer_file.is_file():
        hint = " (only a SentencePiece tokenizer.model: minillama needs the tokenizer.json format)" \
            if (directory / "tokenizer.model").is_file() else ""
        raise MinillamaError(f"no tokenizer.json in {directory}{hint}")
    backend = _load_backend(tokenizer_file)

    config: dict[str, Any] = {}
    special_map = directory / "special_tokens_map.json"
    if special_map.is_file():  # older repos name bos/eos only here
        config.update(read_json_object(special_map))
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        config.update({k: v for k, v in read_json_object(tokenizer_config).items() if v is not None or k not in config})
    return Tokenizer(backend, config, directory)
