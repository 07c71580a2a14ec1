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
from collections.abc import Callable, Iterable, Mapping
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


# Names an assistant message's reasoning comes under. transformers copies the first one set into
# `reasoning_content` (what Qwen3-style templates read) and `thinking` (gpt-oss) before rendering.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' way to leave the final message open: tag the end of its text, render, cut at the tag.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def alias_reasoning_fields(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with reasoning under any of REASONING_FIELDS also carry it as `reasoning_content` and
    `thinking`, in transformers' key order (a message's own `thinking` is kept)."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out


def generation_prompt(add_generation_prompt: bool | None, continue_final_message: bool | str) -> bool:
    """None means: open a new assistant turn, unless the final message is continued instead."""
    if continue_final_message and add_generation_prompt:
        raise MinillamaError("continue_final_message and add_generation_prompt=True do not go together: continue "
                             "the final message, or open a new assistant turn, not both")
    return not continue_final_message if add_generation_prompt is None else bool(add_generation_prompt)


def mark_final_message(messages: list[dict[str, Any]], continue_final_message: bool | str,
                       reads: Callable[[str], bool]) -> str:
    """Tag the end of the final message's text (its `content`, or the field named) in place; returns that
    text. `reads(field)` says whether the template reads the field; messages are the render's own copies."""
    if not messages:
        raise MinillamaError("continue_final_message needs a final message to continue; the chat is empty")
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    final = messages[-1].get(field)
    if final is None:
        raise MinillamaError(f"continue_final_message: the final message has no {field!r} to continue")
    fields = [f for f in REASONING_FIELDS if messages[-1].get(f) == final] if field in REASONING_FIELDS else [field]
    if not any(reads(f) for f in fields):
        raise MinillamaError(f"continue_final_message: the chat template never reads {field!r}, so it cannot "
                             "be continued")
    if isinstance(final, (list, tuple)):  # content blocks: continue the last text block
        block = next((b for b in reversed(final) if isinstance(b, dict) and isinstance(b.get("text"), str)), None)
        if block is None:
            raise MinillamaError("continue_final_message: the final message has no text block to continue")
        final, block["text"] = block["text"], block["text"] + CONTINUE_TAG
        return final
    if not isinstance(final, str):
        raise MinillamaError(f"continue_final_message: the final message's {field!r} is not text")
    for f in fields:
        messages[-1][f] = final + CONTINUE_TAG
    return final


def cut_at_mark(rendered: str, final: str) -> str:
    """The rendered chat up to where the final message's text ends (the template's closing tokens cut off)."""
    if final.strip() not in rendered or CONTINUE_TAG.strip() not in rendered:
        raise MinillamaError("continue_final_message: the chat template changed or dropped the final message, "
                             "so it cannot be left open")
    at = rendered.rindex(CONTINUE_TAG.strip())
    if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message: its trailing space went with the tag's


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
            if not isinstance(name, str):  # a list mixing 1 and "tool_use" broke sorting the names later
                raise MinillamaError(f"chat template names in {source} must be strings, got {str(name)[:40]}")
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

    def render(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool | None = None,
               tools: list[dict] | None = None, documents: list[dict] | None = None,
               special_tokens: Mapping[str, str] | None = None, template_name: str | None = None,
               continue_final_message: bool | str = False, **variables: Any) -> str:
        """Render `messages` to the prompt string. `special_tokens` (bos_token, eos_token, ...) and
        `variables` (date_string, enable_thinking, ...) become template variables; `variables` win.

        add_generation_prompt (default: unless continuing) opens an assistant turn; continue_final_message
        leaves the final message open instead (True: its content; or the name of the field to continue,
        such as "reasoning_content"), as transformers does.
        """
        name = self.pick(template_name, tools)
        label = self.source if len(self._compiled) == 1 else f"{self.source} ({name})"
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise MinillamaError("tools must be JSON schemas (dicts)")
        add_generation_prompt = generation_prompt(add_generation_prompt, continue_final_message)
        chat = alias_reasoning_fields(normalize_messages(messages))
        final = None
        if continue_final_message:
            final = mark_final_message(chat, continue_final_message, lambda field: field in self.sources[name])
        context = {
            **_plain(dict(special_tokens or {})),
            **_plain(variables),
            "messages": chat,
            "tools": _plain(tools),
            "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt,
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
            return "".join(chunks) if final is None else cut_at_mark("".join(chunks), final)
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
    block per message; and, for the generation prompt, an open assistant header. With tools, the tool
    schemas go into the first user message (`tools_in_user_message=True`, the template's default) or into
    the system block (False); `custom_tools` replaces `tools`, as in the template. Llama 3.1's
    `builtin_tools` (brave_search, wolfram_alpha) are not written: they are refused, not dropped.
    """

    source = BUILTIN_LLAMA3

    # Llama 3.2's instructions that precede the tool schemas, in the first user message or in the system block.
    TOOLS_PREAMBLE = ("Given the following functions, please respond with a JSON for a function call "
                      "with its proper arguments that best answers the given prompt.\n\n"
                      'Respond in the format {"name": function name, "parameters": dictionary of argument '
                      'name and its value}.Do not use variables.\n\n')
    SYSTEM_TOOLS_PREAMBLE = ("You have access to the following functions. To call a function, please respond "
                             "with JSON for a function call."
                             'Respond in the format {"name": function name, "parameters": dictionary of argument '
                             'name and its value}.Do not use variables.\n\n')

    def __init__(self, date_string: str | None = None):
        self.date_string = date_string  # e.g. "26 Jul 2024"; None means today, "%d %b %Y"

    @staticmethod
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def render(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool | None = None,
               tools: list[dict] | None = None, bos_token: str = "<|begin_of_text|>",
               date_string: str | None = None, tools_in_user_message: Any = True,
               continue_final_message: bool | str = False, **variables: Any) -> str:
        """Render `messages` to the prompt string (tokenize it with add_special_tokens=False).

        continue_final_message leaves the final message open (only its content: the format has no reasoning).
        """
        if "builtin_tools" in variables:
            raise MinillamaError("the built-in Llama 3 format is Llama 3.2's and does not write Llama 3.1's "
                                 "builtin_tools; give the model its own chat_template.jinja to use them")
        if "custom_tools" in variables:  # the template's `{% set tools = custom_tools %}`, None included
            tools = variables["custom_tools"]
        add_generation_prompt = generation_prompt(add_generation_prompt, continue_final_message)
        messages = alias_reasoning_fields(normalize_messages(messages))
        final = mark_final_message(messages, continue_final_message, lambda f: f == "content") \
            if continue_final_message else None
        system = _text(messages.pop(0)).strip() if messages and messages[0].get("role") == "system" else ""
        date = date_string or self.date_string or datetime.now().strftime("%d %b %Y")
        out = [bos_token or "", self.system_block(system, date, tools, bool(tools_in_user_message))]
        if tools is not None and tools_in_user_message:
            if not messages:
                raise MinillamaError("tools need a first user message to go into, but the chat has no messages "
                                     "(or pass tools_in_user_message=False)")
            first = messages.pop(0)
            out.append(self.header("user") + self.TOOLS_PREAMBLE + _schemas(tools) + _text(first).strip()
                       + "<|eot_id|>")
        out += [self.message_block(i, m) for i, m in enumerate(messages)]
        if add_generation_prompt:
            out.append(self.header("assistant"))
        text = "".join(out)
        return text if final is None else cut_at_mark(text, final)

    def system_block(self, system: str, date: str, tools: list[dict] | None, tools_in_user_message: bool) -> str:
        """Always written: knowledge cutoff and date; with tools the ipython environment (and the tools
        themselves unless they go into the first user message); then the system message."""
        out = [self.header("system")]
        if tools is not None:
            out.append("Environment: ipython\n")
        out.append("Cutting Knowledge Date: December 2023\n")
        out.append(f"Today Date: {date}\n\n")
        if tools is not None and not tools_in_user_message:
            out.append(self.SYSTEM_TOOLS_PREAMBLE + _schemas(tools))
        return "".join(out) + system + "<|eot_id|>"

    def message_block(self, i: int, m: dict[str, Any]) -> str:
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise MinillamaError(f"chat message {i} has no 'role'")
        if "tool_calls" in m:
            calls = m["tool_calls"]
            if len(calls) != 1:
                raise MinillamaError("the Llama 3 format supports one tool call per message")
            call = calls[0].get("function", calls[0])
            return (self.header("assistant") + '{"name": "' + str(call.get("name")) + '", "parameters": '
                    + _tojson(call.get("arguments")) + "}<|eot_id|>")
        if role in ("tool", "ipython"):
            # Llama 3.2's template JSON-encodes every tool result (strings too, since they are iterable).
            return self.header("ipython") + _tojson(m.get("content")) + "<|eot_id|>"
        return self.header(role) + _text(m).strip() + "<|eot_id|>"


def _schemas(tools: list[dict]) -> str:
    """Each tool's JSON schema, indented by 4, as the Llama 3.2 template lists them."""
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise MinillamaError("tools must be a list of JSON schemas (dicts)")
    return "".join(_tojson(_plain(t), indent=4) + "\n\n" for t in tools)


def _text(message: Mapping[str, Any]) -> str:
    """A message's content as text: a string, or the text parts of a list of content blocks."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise MinillamaError(f"message content is a {type(content).__name__}, not text")
