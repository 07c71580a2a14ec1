"""scripts/chat.py, the chat loop written by hand, must produce exactly what `minillama.generate` produces.

Run as a learner runs it (a subprocess) on the tiny random model with the real Llama 3.2 tokenizer.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

import minillama
from minillama.chat import ChatSession, chat_generation_config
from minillama.generation import GenerationConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "chat.py"


def run_script(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_greedy_reply_is_generate_and_verbose_shows_each_stage(chat_model):
    r = run_script(str(chat_model), "--prompt", "Name a color", "--temperature", "0", "-n", "8", "--verbose",
                   "--device", "cpu", "--repeat-penalty", "1")
    assert r.returncode == 0, r.stderr
    model, tok = minillama.load_model(chat_model, device="cpu"), minillama.load_tokenizer(chat_model)
    messages = [{"role": "user", "content": "Name a color"}]
    ids = tok.apply_chat_template(messages, tokenize=True)
    config = GenerationConfig.from_model_dir(chat_model).updated(do_sample=False, max_new_tokens=8)
    generated = list(minillama.generate(model, ids, config.ending_turns(tok)))
    assert r.stdout == tok.decode(generated, skip_special_tokens=True) + "\n"  # --verbose leaves stdout alone

    # the stages on stderr, each under the number the help gives it, in order
    labels = re.findall(r"^\[(\d) (\w+)\]", r.stderr, re.M)
    assert [label for label, _ in dict.fromkeys(labels)] == ["1", "2", "3", "4", "5", "6", "7", "8"]
    assert all(f"  {n}. {name}" in SCRIPT.read_text() for n, name in set(labels))  # as the help numbers them
    assert "[1 messages] 1 message: user 'Name a color'" in r.stderr
    assert tok.apply_chat_template(messages) in r.stderr  # 2. the rendered prompt
    table = r.stderr.split("index      id  piece\n", 1)[1].split("[4 prefill]", 1)[0]  # 3. the tokens
    rows = [re.match(r"\s*(\d+)\s+(\d+)  (.*)$", line).groups() for line in table.splitlines()]
    assert [int(i) for i, _, _ in rows] == list(range(len(ids)))
    assert [int(id_) for _, id_, _ in rows] == ids
    assert rows[0][2] == "<|begin_of_text|>" and "↵↵" in rows[4][2]  # pieces with visible whitespace
    assert re.search(rf"^\[4 prefill\] {len(ids)} tokens in [\d.]+ s", r.stderr, re.M)
    # 5. the settings with their sources, then each step's top candidates (probabilities summing to <= 1)
    assert "[5 sample] greedy, repeat-penalty 1, max-new-tokens 8 (from flags)" in r.stderr
    steps = re.findall(r"^\[5 sample\] step (\d+): (.*)  -> (\d+) ", r.stderr, re.M)
    assert [int(t) for _, _, t in steps] == generated and [int(s) for s, _, _ in steps] == list(range(8))
    for _, candidates, token in steps:
        percents = [float(p) for p in re.findall(r" ([\d.]+)%", candidates)]
        assert len(percents) == 3 and percents == sorted(percents, reverse=True) and sum(percents) <= 100.1
    assert "[6 stop] length limit (8 tokens; raise it with --max-new-tokens)" in r.stderr


def test_piped_conversation_with_seeded_sampling_is_generate(chat_model):
    """Each stdin line is a turn; the reply to the second sees the first; sampling matches generate's."""
    r = run_script(str(chat_model), "--system", "Be brief.", "--seed", "5", "--temperature", "0.8", "--top-p", "0.9",
                   "-n", "6", "--device", "cpu", "--repeat-penalty", "1", stdin="Hello\n\nTell me more\n")
    assert r.returncode == 0, r.stderr
    model, tok = minillama.load_model(chat_model, device="cpu"), minillama.load_tokenizer(chat_model)
    # the script samples as `minillama chat` does: the model file, llama.cpp's defaults for what it leaves out
    config, _ = chat_generation_config(chat_model, dict(do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=6,
                                                        repetition_penalty=1.0))
    config = config.ending_turns(tok)
    generator = torch.Generator().manual_seed(5)  # one generator for the whole conversation, as in the script
    messages, expected = [{"role": "system", "content": "Be brief."}], ""
    for question in ("Hello", "Tell me more"):
        messages.append({"role": "user", "content": question})
        ids = tok.apply_chat_template(messages, tokenize=True)
        answer = tok.decode(list(minillama.generate(model, ids, config, generator=generator)), skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        expected += answer + "\n"
    assert r.stdout == expected


def test_bad_model_path_exits_2_with_one_line(tmp_path):
    r = run_script(str(tmp_path / "nowhere"), "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("chat.py: error: ")


def test_default_penalty_spares_the_end_of_turn_as_the_chat_does(chat_model):
    """With the chat's default repeat penalty the script's greedy reply is the chat's (whose penalty does not count
    the end-of-turn tokens); the top candidates shown are only those the filters kept."""
    r = run_script(str(chat_model), "--prompt", "Name a color", "--temperature", "0", "-n", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    model, tok = minillama.load_model(chat_model, device="cpu"), minillama.load_tokenizer(chat_model)
    config, _ = chat_generation_config(chat_model, dict(do_sample=False, max_new_tokens=8))
    assert config.repetition_penalty == 1.15
    assert r.stdout == "".join(ChatSession(model, tok, config).send("Name a color")) + "\n"
    r = run_script(str(chat_model), "--prompt", "Name a color", "--top-k", "2", "--seed", "1", "-n", "4",
                   "--device", "cpu", "--verbose")
    steps = re.findall(r"^\[5 sample\] step \d+: (.*)  -> ", r.stderr, re.M)
    assert steps and all(len(re.findall(r" [\d.]+%", s)) <= 2 and " 0.0%" not in s for s in steps), r.stderr
