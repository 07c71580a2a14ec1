"""The engines and the one generation loop: the compiled decode step (minillama.fast), the static-shape
forward it compiles, packed weights, and the lagged token pipe, all against the plain eager forward."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import make_hf_checkpoint

from minillama.checkpoint import load_model
from minillama.errors import MinillamaError
from minillama.fast import CompiledEngine, compile_options, compiled_engine_for
from minillama.generation import EagerEngine, generate
from minillama.packing import FusedLinear, PackedLinear, is_packed, pack_linears, unpack_linears

N_TOKENS = 48


@pytest.fixture(scope="module")
def tiny_biased(tmp_path_factory):
    """GQA with biases on every projection: packed and compiled Linears must carry the bias."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("biased"), seed=2, attention_bias=True, mlp_bias=True)


def prompt_ids(n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def reference_tokens(model, prompt: torch.Tensor, n: int = N_TOKENS, **settings) -> list[int]:
    """The plain path: the eager engine, model.forward step by step."""
    return list(generate(model, prompt, max_new_tokens=n, eos_token_id=[], engine="eager", **settings))


# ---- The static-shape forward (what the compiled step runs), eagerly ------------------------------------

def test_tensor_position_step_equals_forward(tiny_llama32):
    """One token at a tensor position, attending over the whole (masked) cache, equals the plain forward."""
    model = load_model(tiny_llama32, device="cpu")
    ids = prompt_ids(10)[None]
    with torch.inference_mode():
        expected = model(ids)[:, -1]  # (1, V)
        cache = model.new_cache(1, 32)
        model(ids[:, :-1], cache=cache)
        got = model(ids[:, -1:], cache=cache, input_pos=torch.tensor([9]))[:, -1]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The same with the explicit (eager) attention: the mask hides the empty slots there too.
        model.set_attn_implementation("eager")
        got = model(ids[:, -1:], cache=cache, input_pos=torch.tensor([9]))[:, -1]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- Packed weights: a module swap -----------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_llama32", "tiny_biased"])
def test_packed_linears_keep_names_state_dict_and_logits(request, fixture):
    path = request.getfixturevalue(fixture)
    plain = load_model(path, device="cpu")
    packed = load_model(path, device="cpu", pack=True)
    attn, mlp = packed.model.layers[0].self_attn, packed.model.layers[0].mlp
    assert all(isinstance(m, FusedLinear) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj))
    assert isinstance(attn.o_proj, PackedLinear) and isinstance(mlp.down_proj, PackedLinear)
    assert isinstance(packed.lm_head, PackedLinear) and is_packed(packed) and not is_packed(plain)
    # Same module tree and state_dict keys; the weights come back in their usual layout, exactly.
    assert [n for n, _ in packed.named_modules()] == [n for n, _ in plain.named_modules()]
    state, reference = packed.state_dict(), plain.state_dict()
    assert list(state) == list(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert "PackedLinear(in_features=64, out_features=" in str(packed)
    ids = prompt_ids(12)[None]
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)  # oneDNN sums in its own order
    # One copy of each matrix: a packed Linear holds no plain weight besides the packed one, and q/k/v share one
    # stacked matrix, held by q_proj alone.
    has_bias = attn.o_proj.bias is not None
    assert [name for name, _ in attn.o_proj.named_parameters()] == ["weight"] + (["bias"] if has_bias else [])
    assert [name for name, _ in attn.q_proj.named_parameters()] == ["weight"] + (["bias"] if has_bias else [])
    assert not list(attn.k_proj.parameters()) and not list(attn.v_proj.parameters())
    qkv_rows = sum(m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.q_proj.weight.is_mkldnn and tuple(attn.q_proj.weight.shape) == (qkv_rows, attn.q_proj.in_features)
    # Undoing it gives the plain model back, tied head included.
    assert unpack_linears(packed) == pack_linears(load_model(path, device="cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids), plain(ids), rtol=0, atol=0)


def test_fused_members_answer_any_input_in_any_order(tiny_biased):
    """A FusedLinear shares one call among its siblings when they read the same tensor; called on other inputs,
    twice, or out of order, each still returns its own x W^T + b."""
    plain = load_model(tiny_biased, device="cpu").model.layers[0].self_attn
    attn = load_model(tiny_biased, device="cpu", pack=True).model.layers[0].self_attn
    x, other = torch.randn(1, 3, attn.q_proj.in_features), torch.randn(1, 2, attn.q_proj.in_features)
    with torch.inference_mode():
        for name, inp in [("v_proj", x), ("q_proj", x), ("q_proj", x), ("k_proj", other), ("k_proj", x),
                          ("v_proj", x), ("q_proj", other)]:
            torch.testing.assert_close(getattr(attn, name)(inp), getattr(plain, name)(inp), rtol=1e-5, atol=1e-5)
        assert attn.q_proj.stack.input is other  # held for k_proj and v_proj
        attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert attn.q_proj.stack.input is None and attn.q_proj.stack.outputs == ()  # once all took theirs: nothing held


@pytest.mark.parametrize("drop", [("k_proj",), ("q_proj", "k_proj", "v_proj")])
def test_packed_load_names_missing_group_members(tiny_llama32, tmp_path, drop):
    """Stacked while loading, a group with a member missing (or all of them) is still a missing tensor."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "m"
    out.mkdir()
    for f in tiny_llama32.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    state = load_file(str(out / "model.safetensors"))
    for name in drop:
        del state[f"model.layers.1.self_attn.{name}.weight"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MinillamaError, match=f"missing tensor model.layers.1.self_attn.{drop[0]}.weight"):
        load_model(out, device="cpu", pack=True)


@pytest.mark.slow
def test_packed_load_holds_one_copy_at_its_peak(smollm2_dir):
    """load_model(pack=True) reads, packs and stacks tensor by tensor: its peak memory is the plain (memory-mapped)
    load's plus the one matrix it must hold twice (the tied head's packed copy), not a second model."""
    from bounded import run

    code = "import sys, minillama; minillama.load_model(sys.argv[1], 'cpu', pack=sys.argv[2] == 'packed')"
    plain, packed = (run("-c", code, str(smollm2_dir), kind, timeout=120) for kind in ("plain", "packed"))
    assert plain.returncode == packed.returncode == 0, packed.stderr
    head_mb = 49152 * 576 * 4 / 2**20  # 108 MB
    assert packed.peak_mb <= plain.peak_mb + head_mb + 40, (plain.peak_mb, packed.peak_mb)


def test_load_state_dict_into_a_packed_model(tiny_llama2):
    plain = load_model(tiny_llama2, device="cpu")
    packed = load_model(tiny_llama2, device="cpu", pack=True)
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(0.5)
    packed.load_state_dict(plain.state_dict())
    ids = prompt_ids(9)[None]
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)


# ---- The token pipe (the GPU reads tokens `lag` steps behind) ----------------------------------------------

@pytest.mark.parametrize("lag", [1, 3])
def test_lagged_pipe_gives_the_same_tokens_and_stops_on_eos(tiny_llama32, lag):
    model = load_model(tiny_llama32, device="cpu")
    prompt = prompt_ids()
    tokens = reference_tokens(model, prompt)
    engine = EagerEngine(model, model.new_cache(1, 64))
    engine.lag = lag
    assert list(generate(model, prompt, max_new_tokens=N_TOKENS, eos_token_id=[], engine=engine)) == tokens
    eos = tokens[5]
    stop = tokens.index(eos)  # its first occurrence
    generation = generate(model, prompt, max_new_tokens=N_TOKENS, eos_token_id=[eos, 10_000], engine=engine)
    assert list(generation) == tokens[: stop + 1] and generation.stop_reason == "eos"
    # The position counter counts what was handed over, not the steps run ahead of it.
    assert generation.input_pos == len(prompt) + stop


@pytest.mark.parametrize("lag", [0, 3])
def test_non_finite_logits_raise_when_read(tiny_llama32, lag):
    """Overflowing activations give inf logits: the device-side flag stops generation with a message."""
    model = load_model(tiny_llama32, device="cpu")
    with torch.no_grad():
        model.model.norm.weight[0] = 3e38  # finite, but x * 3e38 overflows float32
    engine = EagerEngine(model, model.new_cache(1, 64))
    engine.lag = lag
    with pytest.raises(MinillamaError, match="NaN or infinite logits"):
        list(generate(model, prompt_ids(), max_new_tokens=10, engine=engine))


def test_context_full_is_a_stop_reason(tiny_llama32):
    model = load_model(tiny_llama32, device="cpu")
    engine = EagerEngine(model, model.new_cache(1, 20))
    generation = generate(model, prompt_ids(), max_new_tokens=50, eos_token_id=[], engine=engine,
                          stop_at_context=True)
    assert len(list(generation)) == 20 - 7 and generation.stop_reason == "context"
    with pytest.raises(MinillamaError, match="context of 20"):
        generate(model, prompt_ids(), max_new_tokens=50, engine=engine)


# ---- The compiled engine (Inductor's C++ backend on this CPU) --------------------------------------------

@pytest.mark.parametrize("fixture, attention", [("tiny_llama32", "sdpa"), ("tiny_biased", "eager")])
def test_compiled_engine_gives_the_same_tokens(request, fixture, attention):
    pytest.importorskip("torch._inductor")
    model = load_model(request.getfixturevalue(fixture), device="cpu")
    model.set_attn_implementation(attention)
    prompt = prompt_ids()
    expected = reference_tokens(model, prompt)
    engine = CompiledEngine(model, max_seq_len=64)
    assert engine.max_seq_len == 64 and engine.lag == 0
    assert list(generate(model, prompt, max_new_tokens=N_TOKENS, eos_token_id=[], engine=engine)) == expected
    # Sampling with a seed draws what the eager engine draws.
    settings = {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "min_p": 0.01,
                "repetition_penalty": 1.3}
    want = reference_tokens(model, prompt, generator=torch.Generator().manual_seed(7), **settings)
    got = list(generate(model, prompt, max_new_tokens=N_TOKENS, eos_token_id=[], engine=engine,
                        generator=torch.Generator().manual_seed(7), **settings))
    assert got == want and len(set(got)) > 5
    # A conversation goes on from what the engine's cache holds.
    first = generate(model, prompt_ids(6, seed=3), max_new_tokens=8, eos_token_id=[], engine=engine)
    reply = list(first)
    second = prompt_ids(5, seed=4)
    got = list(generate(model, torch.cat([torch.tensor(reply[-1:]), second]), max_new_tokens=10,
                        eos_token_id=[], engine=engine, input_pos=first.input_pos))
    assert got == reference_tokens(model, torch.cat([prompt_ids(6, seed=3), torch.tensor(reply), second]), 10)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_engine_runs_quantized_weights(tiny_llama32, mode):
    """Inductor compiles the step around torch's int8/int4 kernels (on SmolLM2's Q4_1 weights it decoded 77 tok/s
    against 56 eager, docs/quantization.md): the same greedy tokens as the eager engine on the same weights."""
    pytest.importorskip("torch._inductor")
    model = load_model(tiny_llama32, device="cpu", quantize=mode)
    prompt = prompt_ids()
    expected = reference_tokens(model, prompt, n=24)
    engine = CompiledEngine(model, max_seq_len=48)
    assert list(generate(model, prompt, max_new_tokens=24, eos_token_id=[], engine=engine)) == expected


def test_compiled_engine_refuses_what_it_cannot_run(tiny_llama32, tmp_path):
    packed = load_model(tiny_llama32, device="cpu", pack=True)
    with pytest.raises(MinillamaError, match="plain weights"):
        CompiledEngine(packed, max_seq_len=32)
    model = load_model(tiny_llama32, device="cpu")
    with pytest.raises(MinillamaError, match="needs a CUDA device"):
        CompiledEngine(model, max_seq_len=32, pdl=True)
    with pytest.raises(MinillamaError, match="batches"):
        generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=4, engine="compiled")
    with pytest.raises(MinillamaError, match="'eager' or 'compiled'"):
        generate(model, [1, 2, 3], max_new_tokens=4, engine="fast")
    dynamic = make_hf_checkpoint(tmp_path / "dynamic", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(MinillamaError, match="dynamic RoPE"):
        CompiledEngine(load_model(dynamic, device="cpu"), max_seq_len=32)


def test_compiled_engine_for_reuses_one_engine(tiny_llama32):
    model = load_model(tiny_llama32, device="cpu")
    first = compiled_engine_for(model, 40)
    assert compiled_engine_for(model, 100) is first and first.max_seq_len == 256  # the context
    assert compiled_engine_for(model, 10, lag=2) is not first
    assert "_minillama_compiled_engine" not in dict(model.named_modules())
    with pytest.raises(MinillamaError, match="context"):
        compiled_engine_for(model, 10_000)


@pytest.mark.slow
def test_compiled_greedy_equals_plain_forward_on_smollm2(smollm2_dir):
    """The real model, 256 greedy tokens: the compiled step against one plain forward over everything."""
    from minillama.tokenizer import load_tokenizer

    model = load_model(smollm2_dir, device="cpu", dtype="float32")
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
    prompt = torch.tensor(load_tokenizer(smollm2_dir).apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=True))
    engine = CompiledEngine(model, max_seq_len=len(prompt) + 256)  # every step attends over all its slots
    tokens = list(generate(model, prompt, max_new_tokens=256, eos_token_id=[], engine=engine))
    with torch.inference_mode():
        logits = model(torch.cat([prompt, torch.tensor(tokens[:-1])])[None], logits_to_keep=256)[0]  # (256, V)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_compile_options_per_device():
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention, pdl", [("sdpa", False), ("eager", False), ("eager", True)])
def test_cuda_graph_step_matches_eager_engine(tiny_llama32, attention, pdl):
    """On a GPU: compiled with CUDA graphs and read `lag` tokens behind, the tokens are the eager engine's."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs a Hopper GPU or newer")
    if pdl and not hasattr(importlib.import_module("torch._inductor.config").triton, "enable_pdl"):
        pytest.skip("Inductor's programmatic dependent launch needs torch >= 2.10")
    from minillama.fast import cuda_graphs_recorded

    model = load_model(tiny_llama32, device="cuda", dtype="float32")
    model.set_attn_implementation(attention)
    prompt = prompt_ids()
    engine = CompiledEngine(model, max_seq_len=64, pdl=pdl)
    assert engine.lag > 0
    engine.warmup()
    assert engine.cudagraph_skips == 0  # the step was captured as a CUDA graph
    assert cuda_graphs_recorded(model.device) != 0  # and Inductor's graph trees hold it (-1: cannot tell)
    run = dict(max_new_tokens=N_TOKENS, eos_token_id=[])
    assert list(generate(model, prompt, engine=engine, **run)) == reference_tokens(model, prompt)
    settings = {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    expected = reference_tokens(model, prompt, generator=torch.Generator("cuda").manual_seed(7), **settings)
    got = list(generate(model, prompt, engine=engine, generator=torch.Generator("cuda").manual_seed(7),
                        **run, **settings))
    assert got == expected
    tokens = reference_tokens(model, prompt)
    generation = generate(model, prompt, engine=engine, max_new_tokens=N_TOKENS, eos_token_id=[tokens[5]])
    assert list(generation)[-1] == tokens[5] and generation.stop_reason == "eos"
