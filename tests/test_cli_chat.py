"""`minillama chat` and `minillama generate` driven as a user would: through a pipe and a pseudo-terminal.

The model is a tiny random Llama with the real Llama 3.2 tokenizer, so the template, the special tokens
and the eos list are real while each reply costs milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pexpect
import pytest
import torch

import minillama
from minillama.chat import ChatSession
from minillama.generation import GenerationConfig
from minillama.tokenizer import load_tokenizer

CLI = [sys.executable, "-m", "minillama"]


def run_cli(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_pipe_answers_each_line_and_reuses_the_cache(chat_model, tmp_path):
    transcript = tmp_path / "chat.json"
    r = run_cli("chat", str(chat_model), "--greedy", "-n", "12", "--system", "Be brief.",
                stdin=f"Hello there\nAnd again, please\n/save {transcript}\n")
    assert r.returncode == 0, r.stderr
    saved = json.loads(transcript.read_text())
    replies = [m["content"] for m in saved["messages"] if m["role"] == "assistant"]
    assert len(replies) == 2 and all(replies)
    assert r.stdout == "".join(reply + "\n" for reply in replies)  # each reply streamed, then a newline
    stats = [line for line in r.stderr.splitlines() if line.startswith("[prompt:")]
    assert len(stats) == 2
    # Turn 1 prefills the whole rendered prompt; turn 2 only what follows the cached prefix.
    first_prefill = int(stats[0].split("prompt: ")[1].split(" ")[0])
    second_prefill = int(stats[1].split("prompt: ")[1].split(" ")[0])
    tok = load_tokenizer(chat_model)
    turn1 = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, saved["messages"][0]],
                                    add_generation_prompt=True, tokenize=True)
    everything = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + saved["messages"][:3],
                                         add_generation_prompt=True, tokenize=True)
    assert first_prefill == len(turn1)
    assert second_prefill < len(everything) - len(turn1) + 12  # at most the unseen tail, not the whole chat
    assert second_prefill >= len(everything) - len(turn1) - 12
    # the transcript holds both turns, the system prompt and the settings
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["system"] == "Be brief." and saved["settings"]["max_new_tokens"] == 12
    assert saved["settings"]["do_sample"] is False


def test_greedy_reply_is_the_session_reply(chat_model):
    """The CLI prints exactly what ChatSession (and so generate) produces for the same input."""
    r = run_cli("chat", str(chat_model), "--greedy", "-n", "10", stdin="Tell me a story\n")
    model, tok = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    session = ChatSession(model, tok, GenerationConfig.from_model_dir(chat_model).updated(do_sample=False,
                                                                                          max_new_tokens=10))
    assert r.stdout == "".join(session.send("Tell me a story")) + "\n"


def test_saved_transcript_reloads(chat_model, tmp_path):
    transcript = tmp_path / "t.json"
    run_cli("chat", str(chat_model), "--greedy", "-n", "6", stdin=f"first question\n/save {transcript}\n")
    saved = json.loads(transcript.read_text())
    again = tmp_path / "again.json"
    r = run_cli("chat", str(chat_model), "--greedy", "-n", "6", "--load", str(transcript),
                stdin=f"second question\n/save {again}\n")
    assert r.returncode == 0, r.stderr
    messages = json.loads(again.read_text())["messages"]
    assert messages[:2] == saved["messages"] and messages[2]["content"] == "second question"
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file behind


def test_clear_gives_a_fresh_session(chat_model, tmp_path):
    """After /clear, the same input (sampled, seeded) produces what a fresh session produces."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    r = run_cli("chat", str(chat_model), "--seed", "7", "-n", "8",
                stdin=f"one\n/save {a}\ntwo\n/clear\none\n/save {b}\n")
    assert r.returncode == 0, r.stderr
    first, again = json.loads(a.read_text())["messages"], json.loads(b.read_text())["messages"]
    assert len(first) == len(again) == 2 and first == again


def test_context_full_is_reported_not_truncated(chat_model):
    r = run_cli("chat", str(chat_model), "--greedy", "-n", "20", "--context", "60",
                stdin="hello\nsay more\nand more\n")
    assert r.returncode == 0
    assert "context full" in r.stderr
    assert "Traceback" not in r.stderr


def test_commands_and_errors(chat_model):
    r = run_cli("chat", str(chat_model), "-n", "3", stdin="/help\n/nonsense\n/system You are a cat.\n/exit\nnot read\n")
    assert r.returncode == 0 and r.stdout == ""
    assert "/save FILE" in r.stderr and "unknown command /nonsense" in r.stderr and "system prompt set" in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-3"], "top_k must be >= 0"),
    (["--min-p", "2"], "min_p must be in [0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--device", "tpu9"], "device"),
    (["--dtype", "int4"], "unknown dtype"),
])
def test_bad_flags_exit_2_with_one_line(chat_model, flags, message):
    r = run_cli("chat", str(chat_model), *flags, stdin="hi\n")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cuda_without_cuda_exits_2(chat_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_cli("chat", str(chat_model), "--device", "cuda", stdin="hi\n")
    assert r.returncode == 2 and "no usable CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_generate_prints_only_the_completion(chat_model):
    r = run_cli("generate", str(chat_model), "--prompt", "Name a color", "--greedy", "-n", "9")
    assert r.returncode == 0, r.stderr
    model, tok = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a color"}], tokenize=True)
    expected = tok.decode(list(minillama.generation.generate(model, ids, max_new_tokens=9, do_sample=False)),
                          skip_special_tokens=True)
    assert r.stdout == expected + "\n"
    assert "[prompt:" in r.stderr  # stats on stderr only
    raw = run_cli("generate", str(chat_model), "--prompt", "Once upon", "--raw", "--greedy", "-n", "5")
    ids = tok.encode("Once upon")
    completion = minillama.generation.generate(model, ids, max_new_tokens=5, do_sample=False)
    assert raw.stdout == tok.decode(list(completion), skip_special_tokens=True) + "\n"


def test_compile_notice_and_engines(chat_model):
    """When the compiled engine is chosen (the default on CUDA; --engine compiled here on CPU) the user is told
    before the wait; the eager engine does not compile, and the completion is the same either way."""
    args = ("generate", str(chat_model), "--prompt", "Name a color", "--greedy", "-n", "6")
    compiled = run_cli(*args, "--engine", "compiled")
    assert compiled.returncode == 0, compiled.stderr
    assert "compiling the decode step" in compiled.stderr and "--no-compile skips it" in compiled.stderr
    eager = run_cli(*args, "--engine", "eager")
    assert eager.returncode == 0, eager.stderr
    assert "compiling" not in eager.stderr
    assert eager.stdout == compiled.stdout
    contradiction = run_cli(*args, "--engine", "compiled", "--no-compile")
    assert contradiction.returncode == 2 and "--no-compile contradicts --engine compiled" in contradiction.stderr


def test_empty_prompt_and_missing_model_exit_2(tmp_path):
    r = run_cli("generate", str(tmp_path / "nowhere"), "--prompt", "   ")
    assert r.returncode == 2 and "prompt is empty" in r.stderr
    r = run_cli("generate", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr


# ---- a pseudo-terminal: what a person at a keyboard sees --------------------------------------------

def spawn_chat(*args: str, env: dict | None = None):
    child = pexpect.spawn(CLI[0], [*CLI[1:], "chat", *args], encoding="utf-8", timeout=60,
                          env={**os.environ, "TERM": "dumb", **(env or {})}, dimensions=(40, 200))
    child.expect(">>> ")
    return child


def test_default_model_reaches_a_chat_prompt_and_answers(smollm2_dir):
    """What the README's first command ends in: `minillama chat` with no arguments, on the real default model."""
    child = spawn_chat("--greedy", "-n", "30", env={"MINILLAMA_CACHE": str(smollm2_dir.parent)})
    assert "smollm2-135m-instruct" in child.before and "tokenizer_config.json" in child.before
    child.sendline("What is the capital of France?")
    child.expect(r"\[prompt: \d+ tokens")
    assert "Paris" in child.before
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_tty_session_commands_multiline_and_exit(chat_model):
    child = spawn_chat(str(chat_model), "--greedy", "-n", "5")
    assert "chat template: built-in Llama 3 format" in child.before
    child.sendline("/help")
    child.expect("/clear")
    child.expect(">>> ")
    child.sendline('"""')
    child.expect(r"\.\.\. ")
    child.sendline("line one")
    child.expect(r"\.\.\. ")
    child.sendline('line two"""')
    child.expect(r"\[prompt: \d+ tokens")
    child.expect(">>> ")
    child.sendeof()  # Ctrl-D exits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_tty_ctrl_c_stops_the_reply_and_keeps_the_session(chat_model):
    child = spawn_chat(str(chat_model), "-n", "4000", "--seed", "1")  # a long reply to interrupt
    child.sendline("talk for a long time")
    child.expect("talk for a long time\r\n")  # the terminal's echo of the line
    child.expect(r"\S", timeout=60)  # the reply has started streaming
    child.sendintr()  # Ctrl-C
    child.expect(r"reply stopped")
    child.expect(r"\[prompt: \d+ tokens, [\d.]+ tok/s \| reply: (\d+) tokens")
    assert 0 < int(child.match.group(1)) < 4000
    child.expect(">>> ")
    child.sendline("short now")  # the session goes on
    child.expect("short now\r\n")
    child.sendintr()  # stops this reply too, or (if it already ended) asks at the prompt
    child.expect(">>> ")
    child.sendintr()  # a second Ctrl-C in a row: exit
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
