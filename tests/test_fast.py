"""The fast decode path (minillama.fast) against the regular generate(): same tokens, same names, same logits."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import make_hf_checkpoint

from minillama.checkpoint import load_model
from minillama.errors import MinillamaError
from minillama.fast import FastDecoder, fuse_projections
from minillama.generation import generate
from minillama.sampling import SamplingSettings

N_TOKENS = 48


@pytest.fixture(scope="module")
def tiny_biased(tmp_path_factory):
    """MHA-free GQA with biases on every projection: the fused bias must be split like the weight."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("biased"), seed=2, attention_bias=True, mlp_bias=True)


def prompt_ids(n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def reference_tokens(model, prompt: torch.Tensor, n: int = N_TOKENS, **settings) -> list[int]:
    """The regular path: generation.generate over model.forward and its KV cache."""
    return list(generate(model, prompt, max_new_tokens=n, eos_token_id=[], fast=False, **settings))


@pytest.mark.parametrize("fixture", ["tiny_llama32", "tiny_llama2", "tiny_biased"])
@pytest.mark.parametrize("fuse, pack", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("lag", [0, 3])
def test_greedy_tokens_equal_regular_path(request, fixture, fuse, pack, lag):
    model = load_model(request.getfixturevalue(fixture), device="cpu")
    prompt = prompt_ids()
    expected = reference_tokens(model, prompt)
    fast = FastDecoder(model, max_seq_len=64, compile=False, fuse=fuse, lag=lag, pack=pack)
    assert (fast.packed is not None) == pack
    assert list(fast.generate(prompt, N_TOKENS)) == expected
    assert fast.stop_reason == "length"
    # The model itself is unchanged by the fusion: the regular path still gives the same tokens.
    assert reference_tokens(model, prompt) == expected


def test_sampling_with_a_seed_equals_regular_path(tiny_llama32):
    model = load_model(tiny_llama32, device="cpu")
    prompt = prompt_ids(seed=1)
    settings = {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "min_p": 0.01, "repetition_penalty": 1.3}
    expected = reference_tokens(model, prompt, generator=torch.Generator().manual_seed(7), **settings)
    fast = FastDecoder(model, max_seq_len=64, compile=False)
    got = list(fast.generate(prompt, N_TOKENS, SamplingSettings(**settings),
                             generator=torch.Generator().manual_seed(7)))
    assert got == expected
    assert len(set(got)) > 5  # really sampled, not stuck on one token


def test_greedy_with_repetition_penalty(tiny_llama2):
    model = load_model(tiny_llama2, device="cpu")
    prompt = prompt_ids(seed=2)
    expected = reference_tokens(model, prompt, repetition_penalty=1.5)
    fast = FastDecoder(model, max_seq_len=64, compile=False)
    assert list(fast.generate(prompt, N_TOKENS, SamplingSettings(repetition_penalty=1.5))) == expected


@pytest.mark.parametrize("lag", [0, 3])
def test_eos_stops_after_yielding_it(tiny_llama32, lag):
    model = load_model(tiny_llama32, device="cpu")
    prompt = prompt_ids()
    tokens = reference_tokens(model, prompt)
    eos = tokens[5]
    stop = tokens.index(eos)  # its first occurrence
    fast = FastDecoder(model, max_seq_len=64, compile=False, lag=lag)
    assert list(fast.generate(prompt, N_TOKENS, eos_token_ids=[eos, 10_000])) == tokens[: stop + 1]
    assert fast.stop_reason == "eos"


def test_fused_projections_keep_names_and_logits(tiny_biased):
    model = load_model(tiny_biased, device="cpu")
    names = list(model.state_dict())
    ids = prompt_ids(12)[None]
    with torch.no_grad():
        before = model(ids)
        fused = fuse_projections(model)
        after = model(ids)
    assert list(model.state_dict()) == names
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # The Linear weights are views into the fused tensors: no second copy of the weights.
    assert attn.q_proj.weight.data_ptr() == fused[0].qkv_weight.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == fused[0].qkv_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.bias.untyped_storage().data_ptr() == fused[0].gate_up_bias.untyped_storage().data_ptr()
    assert fuse_projections(model) is fused  # idempotent


def test_static_step_logits_equal_forward(tiny_llama32):
    """One decode step over the whole (masked) cache buffer equals model.forward over the cached slice."""
    model = load_model(tiny_llama32, device="cpu")
    ids = prompt_ids(10)[None]
    with torch.inference_mode():
        expected = model(ids)[:, -1]  # (1, V)
        fast = FastDecoder(model, max_seq_len=32, compile=False)
        fast.prefill(ids[:, :-1])
        fast.token.copy_(ids[:, -1:])
        got = fast._decode_logits()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert int(fast.pos) == 10


def test_math_attention_equals_sdpa(tiny_llama32):
    """attention="math" (matmuls and an fp32 softmax) is the same step as SDPA: logits and greedy tokens."""
    model = load_model(tiny_llama32, device="cpu")
    ids = prompt_ids(10)[None]
    logits = {}
    for attention in ("sdpa", "math"):
        fast = FastDecoder(model, max_seq_len=32, compile=False, attention=attention)
        assert fast.attention == attention
        with torch.inference_mode():
            fast.prefill(ids[:, :-1])
            fast.token.copy_(ids[:, -1:])
            logits[attention] = fast._decode_logits()
    torch.testing.assert_close(logits["math"], logits["sdpa"], rtol=1e-5, atol=1e-5)
    fast = FastDecoder(model, max_seq_len=64, compile=False, attention="math")
    assert list(fast.generate(prompt_ids(), N_TOKENS)) == reference_tokens(model, prompt_ids())
    with pytest.raises(MinillamaError, match="'sdpa' or 'math'"):
        FastDecoder(model, max_seq_len=32, attention="flash")
    with pytest.raises(MinillamaError, match="pdl=True needs the compiled step on a CUDA device"):
        FastDecoder(model, max_seq_len=32, pdl=True)


def test_compile_options_per_device():
    from minillama.fast import compile_options

    assert compile_options(torch.device("cpu")) is None  # Inductor's defaults (C++ kernels, no graphs)
    cuda = torch.device("cuda")
    assert compile_options(cuda) == {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    assert compile_options(cuda, tuning=False)["coordinate_descent_tuning"] is False
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "enable_pdl"):
        assert compile_options(cuda, pdl=True)["triton.enable_pdl"] is True
        # Every key is one torch.compile accepts (it rejects unknown options).
        for key in compile_options(cuda, pdl=True):
            section, _, name = key.rpartition(".")
            assert hasattr(getattr(inductor_config, section) if section else inductor_config, name), key


def test_continue_a_conversation_from_the_cache(tiny_llama32):
    model = load_model(tiny_llama32, device="cpu")
    first, second = prompt_ids(6, seed=3), prompt_ids(5, seed=4)
    fast = FastDecoder(model, max_seq_len=64, compile=False)
    reply = list(fast.generate(first, 8))
    cached = fast.cached_tokens
    assert cached == len(first) + len(reply) - 1  # the last reply token was never fed back
    # Next turn: the last reply token and the new prompt go in together, after what the cache holds.
    new = torch.cat([torch.tensor(reply[-1:]), second])
    got = list(fast.generate(new, 10, input_pos=cached))
    expected = reference_tokens(model, torch.cat([first, torch.tensor(reply), second]), n=10)
    assert got == expected


def test_too_long_prompt_is_a_clear_error(tiny_llama32):
    model = load_model(tiny_llama32, device="cpu")
    fast = FastDecoder(model, max_seq_len=16, compile=False)
    with pytest.raises(MinillamaError, match="fast=False"):
        list(fast.generate(prompt_ids(10), 10))
    with pytest.raises(MinillamaError, match="empty"):
        list(fast.generate(torch.tensor([], dtype=torch.long), 4))


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_compiled_step_gives_the_same_tokens(tiny_llama32, attention):
    """torch.compile on CPU (Inductor's C++ backend): the graph replays the same greedy tokens."""
    pytest.importorskip("torch._inductor")
    model = load_model(tiny_llama32, device="cpu")
    prompt = prompt_ids()
    expected = reference_tokens(model, prompt)
    fast = FastDecoder(model, max_seq_len=64, compile=True, attention=attention)
    assert list(fast.generate(prompt, N_TOKENS)) == expected
    assert list(fast.generate(prompt_ids(9, seed=5), 20)) == reference_tokens(model, prompt_ids(9, seed=5), 20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention, pdl", [("sdpa", False), ("math", False), ("math", True)])
def test_cuda_graph_step_matches_regular_path(tiny_llama32, attention, pdl):
    """On a GPU: compiled with CUDA graphs and read `lag` tokens behind, the tokens are the regular path's."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs a Hopper GPU or newer")
    if pdl and not hasattr(importlib.import_module("torch._inductor.config").triton, "enable_pdl"):
        pytest.skip("Inductor's programmatic dependent launch needs torch >= 2.10")
    model = load_model(tiny_llama32, device="cuda", dtype="float32")
    prompt = prompt_ids()
    fast = FastDecoder(model, max_seq_len=64, attention=attention, pdl=pdl)
    assert fast.compiled and fast.lag > 0
    from torch._dynamo.utils import counters

    fused_before = counters["inductor"]["fuse_attention"]
    fast.warmup()
    assert fast.cudagraph_skips == 0  # both steps were captured as CUDA graphs
    from minillama.fast import cuda_graphs_recorded

    assert cuda_graphs_recorded(model.device) != 0  # and Inductor's graph trees hold them (-1: cannot tell)
    # "math" stays math: Inductor's pattern matcher did not turn it back into an SDPA call.
    assert counters["inductor"]["fuse_attention"] == fused_before
    assert list(fast.generate(prompt, N_TOKENS)) == reference_tokens(model, prompt)
    settings = {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    expected = reference_tokens(model, prompt, generator=torch.Generator("cuda").manual_seed(7), **settings)
    got = list(fast.generate(prompt, N_TOKENS, SamplingSettings(**settings),
                             generator=torch.Generator("cuda").manual_seed(7)))
    assert got == expected
    tokens = reference_tokens(model, prompt)
    assert list(fast.generate(prompt, N_TOKENS, eos_token_ids=[tokens[5]]))[-1] == tokens[5]
    assert fast.stop_reason == "eos"


def test_decoder_for_reuses_one_decoder(tiny_llama32):
    from minillama.fast import decoder_for

    model = load_model(tiny_llama32, device="cpu")
    first = decoder_for(model, 40, compile=False)
    assert decoder_for(model, 100, compile=False) is first and first.max_seq_len == 256  # the context
    assert decoder_for(model, 10, compile=False, lag=2) is not first
    assert "_minillama_fast_decoder" not in dict(model.named_modules())
    with pytest.raises(MinillamaError, match="context"):
        decoder_for(model, 10_000)


@pytest.mark.parametrize("lag", [0, 3])
def test_non_finite_logits_raise_when_read(tiny_llama32, lag, tmp_path):
    """Overflowing activations give inf logits: the device-side flag stops generation with a message."""
    model = load_model(tiny_llama32, device="cpu")
    with torch.no_grad():
        model.model.norm.weight[0] = 3e38  # finite, but x * 3e38 overflows float32
    fast = FastDecoder(model, max_seq_len=64, compile=False, lag=lag)
    with pytest.raises(MinillamaError, match="NaN or infinite logits"):
        list(fast.generate(prompt_ids(), 10))
