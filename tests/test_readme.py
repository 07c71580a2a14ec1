"""The README's Python example, run as a reader runs it: on the default model, in a fresh process.

The ```python block is taken from README.md as it stands and run unchanged; a small driver around it only
watches the `Generation` objects it makes, so the test can say why each reply ended.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# Runs the block, then reports each reply's stop reason and token count on stderr (stdout is the block's own).
DRIVER = r'''
import json, sys
import torch
import minillama

torch.set_num_threads(1)  # small ops on a shared 2-core machine: OpenMP barriers cost more than they give

made = []
real_generate = minillama.generate
def watched_generate(*args, **kwargs):
    generation = real_generate(*args, **kwargs)
    made.append(generation)
    return generation
minillama.generate = watched_generate

namespace = {}
exec(compile(sys.argv[1], "README.md", "exec"), namespace)
made.append(namespace["chat"].last_generation)  # the pipeline's reply
print(json.dumps([[g.stop_reason, len(g.tokens[0])] for g in made]), file=sys.stderr)
'''


def readme_block(lang: str, needle: str) -> str:
    """The README's one ```lang block that contains `needle`."""
    blocks = [b for b in re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.M | re.S) if needle in b]
    assert len(blocks) == 1, f"the README should hold one {lang} block with {needle!r}"
    return blocks[0]


def readme_python_block() -> str:
    return readme_block("python", "import minillama")


def test_readme_python_example_stops_at_the_end_of_the_turn(smollm2_dir, tmp_path):
    (tmp_path / "smollm2-135m-instruct").symlink_to(smollm2_dir)  # what resolve_model finds first
    r = subprocess.run([sys.executable, "-c", DRIVER, readme_python_block()], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={**os.environ, "MINILLAMA_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    (first_reason, first_tokens), (_, second_tokens) = json.loads(r.stderr.strip().splitlines()[-1])
    # The streamed reply ends at the model's own end of turn, well before its 40-token limit.
    assert first_reason == "eos" and first_tokens < 40
    lines = r.stdout.splitlines()
    assert "Paris" in lines[0] and "user" not in r.stdout.lower().split("paris")[1][:40]
    # Each output on its own line: the streamed reply, the pipeline's reply, the captured shape.
    assert re.fullmatch(r"torch\.Size\(\[1, \d+, 576\]\)", lines[-1])
    pipeline_reply = "\n".join(lines[1:-1])
    assert pipeline_reply.strip() and second_tokens > 0


@pytest.mark.slow
def test_readme_serving_examples(smollm2_cache, smollm2_q4_dir, tmp_path):
    """`minillama serve` with no MODEL (the default model on its Q4_1 weights, on the CPU), then the README's
    curl and openai examples unchanged but for the port."""
    from serving import start_server

    env = {"MINILLAMA_CACHE": str(smollm2_cache), "HF_HUB_OFFLINE": "1"}
    with start_server("smollm2-135m-instruct", tmp_path=tmp_path, env=env) as server:
        port = server.url.rsplit(":", 1)[1]
        curl = readme_block("bash", "curl").replace("8000", port)
        out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
        reply = json.loads(out.stdout)
        assert reply["choices"][0]["message"]["content"].strip() and reply["usage"]["completion_tokens"] > 0
        python = readme_block("python", "from openai").replace("8000", port)
        out = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.split()) > 5
        assert "Q4_1" in server.log() or "int4" in server.log()  # the default weights: the file's own 4-bit blocks
