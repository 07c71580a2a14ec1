"""Every user mistake the CLI can meet gets one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minillama", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minillama: error: ") and message in lines[0], r.stderr


def test_prompt_longer_than_the_context(chat_model, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(chat_model, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (small / "config.json").write_text(json.dumps(config))
    r = run_cli("generate", str(small), "--prompt", "word " * 100, "-n", "5")
    assert_one_line_error(r, "exceeds the context of 64 tokens")


def test_non_finite_logits_stop_generation(chat_model, tmp_path):
    """Finite but absurd weights overflow to inf inside the forward: a message, not garbage tokens."""
    broken = tmp_path / "broken"
    shutil.copytree(chat_model, broken)
    state = load_file(broken / "model.safetensors")
    state["model.norm.weight"][0] = 3e38  # finite (float32 tops out at 3.4e38), but x * 3e38 overflows
    save_file(state, broken / "model.safetensors")
    r = run_cli("generate", str(broken), "--prompt", "hello", "-n", "5", "--greedy")
    assert_one_line_error(r, "NaN or infinite logits")


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", ""], "prompt is empty"),
    (["generate", "/no/such/dir", "--prompt", "hi"], "not a model directory"),
    (["generate", "--prompt", "hi", "--device", "quantum"], "unknown device 'quantum'"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "temperature must be"),
    (["chat", "--context", "1"], "--context must be at least 2"),
    (["inspect", "/no/such/dir"], "/no/such/dir"),
])
def test_messages(args, message, chat_model):
    args = [str(chat_model) if a == "MODEL" else a for a in args]
    if args[0] in ("generate", "chat") and not (len(args) > 1 and args[1].startswith("/")):
        args.insert(1, str(chat_model))
    assert_one_line_error(run_cli(*args), message)


def test_dump_refuses_to_overwrite(chat_model, tmp_path):
    out = tmp_path / "acts.safetensors"
    out.write_bytes(b"precious")
    r = run_cli("dump", str(chat_model), "--prompt", "hi", "--out", str(out))
    assert_one_line_error(r, "--force")
    assert out.read_bytes() == b"precious"


def test_model_without_a_chat_template(chat_model, tmp_path):
    """A base model (no template, not a Llama 3 tokenizer) cannot chat: say so and point at --raw."""
    import json as _json

    base = tmp_path / "base"
    shutil.copytree(chat_model, base)
    tokenizer = _json.loads((base / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if "header_id" not in t["content"]]
    (base / "tokenizer.json").write_text(_json.dumps(tokenizer))
    config = _json.loads((base / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if "header_id" not in v["content"]}
    (base / "tokenizer_config.json").write_text(_json.dumps(config))
    assert_one_line_error(run_cli("chat", str(base), stdin="hi\n"), "has no chat template")
    assert_one_line_error(run_cli("generate", str(base), "--prompt", "hi"), "pass --raw")
    r = run_cli("generate", str(base), "--prompt", "hi", "--raw", "-n", "3")
    assert r.returncode == 0, r.stderr


def test_offline_without_the_default_model_suggests_no_other_name(tmp_path, monkeypatch, capsys):
    """`--offline` with an empty cache and the default model not installed: the error says what to do, with no
    "did you mean smollm2-135m-instruct?" for the very name the user asked for (or never typed). A near miss
    still gets its suggestion."""
    from minillama import hub
    from minillama.cli import main

    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_installed_gguf", lambda exact_version: None)
    for model in ([], [hub.DEFAULT_MODEL]):
        assert main(["generate", *model, "--offline", "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert "offline mode is on" in err and "did you mean" not in err, err
    assert main(["generate", "smollm2-135m-instuct", "--offline", "--prompt", "hi"]) == 2
    assert f"did you mean {hub.DEFAULT_MODEL}?" in capsys.readouterr().err


def test_max_new_tokens_past_the_context_is_capped_with_a_note(chat_model, tmp_path):
    """`-n 10000000` used to be an error naming max_new_tokens after the model had loaded; now the reply runs
    until the context is full, with one line saying so (as llama-cli and ollama do)."""
    small = tmp_path / "small"
    shutil.copytree(chat_model, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (small / "config.json").write_text(json.dumps(config))
    r = run_cli("generate", str(small), "--raw", "--prompt", "hello", "-n", "10000000", "--greedy")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    note, stats = [line for line in r.stderr.splitlines() if line.strip()]
    assert note.startswith("minillama: max-new-tokens 10000000 (from flags) is more than the") and "64-token" in note
    assert "context: 64/64" in stats and "stopped: context full" in stats
