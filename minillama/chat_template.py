"""Chat templates: from a list of messages to the exact text the model was trained on.

Two ways to get there:

- `ChatTemplate` renders the model's own Jinja template (from `tokenizer_config.json`'s
  `chat_template`, a string or a list of named templates, or a `chat_template.jinja` file), with
  the environment transformers uses: a sandbox, `trim_blocks` and `lstrip_blocks`, the globals
  `raise_exception` and `strftime_now`, and a `tojson` filter that does not escape HTML. The same
  template and messages give the same string as transformers' `apply_chat_template`.
- `Llama3ChatFormat` writes the Llama 3.1/3.2 Instruct format in plain Python (like Meta's
  `ChatFormat`), for Llama 3 tokenizers that ship without a template.

Templates come from model repositories, i.e. from strangers, so they are treated as hostile code: they
compile and render in `minillama.sandbox` (no escape to internals, budgets for time, memory and sizes),
and anything that goes wrong is a one-line `MinillamaError` naming the template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from minillama.errors import MinillamaError
from minillama.files import TEMPLATE_FILE_LIMIT, read_text
from minillama.sandbox import (  # noqa: F401  (the budgets are re-exported: they are part of this API)
    BUDGET,
    MAX_INT_BITS,
    MAX_LOOP_ITERATIONS,
    MAX_OUTPUT_CHARS,
    RENDER_TIME_LIMIT_S,
    TemplateLimitError,
    _Budget,
    make_environment,
)

BUILTIN_LLAMA3 = "built-in Llama 3 format"

# Names the template sees for the tokenizer's special tokens, as transformers passes them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # The plain JSON of transformers' `tojson` filter (Jinja's own escapes <, >, & and ' for HTML), for the
    # built-in format; templates get the metered `minillama.sandbox.tojson`.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _plain(value: Any) -> Any:
    """A copy of `value` made only of JSON-like types, so the template can't call methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"  # an inert placeholder; templates only test such values for presence


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain-dict copies of the messages, minus keys whose value is None (as transformers does:
    APIs send `content=None` or `tool_calls=None`, and templates handle a missing key better)."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise MinillamaError(f"chat message {i} is a {type(message).__name__}, "
                                 "not a dict with 'role' and 'content'")
        out.append({k: v for k, v in _plain(dict(message)).items() if v is not None})
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ChatTemplate:
    """A model's own Jinja chat template(s), compiled once in the hardened sandbox.

    `templates` is one template string, or a dict of named ones (`default`, `tool_use`, ...) as a
    `tokenizer_config.json` list gives them. `source` names where they came from, for messages.
    """

    def __init__(self, templates: str | Mapping[str, str], source: str, *,
                 time_limit_s: float = RENDER_TIME_LIMIT_S, max_iterations: int = MAX_LOOP_ITERATIONS,
                 max_output_chars: int = MAX_OUTPUT_CHARS):
        self.source = source
        self.time_limit_s = time_limit_s
        self.max_iterations = max_iterations
        self.max_output_chars = max_output_chars
        named = {"default": templates} if isinstance(templates, str) else dict(templates)
        if not named:
            raise MinillamaError(f"chat template list in {source} is empty")
        self.sources: dict[str, str] = {}  # name -> Jinja source, for display
        self._compiled: dict[str, jinja2.Template] = {}
        env = make_environment()
        for name, text in named.items():
            if not isinstance(text, str):
                raise MinillamaError(f"chat template {name!r} in {source} is a {type(text).__name__}, not a string")
            label = source if len(named) == 1 else f"{source} ({name})"
            try:
                self._compiled[name] = env.from_string(text)
            except jinja2.TemplateSyntaxError as e:
                raise MinillamaError(f"chat template from {label} has a syntax error on line {e.lineno}: "
                                     f"{_one_line(e.message)}") from None
            except TemplateLimitError as e:  # size, nesting, or compile-time constant folding
                raise MinillamaError(f"chat template from {label} was refused: it {e}") from None
            except (RecursionError, SyntaxError, MemoryError) as e:  # expressions nested without brackets
                raise MinillamaError(f"chat template from {label} is too deeply nested or too large to compile "
                                     f"({type(e).__name__})") from None
            self.sources[name] = text

    @property
    def names(self) -> list[str]:
        """The template names (`["default"]` for a single template)."""
        return list(self._compiled)

    def pick(self, name: str | None = None, tools: list | None = None) -> str:
        """The template name transformers would use: the one asked for, else `tool_use` when there are
        tools and such a template, else `default`."""
        if name is not None:
            if name not in self._compiled:
                raise MinillamaError(f"no chat template named {name!r} in {self.source}; "
                                     f"it has {sorted(self._compiled)}")
            return name
        if tools is not None and "tool_use" in self._compiled:
            return "tool_use"
        if "default" in self._compiled:
            return "default"
        raise MinillamaError(f"{self.source} has several chat templates and none is named 'default'; "
                             f"pick one of {sorted(self._compiled)}")

    def render(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, documents: list[dict] | None = None,
               special_tokens: Mapping[str, str] | None = None, template_name: str | None = None,
               **variables: Any) -> str:
        """Render `messages` to the prompt string. `special_tokens` (bos_token, eos_token, ...) and
        `variables` (date_string, enable_thinking, ...) become template variables; `variables` win."""
        name = self.pick(template_name, tools)
        label = self.source if len(self._compiled) == 1 else f"{self.source} ({name})"
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise MinillamaError("tools must be JSON schemas (dicts)")
        context = {
            **_plain(dict(special_tokens or {})),
            **_plain(variables),
            "messages": normalize_messages(messages),
            "tools": _plain(tools),
            "documents": _plain(documents),
            "add_generation_prompt": bool(add_generation_prompt),
        }
        budget = _Budget(self.time_limit_s, self.max_iterations)
        token = BUDGET.set(budget)
        try:
            chunks, size = [], 0
            for chunk in self._compiled[name].generate(**context):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise TemplateLimitError(f"produced more than {self.max_output_chars:,} characters")
                chunks.append(chunk)
                budget.check_time()
            return "".join(chunks)
        except MinillamaError:
            raise
        except TemplateLimitError as e:
            raise MinillamaError(f"chat template from {label} was stopped: it {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise MinillamaError(f"chat template from {label} was refused by the sandbox: {_one_line(e)}") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) and undefined values
            raise MinillamaError(f"chat template from {label} failed: {_one_line(e)}") from None
        except RecursionError:
            raise MinillamaError(f"chat template from {label} was stopped: it recursed too deeply") from None
        except MemoryError:
            raise MinillamaError(f"chat template from {label} was stopped: it ran out of memory") from None
        except Exception as e:  # the template is foreign code; its bugs are a problem with the model files
            raise MinillamaError(f"chat template from {label} failed: {type(e).__name__}: {_one_line(e)}") from None
        finally:
            BUDGET.reset(token)


def load_chat_template(directory: str | Path, tokenizer_config: Mapping[str, Any] | None = None,
                       **limits: Any) -> ChatTemplate | None:
    """The chat template of a tokenizer directory, or None when it has none.

    Looked up in transformers' order: `chat_template.jinja` (with any `additional_chat_templates/*.jinja`
    as named extras), then the `chat_template` key of `tokenizer_config.json`. `limits` go to `ChatTemplate`.
    """
    directory = Path(directory)
    jinja_file = directory / "chat_template.jinja"
    extra_dir = directory / "additional_chat_templates"
    named: dict[str, str] = {}
    if jinja_file.is_file():
        named["default"] = _read_text(jinja_file)
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            named[path.name.removesuffix(".jinja")] = _read_text(path)
    if named:
        return ChatTemplate(named, "chat_template.jinja" if "default" in named else "additional_chat_templates",
                            **limits)

    value = (tokenizer_config or {}).get("chat_template")
    if value is None:
        return None
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        try:
            value = {item["name"]: item["template"] for item in value}
        except (TypeError, KeyError):
            raise MinillamaError("tokenizer_config.json: chat_template is a list but not of "
                                 "{'name': ..., 'template': ...} entries") from None
    elif not isinstance(value, str):
        raise MinillamaError(f"tokenizer_config.json: chat_template is a {type(value).__name__}, "
                             "not a string or a list of named templates")
    return ChatTemplate(value, "tokenizer_config.json", **limits)


def _read_text(path: Path) -> str:
    return read_text(path, TEMPLATE_FILE_LIMIT, "chat template file")


class Llama3ChatFormat:
    """The Llama 3.1/3.2 Instruct chat format in plain Python, for Llama 3 tokenizers without a template.

    It writes what Meta's Llama 3.2 template writes: bos; a system block that always carries the
    knowledge cutoff and today's date (then the system message, if any); one header + content + <|eot_id|>
    block per message; and, for the generation prompt, an open assistant header. With tools, the
    tool schemas go into the first user message, as Llama 3.2's template does by default.
    """

    source = BUILTIN_LLAMA3

    # Llama 3.2's instruction that precedes the tool schemas in the first user message.
    TOOLS_PREAMBLE = ("Given the following functions, please respond with a JSON for a function call "
                      "with its proper arguments that best answers the given prompt.\n\n"
                      'Respond in the format {"name": function name, "parameters": dictionary of argument '
                      'name and its value}.Do not use variables.\n\n')

    def __init__(self, date_string: str | None = None):
        self.date_string = date_string  # e.g. "26 Jul 2024"; None means today, "%d %b %Y"

    @staticmethod
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def render(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, bos_token: str = "<|begin_of_text|>",
               date_string: str | None = None, **unused: Any) -> str:
        """Render `messages` to the prompt string (tokenize it with add_special_tokens=False)."""
        messages = normalize_messages(messages)
        date = date_string or self.date_string or datetime.now().strftime("%d %b %Y")
        system = ""
        if messages and messages[0].get("role") == "system":
            system = _text(messages.pop(0)).strip()

        out = [bos_token or "", self.header("system")]
        if tools is not None:
            out.append("Environment: ipython\n")
        out.append("Cutting Knowledge Date: December 2023\n")
        out.append(f"Today Date: {date}\n\n")
        out.append(system + "<|eot_id|>")

        if tools is not None:
            if not messages:
                raise MinillamaError("tools need a first user message to go into, but the chat has no messages")
            first = messages.pop(0)
            schemas = "".join(_tojson(t, indent=4) + "\n\n" for t in tools)
            out.append(self.header("user") + self.TOOLS_PREAMBLE + schemas + _text(first).strip() + "<|eot_id|>")

        for i, m in enumerate(messages):
            role = m.get("role")
            if not isinstance(role, str) or not role:
                raise MinillamaError(f"chat message {i} has no 'role'")
            if "tool_calls" in m:
                calls = m["tool_calls"]
                if len(calls) != 1:
                    raise MinillamaError("the Llama 3 format supports one tool call per message")
                call = calls[0].get("function", calls[0])
                out.append(self.header("assistant") + '{"name": "' + str(call.get("name")) + '", "parameters": '
                           + _tojson(call.get("arguments")) + "}<|eot_id|>")
            elif role in ("tool", "ipython"):
                # Llama 3.2's template JSON-encodes every tool result (strings too, since they are iterable).
                out.append(self.header("ipython") + _tojson(m.get("content")) + "<|eot_id|>")
            else:
                out.append(self.header(role) + _text(m).strip() + "<|eot_id|>")

        if add_generation_prompt:
            out.append(self.header("assistant"))
        return "".join(out)


def _text(message: Mapping[str, Any]) -> str:
    """A message's content as text: a string, or the text parts of a list of content blocks."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise MinillamaError(f"message content is a {type(content).__name__}, not text")
