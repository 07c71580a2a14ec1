"""Issue 16, through the real CLI: each hostile model directory, GGUF file or transcript gives the one-line
error and exit 2 (or, where the file's request is simply ignored, a normal run), in bounded time, in a child
process whose address space is capped at 3 GiB (see bounded.py). One case or a few per class, with the
variants of each class tested in-process in test_hostile_units.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from bounded import run

MAX_SECONDS = 40  # each case; on an idle machine they take 2-6 s, mostly importing torch


def clone(src: Path, dst: Path, **files: str | bytes | None) -> Path:
    """A copy of a model directory (weights and tokenizer.json linked, not copied) with some files replaced
    (None deletes one)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in files:
            (dst / f.name).symlink_to(f) if f.stat().st_size > 1_000_000 else shutil.copy(f, dst / f.name)
    for name, content in files.items():
        if content is not None:
            (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


def edited_json(path: Path, **changes) -> str:
    data = json.loads(path.read_text())
    data.update(changes)
    return json.dumps(data)


# ---- 1. GGUF headers ---------------------------------------------------------------------------------

def test_gguf_array_count_2_62_is_refused_at_once(tmp_path):
    """The 67-byte file: one metadata array claiming 2**62 strings (it ran forever, 8.6 GB after 60 s)."""
    key = b"tokenizer.ggml.tokens"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, 2**62)
    (tmp_path / "bomb.gguf").write_bytes(data)
    r = run("convert-gguf", str(tmp_path / "bomb.gguf"), str(tmp_path / "out"), timeout=MAX_SECONDS)
    r.assert_one_line_error("claims 4,611,686,018,427,387,904 items")
    assert not (tmp_path / "out").exists() and r.seconds < MAX_SECONDS


# ---- 2. Memory sized by the model's files ------------------------------------------------------------

def test_kv_cache_larger_than_memory_is_one_line(chat_model, tmp_path):
    """A 16M-token context and a model file asking for max_new_tokens 16M: the file's length is capped (with a
    note) and the run stays small; the user asking for 16M is refused before the cache is allocated."""
    model = clone(chat_model, tmp_path / "m",
                  **{"config.json": edited_json(chat_model / "config.json", max_position_embeddings=16_777_216),
                     "generation_config.json": json.dumps({"max_new_tokens": 16_000_000})})
    from minillama.chat import chat_generation_config

    config, sources = chat_generation_config(model)
    assert config.max_new_tokens == 4096 and sources["max_new_tokens"] == "capped"  # generate: prompt + 4096 slots
    r = run("chat", str(model), "--device", "cpu", stdin=b"", timeout=MAX_SECONDS)  # loads, then no message
    assert r.returncode == 0, r.stderr[-2000:]
    assert "asks for max_new_tokens 16,000,000; using 4,096 (--max-new-tokens N gives more)" in r.stderr
    assert r.peak_mb < 1500, r.peak_mb
    r = run("generate", str(model), "-p", "hi", "--device", "cpu", "-n", "16000000", timeout=MAX_SECONDS)
    assert "KV cache of" in r.stderr and "GiB available" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2


def test_tokenizer_padding_to_10_8_is_ignored(chat_model, tmp_path):
    tok = json.loads((chat_model / "tokenizer.json").read_text())
    tok["padding"] = {"strategy": {"Fixed": 100_000_000}, "direction": "Right", "pad_to_multiple_of": None,
                      "pad_id": 0, "pad_type_id": 0, "pad_token": "!"}
    tok["truncation"] = {"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0}
    model = clone(chat_model, tmp_path / "m", **{"tokenizer.json": json.dumps(tok)})
    r = run("generate", str(model), "-p", "hi", "-n", "2", "--greedy", timeout=MAX_SECONDS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.peak_mb < 2000  # padding to 10**8 ids took 10.6 GB before


# ---- 3. Chat templates ---------------------------------------------------------------------------------

def test_template_squaring_an_integer_is_stopped(chat_model, tmp_path):
    """It ran 66 s to 5.3 GB: the 10 s budget never fired inside one big multiplication."""
    template = "{% set ns = namespace(x=7) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}"
    model = clone(chat_model, tmp_path / "m", **{"chat_template.jinja": template})
    r = run("generate", str(model), "-p", "hi", "-n", "1", timeout=MAX_SECONDS)
    r.assert_one_line_error("chat template", "an integer of about")


# ---- 4. Special files ----------------------------------------------------------------------------------

def test_fifo_template_and_fifo_transcript_do_not_hang(chat_model, tmp_path):
    model = clone(chat_model, tmp_path / "m")
    (model / "additional_chat_templates").mkdir()
    os.mkfifo(model / "additional_chat_templates" / "tool_use.jinja")
    r = run("generate", str(model), "-p", "hi", "-n", "1", timeout=MAX_SECONDS)
    r.assert_one_line_error("not a regular file")  # `/load FIFO` in the chat: test_chat_survives_...


# ---- 5. Hostile JSON ------------------------------------------------------------------------------------

def test_deeply_nested_config_is_one_line(chat_model, tmp_path):
    model = clone(chat_model, tmp_path / "m", **{"config.json": "[" * 100_000 + "]" * 100_000})
    r = run("generate", str(model), "-p", "hi", "-n", "1", timeout=MAX_SECONDS)
    r.assert_one_line_error("nested too deeply")  # every other JSON file and shape: test_hostile_units.py


def test_inspect_survives_broken_symlinks(chat_model, tmp_path):
    model = clone(chat_model, tmp_path / "m")
    (model / "dangling.json").symlink_to(tmp_path / "nowhere")
    (model / "loop").symlink_to(model / "loop")
    r = run("inspect", str(model), timeout=MAX_SECONDS)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


# ---- 6. Rust panics --------------------------------------------------------------------------------------

def test_catastrophic_split_regex_is_refused_at_load(chat_model, tmp_path):
    tok = json.loads((chat_model / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    model = clone(chat_model, tmp_path / "m", **{"tokenizer.json": json.dumps(tok)})
    r = run("generate", str(model), "-p", "a" * 40 + "!", "-n", "1", timeout=MAX_SECONDS)
    r.assert_one_line_error("repeats a repeated group")


# ---- 7. The chat keeps going -----------------------------------------------------------------------------

def test_chat_survives_hostile_commands_and_keeps_the_conversation(chat_model, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    huge_int = tmp_path / "int.json"
    huge_int.write_text('{"messages": ' + "9" * 5000 + "}")
    os.mkfifo(tmp_path / "fifo")
    saved = tmp_path / "saved.json"
    lines = [b"first message", f"/load {deep}".encode(), f"/load {huge_int}".encode(), b"/load /dev/zero",
             f"/load {tmp_path / 'fifo'}".encode(), b"/save bad\x00name.json", b"caf\xe9 latin-1 \xff\xfe",
             b"lone surrogate escaped: \xed\xa0\x80", f"/save {saved}".encode()]
    r = run("chat", str(chat_model), "--greedy", "-n", "3", stdin=b"\n".join(lines) + b"\n", timeout=90)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("could not load:") == 4 and r.stderr.count("could not save:") == 1, r.stderr[-3000:]
    messages = json.loads(saved.read_text())["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["first message", "caf\ufffd latin-1 \ufffd\ufffd", "lone surrogate escaped: \ufffd\ufffd\ufffd"]


def test_generate_stdin_not_utf8(chat_model):
    r = run("generate", str(chat_model), "-p", "-", "-n", "2", "--greedy", stdin=b"caf\xe9 \xff", timeout=MAX_SECONDS)
    assert r.returncode == 0, r.stderr[-2000:]



def test_piped_prompt_is_the_same_prompt_as_the_flag(chat_model):
    """`echo X | minillama generate` and `--prompt X` give the model the same tokens (`echo`'s newline is
    dropped, as ollama does): the same prompt length in the stats line and the same text for the same seed.
    --raw, since the Llama 3 template trims messages itself (SmolLM2's ChatML template does not)."""
    import re

    def prompt_tokens(r) -> int:
        assert r.returncode == 0, r.stderr[-2000:]
        return int(re.search(r"\[prompt: (\d+) tokens", r.stderr).group(1))

    args = ("generate", str(chat_model), "--raw", "-n", "4", "--seed", "3")
    flag = run(*args, "-p", "Why is the sky blue?", timeout=MAX_SECONDS)
    for piped in (b"Why is the sky blue?\n", b"Why is the sky blue?\r\n"):
        pipe = run(*args, stdin=piped, timeout=MAX_SECONDS)
        assert prompt_tokens(pipe) == prompt_tokens(flag) and pipe.stdout == flag.stdout
    two = run(*args, stdin=b"Why is the sky blue?\n\n", timeout=MAX_SECONDS)  # only one newline goes
    flag = run(*args, "-p", "Why is the sky blue?\n", timeout=MAX_SECONDS)
    assert prompt_tokens(two) == prompt_tokens(flag) and two.stdout == flag.stdout

# ---- 8. Output paths -------------------------------------------------------------------------------------

def test_output_paths_that_cannot_be_written(chat_model, tiny_gguf, tmp_path):
    r = run("convert-gguf", str(tiny_gguf), "/proc/minillama-out", timeout=MAX_SECONDS)
    r.assert_one_line_error("/proc")  # under a file, /sys, missing folders: test_hostile_units.py
    r = run("dump", str(chat_model), "--prompt", "hi", "--out", "/proc/x.safetensors", timeout=MAX_SECONDS)
    r.assert_one_line_error("/proc: ")  # was FileNotFoundError on its .partial file (root passes os.access)
    (tmp_path / "adir").mkdir()
    r = run("dump", str(chat_model), "--prompt", "hi", "--out", str(tmp_path / "adir"), "--force")
    r.assert_one_line_error("is a directory")
    assert list((tmp_path / "adir").iterdir()) == [] and not list(tmp_path.glob("*.partial"))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama2, tmp_path_factory) -> Path:
    from test_gguf import write_gguf

    return write_gguf(tiny_llama2, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
