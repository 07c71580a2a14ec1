"""The decode step compiled ahead of time (aot.py): the same greedy tokens as the eager engine, built once and
loaded from disk by a later engine or chat, built in the background while the first replies run eagerly."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

import pytest
import torch

import minillama
from minillama import aot, kernels
from minillama.aot import AotEngine
from minillama.chat import DEFAULT_CONTEXT
from minillama.generation import EagerEngine

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(
    not kernels.available(), reason=f"minillama's kernels do not build here: {kernels.describe()}")]


def greedy(model, ids: list[int], engine, n: int) -> list[int]:
    return list(minillama.generate(model, torch.tensor([ids]), max_new_tokens=n, eos_token_id=[], do_sample=False,
                                   engine=engine))


@pytest.fixture(scope="module")
def q4_step(smollm2_q4_dir, smollm2_cache):
    """The default model's Q4_1 weights and their step for a chat's context, built once into the session's cache
    (where a later `minillama chat` in this session finds it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILLAMA_CACHE", str(smollm2_cache))
        model = minillama.load_model(smollm2_q4_dir)
        assert aot.default_applies(model)  # what makes it the chat's default engine
        yield model, AotEngine(model, DEFAULT_CONTEXT, build="now")


def test_q4_compiled_step_gives_the_eager_engines_256_greedy_tokens(q4_step, smollm2_q4_dir):
    model, engine = q4_step
    tok = minillama.load_tokenizer(smollm2_q4_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
                                  add_generation_prompt=True, tokenize=True)
    assert engine.ready
    eager = greedy(model, ids, EagerEngine(model, model.new_cache(1, DEFAULT_CONTEXT)), 256)
    assert greedy(model, ids, engine, 256) == eager  # exactly: both run minillama's int8 kernels on T = 1 rows
    again = greedy(model, ids[:20], engine, 8)  # the same engine, a new prompt at slot 0: the cache is rewritten
    assert again == greedy(model, ids[:20], EagerEngine(model, model.new_cache(1, 64)), 8)


def test_a_second_engine_and_a_second_chat_load_the_step_from_disk(q4_step, smollm2_cache):
    model, engine = q4_step
    second = AotEngine(model, DEFAULT_CONTEXT, build="never")  # nothing is compiled: the package is there
    assert second.ready and second.path == engine.path
    env = {**os.environ, "MINILLAMA_CACHE": str(smollm2_cache), "OMP_NUM_THREADS": "1"}
    runs = {}
    for flags in ([], ["--engine", "eager"]):  # the default (compiled on these weights) and the eager engine
        r = subprocess.run([sys.executable, "-m", "minillama", "chat", "--greedy", "-n", "24", "--threads", "1",
                            *flags], input="What is the capital of France?\n", capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        runs[tuple(flags)] = r.stdout
        assert "compiling" not in r.stderr  # loaded from the cache, not built again (its time: benchmarks.md)
    assert runs[()] == runs[("--engine", "eager")]


def test_a_later_engine_takes_over_a_gone_ones_cache(q4_step):
    """A loaded package keeps its constants for the process's life (torch frees neither), so engines of the same
    model and context reuse one KV cache and graph once the previous engine is gone: memory stays flat."""
    model, engine = q4_step
    alive = AotEngine(model, DEFAULT_CONTEXT, build="never")
    assert alive.ready and alive.cache is not engine.cache  # both alive: each its own cache
    cache = alive.cache
    del alive
    gc.collect()
    after = AotEngine(model, DEFAULT_CONTEXT, build="never")
    assert after.ready and after.cache is cache
    ids = list(range(2000, 2030))
    assert greedy(model, ids, after, 8) == greedy(model, ids, EagerEngine(model, model.new_cache(1, 64)), 8)


def test_a_background_build_switches_from_eager_to_compiled(chat_model, tmp_path, monkeypatch):
    """A tiny int4 model: decode steps run eagerly while the child builds, the same tokens after the switch."""
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path))
    load_args = dict(path=str(chat_model), device="cpu", dtype=None, quantize="int4", group_size=32)
    model = minillama.load_model(**load_args)
    assert aot.default_applies(model)
    ids = list(range(1000, 1040))
    expected = greedy(model, ids, EagerEngine(model, model.new_cache(1, 128)), 24)
    engine = AotEngine(model, 256, build="background", load_args=load_args)
    assert not engine.ready and engine.builder is not None
    assert greedy(model, ids, engine, 24) == expected  # eager meanwhile
    deadline = time.monotonic() + 600
    while not engine.poll():
        assert engine.builder is not None, engine.build_error
        assert time.monotonic() < deadline, "the background build did not end in 600 s"
        time.sleep(0.5)
    assert engine.news().startswith("the compiled decode step is ready") and engine.news() is None
    assert greedy(model, ids, engine, 24) == expected  # the graph now, after a prompt picked the package up
    assert AotEngine(model, 256, build="never").ready  # kept for the next process


def test_a_child_that_loads_other_weights_fails_in_one_line(chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path))
    model = minillama.load_model(chat_model)  # float weights; the child is told to load int4 ones
    load_args = dict(path=str(chat_model), device="cpu", dtype=None, quantize="int4", group_size=32)
    engine = AotEngine(model, 128, build="background", load_args=load_args)
    engine.builder.wait(120)
    assert not engine.poll()
    note = engine.news()
    assert "could not be built" in note and "differs" in note and "\n" not in note
    eager = EagerEngine(model, model.new_cache(1, 16))
    assert greedy(model, [5, 6, 7], engine, 4) == greedy(model, [5, 6, 7], eager, 4)


def test_where_the_step_does_not_apply(chat_model):
    packed = minillama.load_model(chat_model, pack=True)
    assert "plain weights" in aot.applies(packed)
    with pytest.raises(minillama.MinillamaError, match="does not apply here"):
        AotEngine(packed, 64)
    assert not aot.default_applies(minillama.load_model(chat_model))  # float weights: the eager engine by default


def test_an_unreadable_package_is_dropped_not_fatal(chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path))
    model = minillama.load_model(chat_model)
    path = aot.package_path(aot.package_key(model, 64))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a package")  # a torch upgrade or a full disk left something unreadable
    engine = AotEngine(model, 64, build="never")
    assert not engine.ready and not path.exists()  # eager now; the next build writes it afresh
    eager = EagerEngine(model, model.new_cache(1, 16))
    assert greedy(model, [5, 6, 7], engine, 4) == greedy(model, [5, 6, 7], eager, 4)
