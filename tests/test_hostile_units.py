"""Issue 16, in-process: the variants of each class of hostile input (property-based where it fits).

test_hostile_cli.py runs one case per class through the CLI under a memory cap; here each class is covered
wide and fast: GGUF headers and metadata, memory checks, template budgets, special files, hostile JSON,
tokenizer panics, the chat's commands, and output paths.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from bounded import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillama.chat_template import ChatTemplate
from minillama.errors import MinillamaError
from minillama.files import (check_output_file, locked_temp_dir, partial_path, read_bytes, read_json_object,
                             remove_stale_dirs)
from minillama.gguf import convert_gguf
from minillama.kv_cache import KVCache
from minillama.tokenizer import load_tokenizer, nested_quantifier

# ---- 1. GGUF ---------------------------------------------------------------------------------------------

TOKENS = ["<s>", "</s>", "a", "b", "c", "ab", "abc", "d"]


def tiny_gguf(path: Path, meta: dict | None = None, drop: tuple = (), tensor_type: str = "f32") -> Path:
    """A complete one-layer llama GGUF (hidden 8, 2 heads, 1 kv head, vocab 8), metadata overridable."""
    w = gguf.GGUFWriter(path, "llama")
    values = {"llama.block_count": 1, "llama.context_length": 64, "llama.embedding_length": 8,
              "llama.feed_forward_length": 16, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
              "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": ["a b", "ab c"],
              "tokenizer.ggml.token_type": [3, 3] + [1] * 6, "tokenizer.ggml.bos_token_id": 0,
              "tokenizer.ggml.eos_token_id": 1, **(meta or {})}
    for key, value in values.items():
        if key in drop:
            continue
        kind = gguf.GGUFValueType.get_type(value)
        if kind == gguf.GGUFValueType.INT32 and value >= 0:
            kind = gguf.GGUFValueType.UINT32 if value < 2**32 else gguf.GGUFValueType.UINT64
        sub = gguf.GGUFValueType.get_type(value[0]) if isinstance(value, list) and value else None
        w.add_key_value(key, value, kind, sub_type=sub)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (8, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8),
              "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    dtypes = {"f32": np.float32, "f64": np.float64, "i32": np.int32}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32 if len(shape) == 1 else dtypes[tensor_type]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_converts(tmp_path):
    convert_gguf(tiny_gguf(tmp_path / "ok.gguf"), tmp_path / "out", progress=False)
    assert load_tokenizer(tmp_path / "out").encode("abc", add_special_tokens=False) == [6]


@pytest.mark.parametrize("meta, drop, fragment", [
    ({"llama.attention.head_count": 0}, (), "head_count"),
    ({"llama.attention.head_count_kv": 3}, (), "num_key_value_heads"),
    ({"llama.embedding_length": "eight"}, (), "embedding_length"),
    ({"llama.block_count": 2.5}, (), "block_count"),
    ({"tokenizer.ggml.tokens": [1, 2, 3]}, (), "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.bos_token_id": 99}, (), "bos_token_id"),
    ({"tokenizer.ggml.eos_token_id": -1}, (), "eos_token_id"),
    ({"tokenizer.ggml.token_type": [1, 1]}, (), "token_type"),
    ({"llama.context_length": 2**40}, (), "max_position_embeddings"),
    ({}, ("llama.feed_forward_length",), "missing"),
    ({"tokenizer.chat_template": 5}, (), "chat_template"),
])
def test_bad_gguf_metadata_is_one_line(tmp_path, meta, drop, fragment):
    path = tiny_gguf(tmp_path / "bad.gguf", meta, drop)
    with pytest.raises(MinillamaError, match=fragment) as e:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["f64", "i32"])
def test_unsupported_tensor_types(tmp_path, kind):
    with pytest.raises(MinillamaError, match=f"type {kind.upper()}"):
        convert_gguf(tiny_gguf(tmp_path / "t.gguf", tensor_type=kind), tmp_path / "out", progress=False)


def test_q8_1_and_duplicate_keys(tmp_path):
    good = tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    f32 = struct.pack("<I", 0)
    at = good.index(b"blk.0.ffn_up.weight") + len(b"blk.0.ffn_up.weight") + 4 + 16  # name, n_dims, 2 dims
    assert good[at:at + 4] == f32
    (tmp_path / "q81.gguf").write_bytes(good[:at] + struct.pack("<I", 9) + good[at + 4:])
    with pytest.raises(MinillamaError, match="type Q8_1"):
        convert_gguf(tmp_path / "q81.gguf", tmp_path / "o1", progress=False)
    dup = good.replace(b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eos_token_id", 1)  # same length
    (tmp_path / "dup.gguf").write_bytes(dup)
    with pytest.raises(MinillamaError, match="appears twice"):
        convert_gguf(tmp_path / "dup.gguf", tmp_path / "o2", progress=False)


@pytest.fixture(scope="module")
def good_gguf_bytes(tmp_path_factory) -> bytes:
    return tiny_gguf(tmp_path_factory.mktemp("g") / "ok.gguf").read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damaged_gguf_converts_or_gives_one_line(good_gguf_bytes, tmp_path_factory, data):
    """Truncations and 64-bit values written over the header: a model or one line, never anything else."""
    raw = bytearray(good_gguf_bytes)
    header_end = len(raw) - 4 * 8 * 60  # roughly where tensor data starts; damage the header mostly
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(4, max(header_end, 12)))
        raw[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 7, 2**31, 2**32 - 1, 2**60, 2**64 - 1])))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    d = tmp_path_factory.mktemp("fuzz")
    (d / "x.gguf").write_bytes(bytes(raw))
    start = time.perf_counter()
    try:
        convert_gguf(d / "x.gguf", d / "out", progress=False)
    except MinillamaError as e:
        assert "\n" not in str(e)
    assert time.perf_counter() - start < 10
    shutil.rmtree(d)


def test_gguf_header_cases_in_bounded_memory(tmp_path):
    """Counts of 2**60 everywhere a count is, run together under the 3 GiB cap: one line each, at once."""
    code = '''
import struct, sys, time
from pathlib import Path
from minillama.gguf import convert_gguf
from minillama.errors import MinillamaError
def s(x): b = x.encode(); return struct.pack("<Q", len(b)) + b
h = lambda nt, nkv: b"GGUF" + struct.pack("<IQQ", 3, nt, nkv)
cases = [h(0, 1) + s("a") + struct.pack("<IIQ", 9, 4, 2**60), h(0, 2**60) + s("a"), h(2**60, 0),
         h(0, 1) + s("a") + struct.pack("<IQ", 8, 2**62), h(0, 1) + struct.pack("<Q", 2**63),
         h(1, 0) + s("x.weight") + struct.pack("<IQIQ", 1, 2**40, 0, 0) + bytes(64), b"GGUF"]
d = Path(sys.argv[1])
for i, data in enumerate(cases):
    (d / f"{i}.gguf").write_bytes(data)
    try:
        convert_gguf(d / f"{i}.gguf", d / f"out{i}", progress=False)
        print("CONVERTED")
    except MinillamaError as e:
        print("ERROR", str(e).count(chr(10)))
'''
    r = run("-c", code, str(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:-1] == ["ERROR 0"] * 7


# ---- 2. Memory ---------------------------------------------------------------------------------------------

def test_kv_cache_checks_memory_first(monkeypatch):
    import minillama.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1024**3)
    with pytest.raises(MinillamaError, match="KV cache of 1,000,000 tokens needs"):
        KVCache(32, 1, 1_000_000, 8, 128, torch.bfloat16, "cpu")
    assert KVCache(2, 1, 16, 1, 8, torch.float32, "cpu").max_seq_len == 16


def test_available_memory_sees_the_address_space_limit(tmp_path):
    code = "from minillama.memory import available_bytes; print(available_bytes('cpu') // 2**20)"
    r = run("-c", code, timeout=60, limit=2 * 1024**3)
    assert r.returncode == 0 and 0 < int(r.stdout) < 2048, (r.stdout, r.stderr[-1000:])


# ---- 3. Templates ------------------------------------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "pow": "{{ 10 ** 100000000 }}",
    "double +": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "double join": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = [ns.s, ns.s]|join %}"
                   "{% endfor %}",
    "join separator": "{{ range(100000)|join('x' * 1000) }}",
    "replace": "{{ ('a' * 100000)|replace('', 'b' * 1000) }}",
    "center": "{{ 'x'|center(1000000000) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "zfill": "{{ 'x'.zfill(999999999) }}",
    "percent width": "{{ '%999999999d' % 1 }}",
    "percent star": "{{ '%*d' % (999999999, 1) }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "format nested": "{{ '{:>{w}}'.format(1, w=999999999) }}",
    "format filter": "{{ '%999999999s'|format('a') }}",
    "indent": "{{ ('a\n' * 1000)|indent(10000000) }}",
    "tojson indent": "{{ [1, [2, [3]]]|tojson(indent=1000000000) }}",
    "batch": "{{ [1]|batch(1000000000, 'x')|list }}",
    "slice": "{{ [1]|slice(100000000)|list }}",
    "wordwrap": "{{ ('a ' * 2000000)|wordwrap(1, wrapstring='x' * 100) }}",
    "list doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "expandtabs": "{{ ('\t' * 1000000).expandtabs(1000) }}",
    "many big strings": "{% set ns = namespace(l=[]) %}{% for i in range(300) %}"
                        "{% set ns.l = ns.l + [('x' * 9000000) ~ i] %}{% endfor %}",
    "brackets": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "blocks": "{% if 1 %}" * 3000 + "{% endif %}" * 3000,
    "unary chain": "{{ " + "not " * 20000 + "1 }}",
    "filter chain": "{{ 1" + "|abs" * 20000 + " }}",
    "long source": "{{ 1 }}" * 300000,
    "macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


def test_every_growing_template_is_stopped_in_bounded_memory_and_time(tmp_path):
    """All of HOSTILE_TEMPLATES in one child capped at 3 GiB: each a one-line error within seconds."""
    code = '''
import json, sys, time
from minillama.chat_template import ChatTemplate
from minillama.errors import MinillamaError
out = {}
for name, source in json.load(open(sys.argv[1])).items():
    start = time.perf_counter()
    try:
        ChatTemplate(source, "t").render([{"role": "user", "content": "hi"}])
        out[name] = ["rendered", 0]
    except MinillamaError as e:
        out[name] = [str(e), time.perf_counter() - start]
print(json.dumps(out))
'''
    (tmp_path / "templates.json").write_text(json.dumps(HOSTILE_TEMPLATES))
    r = run("-c", code, str(tmp_path / "templates.json"), timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout)
    for name, (message, seconds) in results.items():
        assert message.startswith("chat template from t "), (name, message)
        assert "\n" not in message and seconds < 12, (name, message, seconds)


GROWERS = {"+": "ns.v + ns.v", "~": "ns.v ~ ns.v", "*": "ns.v * ns.v", "join": "[ns.v, ns.v]|join",
           "format": "'%s%s' % (ns.v, ns.v)", "replace": "(ns.v ~ '')|replace('a', 'aa')"}


@settings(max_examples=30, deadline=None)
@given(op=st.sampled_from(sorted(GROWERS)), seed=st.sampled_from(["'a'", "'ab' * 1000", "3", "10**300", "[1, 2]"]),
       steps=st.integers(1, 64))
def test_repeated_growth_renders_or_stops(op, seed, steps):
    """Any growing operation repeated in a loop either fits the budgets or stops with one line, quickly."""
    source = (f"{{% set ns = namespace(v={seed}) %}}{{% for i in range({steps}) %}}{{% set ns.v = {GROWERS[op]} %}}"
              "{% endfor %}{{ ns.v|length if ns.v is string else 1 }}")
    start = time.perf_counter()
    try:
        ChatTemplate(source, "t").render([{"role": "user", "content": "x"}])
    except MinillamaError as e:
        assert "\n" not in str(e)
    assert time.perf_counter() - start < 8


def test_real_templates_are_untouched():
    t = ChatTemplate("{% for m in messages %}{{ m.role ~ ': ' ~ m.content|trim }}\n{% endfor %}"
                     "{{ messages|tojson(indent=2)|length > 0 }} {{ '%-6s|' % 'ab' }} {{ '{:>4}'.format(7) }}", "t")
    assert t.render([{"role": "user", "content": " hi "}]) == 'user: hi\nTrue ab    |    7'


# ---- 4. Special files --------------------------------------------------------------------------------------

def test_only_regular_files_are_read(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path, fragment in ((tmp_path / "fifo", "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                           (tmp_path, "a directory"), (tmp_path / "none", "no such file")):
        start = time.perf_counter()
        with pytest.raises(MinillamaError, match=fragment):
            read_bytes(path, 1000)
        assert time.perf_counter() - start < 1
    (tmp_path / "big").write_bytes(b"x" * 1001)
    with pytest.raises(MinillamaError, match="more than any real"):
        read_bytes(tmp_path / "big", 1000)


# ---- 5. Hostile JSON --------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.sampled_from(["[" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000, "1" * 5000,
                             '{"x": 1' + "0" * 4400 + "}", "\ud800", "", "{", "[1,]"]) | st.text(max_size=50))
def test_any_json_file_reads_or_gives_one_line(tmp_path, text):
    (tmp_path / "f.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        assert isinstance(read_json_object(tmp_path / "f.json"), dict)
    except MinillamaError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, chat_model) -> Path:
    return chat_model


@pytest.mark.parametrize("name, text", [
    ("config.json", '{"model_type": "llama", "rms_norm_eps": 1' + "0" * 400 + "}"),
    ("generation_config.json", '{"temperature": 1' + "0" * 400 + "}"),
    ("generation_config.json", '{"top_p": ' + "[" * 100_000 + "}"),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"x": {"content": "a"}}}'),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"5": 7}}'),
    ("special_tokens_map.json", "[" * 100_000),
    ("model.safetensors.index.json", '{"weight_map": ' + "[" * 100_000 + "}"),
])
def test_each_json_file_of_a_model_directory(chat_model, tmp_path, name, text):
    from minillama.cli import main

    model = tmp_path / "m"
    model.mkdir()
    for f in chat_model.iterdir():
        (model / f.name).symlink_to(f)
    (model / name).unlink(missing_ok=True)
    (model / name).write_text(text)
    assert main(["generate", str(model), "-p", "hi", "-n", "1", "--device", "cpu"]) == 2


# ---- 6. Tokenizer panics and validation -------------------------------------------------------------------

def _tokenizer_dir(tmp_path: Path, **changes) -> Path:
    from tokenizers import Tokenizer, models

    tok = json.loads(Tokenizer(models.BPE(vocab={"a": 0, "!": 1, "b": 2}, merges=[])).to_str())
    tok.update(changes)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    return tmp_path


@pytest.mark.parametrize("changes, fragment", [
    ({"normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA"}}, "not a valid tokenizer file"),
    ({"normalizer": {"type": "Precompiled", "precompiled_charsmap": ""}}, "not a valid tokenizer file"),
    ({"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "[UNK]"}}, "cannot encode"),
    ({"model": {"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": None}}, "cannot encode"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(?:x\\s*)*$"}, "behavior": "Isolated",
                        "invert": False}}, "repeated group"),
])
def test_broken_tokenizers_fail_at_load_in_one_line(tmp_path, capfd, changes, fragment):
    with pytest.raises(MinillamaError, match=fragment):
        load_tokenizer(_tokenizer_dir(tmp_path, **changes))
    assert "panicked" not in capfd.readouterr().err  # the Rust message is not shown on top of ours


def test_nested_quantifiers():
    from minillama.gguf import _LLAMA3

    assert all(nested_quantifier(p) for p in ["(a+)+$", "(a*)*", "(a{2,})+", "((a+))+", "(?:\\s*x)+"])
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    assert not any(nested_quantifier(p) for p in [_LLAMA3, gpt2, "[(+)]+", r"\(a+\)+", "(a|b)+", "((a)+)"])


def test_a_panic_at_encode_is_one_line(tmp_path):
    from minillama.tokenizer import rust_call

    class PanicException(BaseException):
        pass

    PanicException.__module__ = "pyo3_runtime"

    def panics(text):
        raise PanicException("Onig: retry-limit-in-match over")

    with pytest.raises(MinillamaError, match="retry-limit"):
        rust_call("cannot encode", panics, "x")
    with pytest.raises(KeyboardInterrupt):
        rust_call("x", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))


# ---- 7. The chat's commands ------------------------------------------------------------------------------

def test_seed_out_of_range_is_one_line(chat_model):
    from minillama.cli import main

    assert main(["generate", str(chat_model), "-p", "hi", "--seed", str(2**64)]) == 2
    assert main(["generate", str(chat_model), "-p", "hi", "--seed", "-1"]) == 2


def test_save_does_not_replace_a_file_that_is_not_a_transcript(tmp_path):
    from minillama.cli.chat import check_save_target

    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(MinillamaError, match="not a minillama transcript"):
        check_save_target(tmp_path / "notes.txt")
    (tmp_path / "old.json").write_text(json.dumps({"format": "minillama-chat/1", "messages": []}))
    check_save_target(tmp_path / "old.json")  # saving again under the same name is fine
    check_save_target(tmp_path / "new.json")



def test_transcripts_are_bounded_before_they_are_parsed_or_tokenized(chat_model, tmp_path):
    """/load of 10**6 messages peaked at 5.2 GB, one 20 MB message at 2.9 GB: the file's size and message count
    are checked before parsing, each message against the context before tokenizing, and a refused transcript
    leaves the conversation as it was. Bad JSON says what the file should be, not "re-download"."""
    import minillama
    from minillama.chat import ChatSession
    from minillama.cli.chat import MAX_TRANSCRIPT_MESSAGES, TRANSCRIPT_LIMIT, read_transcript

    many = tmp_path / "many.json"
    many.write_text(json.dumps({"messages": [{"role": "user", "content": ""}] * (MAX_TRANSCRIPT_MESSAGES + 1)}))
    assert many.stat().st_size < TRANSCRIPT_LIMIT
    with pytest.raises(MinillamaError, match="more than 100,000 messages"):
        read_transcript(str(many))
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * TRANSCRIPT_LIMIT}]}))
    with pytest.raises(MinillamaError, match="is more than any real transcript"):
        read_transcript(str(big))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MinillamaError, match="is it a conversation saved with /save") as e:
        read_transcript(str(bad))
    assert "re-download" not in str(e.value)

    session = ChatSession(minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model),
                          minillama.GenerationConfig(max_new_tokens=2), context=64)
    session.messages = [{"role": "user", "content": "kept"}, {"role": "assistant", "content": "yes"}]
    long = {"messages": [{"role": "user", "content": "word " * (64 * 64)}]}
    with pytest.raises(MinillamaError, match="message 1 of the transcript holds 20,480 characters, far more"):
        session.load_transcript(long)
    assert session.messages[0]["content"] == "kept"

# ---- 8. Output paths and leftovers -----------------------------------------------------------------------

def test_output_file_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    for path, fragment in ((tmp_path / "missing" / "x", "no such directory"), (tmp_path, "is a directory"),
                           (tmp_path / "f", "exists"), (tmp_path / "f" / "x", "no such directory"),
                           ("a\0b", "NUL"), ("/proc/x.safetensors", "/proc: (cannot create files there|not writable)"),
                           ("/sys/x", "/sys")):  # /proc passes os.access for root, and refused the .partial file
        with pytest.raises(MinillamaError, match=fragment):
            check_output_file(path)
    assert check_output_file(tmp_path / "f", force=True) == tmp_path / "f"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe leaves nothing behind
    (tmp_path / "x.partial").write_text("the user's own file")
    tmp = partial_path(tmp_path / "x")
    assert tmp != tmp_path / "x.partial" and tmp.parent == tmp_path
    assert (tmp_path / "x.partial").read_text() == "the user's own file"


@pytest.mark.parametrize("out", ["/sys/minillama-out", "/proc/self/minillama/out", "FILE/out"])
def test_convert_into_impossible_places(tmp_path, out):
    gguf_file = tiny_gguf(tmp_path / "ok.gguf")
    out = out.replace("FILE", str(gguf_file))
    with pytest.raises(MinillamaError):
        convert_gguf(gguf_file, out, progress=False)


def test_stale_partial_dirs_are_removed_but_not_live_ones(tmp_path):
    dead = tmp_path / ".m.partial-dead"
    dead.mkdir()
    with locked_temp_dir(tmp_path, ".m.partial-") as live:
        os.utime(live, (0, 0))
        assert remove_stale_dirs(tmp_path, ".m.partial-", min_age_s=0) == [dead]
        assert live.is_dir()
    os.utime(live, (0, 0))
    assert remove_stale_dirs(tmp_path, ".m.partial-") == [live]


def test_two_first_runs_at_once_share_one_conversion(tmp_path, monkeypatch):
    import minillama.hub as hub

    source = tiny_gguf(tmp_path / "default.gguf")
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path / "cache"))
    calls = []

    def fetch(tmp, offline=False):
        calls.append(1)
        time.sleep(0.5)  # both runs are inside default_model at once
        return source

    monkeypatch.setattr(hub, "fetch_default_gguf", fetch)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".download-killed").mkdir()  # left by a run killed earlier
    os.utime(tmp_path / "cache" / ".download-killed", (0, 0))
    results, errors = [], []

    def first_run():
        try:
            results.append(hub.default_model())
        except Exception as e:  # noqa: BLE001  (any error is the failure this test looks for)
            errors.append(e)

    threads = [threading.Thread(target=first_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1] and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".smollm2-135m-instruct.lock",
                                                                      "smollm2-135m-instruct"]


# ---- 9. Numbers past any range -------------------------------------------------------------------------------

def test_numbers_past_any_range_name_their_field(chat_model, tmp_path):
    """`original_max_position_embeddings: 1e300` in a llama3 rope config and `eos_token_id: 10**400` in a
    generation_config.json both ended in OverflowError inside torch; each is refused where it is read, naming
    the field, for the CLI's settings (chat_generation_config) and load_model alike."""
    import json

    from conftest import TINY

    import minillama
    from minillama.chat import chat_generation_config
    from minillama.config import LlamaConfig

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1e300}
    with pytest.raises(MinillamaError, match="field 'rope_scaling.original_max_position_embeddings' must be a whole"):
        LlamaConfig.from_dict({"model_type": "llama", **TINY, "rope_scaling": rope})
    rope["original_max_position_embeddings"] = 8192.0  # a float that is a whole number still reads
    assert LlamaConfig.from_dict({"model_type": "llama", **TINY, "rope_scaling": rope}).rope_scaling[
        "original_max_position_embeddings"] == 8192
    with pytest.raises(MinillamaError, match="field 'eos_token_id' holds an id past any vocabulary"):
        LlamaConfig.from_dict({"model_type": "llama", **TINY, "eos_token_id": [2, 10**400]})

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in chat_model.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "generation_config.json").unlink()
    for field, value in (("eos_token_id", 10**400), ("pad_token_id", 2**63)):
        (bad / "generation_config.json").write_text(json.dumps({field: value}))
        with pytest.raises(MinillamaError, match=f"generation_config.json: field '{field}' holds an id past") as e:
            chat_generation_config(bad)
        assert "0" * 50 not in str(e.value)  # the number is cut short, the line stays one line
        with pytest.raises(MinillamaError, match=f"field '{field}'"):
            minillama.load_model(bad)


def test_a_template_list_with_names_that_are_not_strings_is_one_line():
    """A chat_template list whose names mix integers and strings, without a "default": sorting the names for
    the message raised TypeError ('<' not supported between 'str' and 'int')."""
    from minillama.chat_template import load_chat_template

    value = [{"name": 1, "template": "{{ messages }}"}, {"name": "tool_use", "template": "{{ messages }}"}]
    with pytest.raises(MinillamaError, match="chat template names in tokenizer_config.json must be strings, got 1"):
        load_chat_template(Path("/nonexistent"), {"chat_template": value}).pick()
