"""The Jinja sandbox chat templates render in: jinja2's immutable sandbox plus budgets for time and memory.

A chat template is code from a stranger. jinja2's sandbox stops it from reaching Python internals, but not
from spending the machine: a loop squaring an integer, a string doubled 31 times, `'x'.ljust(10**9)` or a
filter asked for a billion-wide `center` each run for minutes or take gigabytes in one C-level step, where
no timer can interrupt them. So every operation that can grow a value is checked *before* it runs, from its
operands' sizes (`_Budget.grow`), and every hook also checks the clock and, every 32 MB of growth, the
process's resident memory:

- arithmetic and concatenation: `*`, `**`, `+`, `%` (format widths) and `~` (rewritten into a call);
- method calls on strings (`ljust`, `center`, `zfill`, `replace`, `join`, `format`, ...), through `call`;
- filters that build (`join`, `replace`, `center`, `indent`, `wordwrap`, `format`, `tojson`, `batch`, `slice`),
  and every filter's result;
- `{% for %}` iterations and calls (recursion through macros), and compilation: the source size and the
  nesting depth are checked before parsing.
A budget that runs out raises `TemplateLimitError`, which `ChatTemplate` reports as one line.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import re
import string
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Render budgets. A real template renders a long chat in milliseconds with a few thousand loop iterations
# and a few hundred KB of text; these limits are far above that and far below "hangs or runs out of memory".
MAX_LOOP_ITERATIONS = 1_000_000  # all {% for %} iterations of one render, nested loops included
MAX_OUTPUT_CHARS = 10_000_000  # the rendered text, and any one string the template builds
MAX_ITEMS = 1_000_000  # any one list the template builds
MAX_INT_BITS = 100_000  # any integer result (10 ** 10 ** 9, or squaring in a loop, would take minutes)
MAX_RENDER_MEMORY = 1024**3  # growth of the process's resident memory during one render
RENDER_TIME_LIMIT_S = 10.0  # wall clock for one render
# Compile budgets: the largest real templates are ~20 KB and nest ~8 deep; 100 KB compiles in ~2.5 s here.
MAX_TEMPLATE_CHARS = 100_000
MAX_NESTING = 64  # nested blocks ({% for %}, {% if %}, ...) plus brackets, at any point of the source

_MEMORY_CHECK_EVERY = 32 * 1024**2  # bytes of growth between two reads of the resident memory


class TemplateLimitError(Exception):
    """A budget ran out (raised inside the template, turned into a MinillamaError outside)."""


def _rss_bytes() -> int:
    """The process's resident memory now (Linux /proc), else its peak (getrusage): both only grow here."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Budget:
    """Per-render counters, checked by the loop guard, every call, every operation and every output chunk."""

    def __init__(self, time_limit_s: float, max_iterations: int, max_memory: int = MAX_RENDER_MEMORY):
        self.deadline = time.monotonic() + time_limit_s
        self.time_limit_s = time_limit_s
        self.iterations_left = max_iterations
        self.max_iterations = max_iterations
        self.memory_start, self.max_memory = _rss_bytes(), max_memory
        self.grown = 0  # bytes built since memory was last read

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"did not finish within {self.time_limit_s:g} s")

    def check_memory(self) -> None:
        self.grown = 0
        used = _rss_bytes() - self.memory_start
        if used > self.max_memory:
            raise TemplateLimitError(f"used more than {self.max_memory // 1024**2:,} MB of memory")

    def tick(self) -> None:
        self.iterations_left -= 1
        if self.iterations_left < 0:
            raise TemplateLimitError(f"ran more than {self.max_iterations:,} loop iterations")
        if self.iterations_left % 64 == 0:  # a clock read per iteration would cost more than the loop body
            self.check_time()
            self.check_memory()

    def grow(self, chars: int, what: str = "a string", limit: int = MAX_OUTPUT_CHARS) -> None:
        """About to build a value of `chars` characters (or items): refuse past `limit`, meter the rest."""
        if chars > limit:
            raise TemplateLimitError(f"tried to build {what} of {chars:,} characters or items (limit {limit:,})")
        self.check_time()
        self.grown += 4 * chars  # 4 bytes per character at most (CPython's widest strings)
        if self.grown > _MEMORY_CHECK_EVERY:
            self.check_memory()


# The budget of the render in progress; a context variable so that threads rendering at once don't share one.
BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("minillama_template_budget", default=None)


def _grow(chars: int, what: str = "a string", limit: int = MAX_OUTPUT_CHARS) -> None:
    budget = BUDGET.get()
    if budget is not None:
        budget.grow(chars, what, limit)
    elif chars > limit:  # outside a render (compile-time constant folding): the size limit still holds
        raise TemplateLimitError(f"tried to build {what} of {chars:,} characters or items (limit {limit:,})")


def _length(x: Any) -> int:
    """A cheap size of a value once turned into text: exact for strings, an estimate for the rest."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, bool) or x is None:
        return 5
    if isinstance(x, int):  # decimal digits from the bit length, without converting
        return x.bit_length() * 30103 // 100000 + 2
    if isinstance(x, float):
        return 24
    if isinstance(x, (list, tuple, dict)):
        return 2 + sum(_length(v) + 2 for v in (x.items() if isinstance(x, dict) else x))
    return len(str(x))


# ---- Estimates, before the operation runs ------------------------------------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")


def _args_of(args: Any) -> list[Any]:
    return list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]


def percent_format_size(fmt: str, args: Any) -> int:
    """An upper bound on len(fmt % args): the format, every argument as text, every width and precision
    (a `*` width comes from the arguments, so the largest integer argument stands in for it)."""
    values = _args_of(args)
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    size = len(fmt) + sum(_length(v) for v in values)
    for m in _PERCENT_SPEC.finditer(fmt):
        for number in m.groups():
            size += star if number == "*" else int(number or 0) if len(number or "") < 12 else 10**12
    return size


def brace_format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on len(fmt.format(*args, **kwargs)), the same way (`{:>{w}}` takes its width from
    the arguments)."""
    values = list(args) + list(kwargs.values())
    largest = max((abs(v) for v in values if isinstance(v, int)), default=0)
    size = len(fmt) + sum(_length(v) for v in values)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return size  # a malformed format fails in str.format itself
    for _literal, field, spec, _conversion in fields:
        if field is not None:
            size += _length(values[0]) if values else 0  # a field may repeat an argument: count it again
            digits = "".join(c if c.isdigit() else " " for c in spec or "").split()
            size += sum(int(d) if len(d) < 12 else 10**12 for d in digits)
            size += largest if "{" in (spec or "") else 0
    return size


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `left <operator> right` when the result would be too large to build."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                _grow(len(seq) * max(n, 0), "a sequence", MAX_OUTPUT_CHARS if isinstance(seq, str) else MAX_ITEMS)
        if isinstance(left, int) and isinstance(right, int):
            _check_int_bits(left.bit_length() + right.bit_length(), f"{_short(left)} * {_short(right)}")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        _check_int_bits(right * math.log2(abs(left)), f"{_short(left)} ** {_short(right)}")
    elif operator == "+":
        if isinstance(left, str) and isinstance(right, str):
            _grow(len(left) + len(right))
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            _grow(len(left) + len(right), "a list", MAX_ITEMS)
    elif operator == "%" and isinstance(left, str):
        _grow(percent_format_size(left, right))


def _check_int_bits(bits: float, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(f"tried to compute {what}, an integer of about {int(bits):,} bits "
                                 f"(limit {MAX_INT_BITS:,})")


def _short(x: Any) -> str:
    return str(x) if not isinstance(x, int) or x.bit_length() < 64 else f"<{x.bit_length()}-bit integer>"


def _width(x: Any) -> int:
    return max(x, 0) if isinstance(x, int) else len(x) if isinstance(x, str) else 0


def check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a str method call whose result would be too large (`'x'.ljust(10**9)`, ...)."""
    first = args[0] if args else None
    if name in ("ljust", "rjust", "center", "zfill"):
        _grow(max(len(s), _width(first)))
    elif name == "expandtabs":
        _grow(len(s) + s.count("\t") * _width(first if args else kwargs.get("tabsize", 8)))
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = len(s) + 1 if not args[0] else s.count(args[0])
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            hits = min(hits, args[2])
        _grow(len(s) + hits * max(len(args[1]) - len(args[0]), 0))
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple, str)) else []
        _grow(sum(_length(x) for x in items) + len(s) * max(len(items) - 1, 0))
    elif name in ("format", "format_map"):
        mapping = kwargs if name == "format" else first if isinstance(first, dict) else {}
        _grow(brace_format_size(s, args if name == "format" else (), mapping))
    elif name == "translate" and isinstance(first, dict):
        _grow(len(s) * max([1] + [_length(v) for v in first.values()]))
    elif name in ("split", "rsplit", "splitlines", "encode"):
        _grow(len(s))


# ---- Filters -------------------------------------------------------------------------------------------

def _pre_join(value: Any, d: str = "", attribute: Any = None) -> list:
    items = list(value)  # once: `value` may be a generator (`map`, `select`), which the filter then reads
    if attribute is None:
        _grow(sum(_length(x) for x in items) + _length(d) * max(len(items) - 1, 0))
    return items


def _pre_replace(s: Any, old: Any, new: Any, count: Any = None) -> Any:
    check_str_method(str(s), "replace", (str(old), str(new)) + ((count,) if count is not None else ()), {})
    return s


def _pre_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> Any:
    text = str(s)
    _grow(len(text) + (text.count("\n") + 1) * _width(width))
    return s


def _pre_wordwrap(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None,
                  break_on_hyphens: bool = True) -> Any:
    text = str(s)
    lines = min(len(text), len(text) // max(_width(width), 1) + len(text.split()) + text.count("-")) + 1
    _grow(len(text) + lines * len(str(wrapstring or "\n")))
    return s


def _pre_format(value: Any, *args: Any, **kwargs: Any) -> Any:
    _grow(percent_format_size(str(value), kwargs or args))
    return value


def _pre_center(value: Any, width: Any = 80) -> Any:
    _grow(max(len(str(value)), _width(width)))
    return value


def _pre_count(what: str) -> Any:
    def pre(value: Any, count: Any = 1, fill_with: Any = None) -> Any:
        _grow(_width(count), what, MAX_ITEMS)  # `batch(n, fill)` pads to n items; `slice(n)` makes n lists
        return value
    return pre


_PRE_CHECKS = {"join": _pre_join, "replace": _pre_replace, "indent": _pre_indent, "wordwrap": _pre_wordwrap,
               "format": _pre_format, "center": _pre_center, "batch": _pre_count("a batch"),
               "slice": _pre_count("slices")}


def _check_result(result: Any) -> None:
    if isinstance(result, str):
        _grow(len(result))
    elif isinstance(result, (list, tuple, dict)):
        _grow(len(result), "a list", MAX_ITEMS)


def _metered_filter(name: str, fn: Any) -> Any:
    """`fn` with its size check before (for the filters that build) and its result checked after."""
    pre = _PRE_CHECKS.get(name)
    skip = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0  # the environment/context argument

    def filter_(*args: Any, **kwargs: Any) -> Any:
        if pre is not None and len(args) > skip:
            args = (*args[:skip], pre(*args[skip:], **kwargs), *args[skip + 1:])
        result = fn(*args, **kwargs)
        _check_result(result)
        return result

    filter_.__dict__.update(getattr(fn, "__dict__", {}))  # keeps `jinja_pass_arg`, which tells Jinja what to pass first
    filter_.__name__ = getattr(fn, "__name__", name)
    return filter_


def tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson` (plain JSON, not Jinja's HTML-escaped one), built piece by piece under the budget.

    An indent is at most 64 wide: the encoder builds `indent * depth` in one step, before any check could see it.
    """
    if _width(indent) > 64:
        raise TemplateLimitError(f"asked tojson for an indent of {_width(indent):,} (limit 64)")
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    chunks, size = [], 0
    for chunk in encoder.iterencode(x):
        size += len(chunk)
        if size > MAX_OUTPUT_CHARS:
            raise TemplateLimitError(f"tried to build JSON of more than {MAX_OUTPUT_CHARS:,} characters")
        chunks.append(chunk)
    _grow(size)
    return "".join(chunks)


# ---- Globals -------------------------------------------------------------------------------------------

LOOP_GUARD = "minillama_loop_guard"  # every {% for %} iterable is wrapped in this global
CONCAT = "minillama_concat"  # every `~` is rewritten into a call of this global


def _loop_guard(iterable: Iterable[Any]) -> Iterator[Any]:
    # Jinja has no `while`, so nested `for` loops are the only way to spin without output or calls.
    budget = BUDGET.get()
    for item in iterable:
        if budget is not None:
            budget.tick()
        yield item


def _concat(*parts: Any) -> str:
    _grow(sum(_length(p) for p in parts))
    return "".join(map(str, parts))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    _grow(len(format) * 8)  # %c and friends expand a few-fold; a huge format is refused
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without handing them the `dict` type itself (type-hackery)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which could shadow CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick, so `namespace(self=1)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


# ---- The environment -----------------------------------------------------------------------------------

_BLOCK_OPENERS = {"for", "if", "macro", "call", "filter", "with", "block", "generation", "raw", "autoescape"}


def check_source(source: str) -> None:
    """Size and nesting of a template, checked on the source and its tokens before the (recursive) parser
    runs: a template of a million statements, or nested ten thousand deep, is refused in milliseconds."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateLimitError(f"is {len(source):,} characters long (limit {MAX_TEMPLATE_CHARS:,})")


def check_nesting(tokens: Iterable[tuple[int, str, str]]) -> None:
    depth, tag, tag_assigns = 0, None, False
    for lineno, kind, value in tokens:
        if kind == "block_begin":
            tag, tag_assigns = "", False
        elif kind == "name" and tag == "":
            tag = value
            depth += value in _BLOCK_OPENERS or value.startswith("end") and -1 or 0
        elif kind == "operator":
            depth += (value in "([{") - (value in ")]}")
            tag_assigns = tag_assigns or (tag == "set" and value == "=")
        elif kind == "block_end":
            if tag == "set" and not tag_assigns:  # {% set x %}...{% endset %} is a block
                depth += 1
            tag = None
        if depth > MAX_NESTING:
            raise TemplateLimitError(f"nests blocks and brackets more than {MAX_NESTING} deep (line {lineno})")


class _Metering(jinja2.visitor.NodeTransformer):
    """Rewrites a parsed template so its loops and `~` concatenations go through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(LOOP_GUARD, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.Name(CONCAT, "load"), node.nodes, [], None, None, lineno=node.lineno)


class HardenedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus: unsafe attributes fail at once, and loops, calls, arithmetic,
    concatenation, string methods and filters are metered (see the module docstring)."""

    # Intercepting also stops Jinja from folding `'a' * 10**10` at compile time.
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        check_source(source)
        for reserved in (LOOP_GUARD, CONCAT):  # a template that rebinds one could run unmetered
            if reserved in source:
                raise jinja2.TemplateSyntaxError(f"the name {reserved!r} is reserved", 1, name, filename)
        check_nesting(self.lexer.tokeniter(source, name, filename))
        return _Metering().visit(super()._parse(source, name, filename))

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The stock sandbox returns an Undefined that prints as "" and only fails when used further;
        # a template that reaches for internals is hostile or broken, so say so right away.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = BUDGET.get()
        if budget is not None:  # recursion through macros spins without any loop: meter calls too
            budget.check_time()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox hands out str.format wrapped
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            check_str_method(owner, getattr(method, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


def make_environment() -> HardenedEnvironment:
    env = HardenedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[jinja2.ext.loopcontrols, GenerationTag])
    env.filters["tojson"] = tojson
    env.filters = {name: _metered_filter(name, fn) for name, fn in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals[LOOP_GUARD] = _loop_guard
    env.globals[CONCAT] = _concat
    # `lipsum(10**9)` would be a memory bomb and no chat template uses it.
    env.globals.pop("lipsum", None)
    return env
