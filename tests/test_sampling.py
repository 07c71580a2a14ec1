"""Sampling functions: each step equals transformers' processor/warper; properties hold for any input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minillama.errors import MinillamaError
from minillama.sampling import (
    SamplingSettings,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    check_sampling_args,
    greedy,
    next_token,
    process_logits,
    sample,
    sampling_noise,
    seen_tokens,
)

B, V = 4, 300


def random_logits(seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def random_ids(seed: int = 0, S: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, V, (B, S), generator=g)


def assert_same_scores(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same tokens kept (finite) and the same values on them."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# ---- Each step equals transformers ----------------------------------------------------------------

@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
@pytest.mark.parametrize("seed", range(3))
def test_repetition_penalty_matches_transformers(penalty, seed):
    logits, ids = random_logits(seed), random_ids(seed)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert_same_scores(apply_repetition_penalty(logits, ids, penalty), theirs)
    # The mask form used by generate gives the same result.
    assert_same_scores(apply_repetition_penalty(logits, seen_tokens(ids, V), penalty), theirs)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_transformers(temperature):
    logits = random_logits(1)
    assert_same_scores(apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(None, logits))


@pytest.mark.parametrize("k", [1, 5, 50, V, V + 10])
@pytest.mark.parametrize("seed", range(3))
def test_top_k_matches_transformers(k, seed):
    logits = random_logits(seed)
    assert_same_scores(apply_top_k(logits, k), TopKLogitsWarper(k)(None, logits))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("seed", range(3))
def test_top_p_matches_transformers(p, seed):
    logits = random_logits(seed)
    assert_same_scores(apply_top_p(logits, p), TopPLogitsWarper(p)(None, logits))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_min_p_matches_transformers(min_p, seed):
    logits = random_logits(seed)
    assert_same_scores(apply_min_p(logits, min_p), MinPLogitsWarper(min_p)(None, logits))


def test_steps_do_not_modify_their_input():
    logits, ids = random_logits(3), random_ids(3)
    before = logits.clone()
    for out in (apply_repetition_penalty(logits, ids, 1.5), apply_temperature(logits, 0.5), apply_top_k(logits, 3),
                apply_top_p(logits, 0.5), apply_min_p(logits, 0.2)):
        assert out is not logits or torch.equal(out, before)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("cfg", [
    dict(temperature=0.6, top_k=50, top_p=0.9, repetition_penalty=1.2),
    dict(temperature=1.3, top_k=10, top_p=0.5, min_p=0.1, repetition_penalty=0.8),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05),
])
def test_full_chain_matches_transformers(cfg):
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=1, num_key_value_heads=1))
    hf_cfg = HFGenerationConfig(do_sample=True, **cfg)
    processors: LogitsProcessorList = hf_model._get_logits_processor(hf_cfg, input_ids_seq_length=20, device="cpu")
    logits, ids = random_logits(7), random_ids(7)
    theirs = processors(ids, logits.clone())
    ours = process_logits(logits, ids, SamplingSettings(do_sample=True, **cfg))
    assert_same_scores(ours, theirs)
    # Greedy applies only the penalty.
    hf_greedy = hf_model._get_logits_processor(HFGenerationConfig(do_sample=False, **cfg), input_ids_seq_length=20,
                                               device="cpu")
    assert_same_scores(process_logits(logits, ids, SamplingSettings(do_sample=False, **cfg)),
                       hf_greedy(ids, logits.clone()))


# ---- Picking ----------------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible():
    logits = random_logits(2, scale=1.0)

    def draws(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample(logits, g) for _ in range(20)])  # (20, B)

    assert torch.equal(draws(1), draws(1))
    assert not torch.equal(draws(1), draws(2))


def test_sample_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), float("-inf"), math.log(6.0)]]).expand(20000, 4)
    ids = sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.3, 0.0, 0.6]), atol=0.015, rtol=0)


def test_greedy_and_next_token():
    logits, ids = random_logits(4), random_ids(4)
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert torch.equal(next_token(logits, ids, SamplingSettings()), logits.argmax(-1))
    # temperature 0 means greedy even with do_sample
    assert torch.equal(next_token(logits, ids, SamplingSettings(do_sample=True, temperature=0.0)), logits.argmax(-1))
    # top_k=1 sampling is greedy too
    g = torch.Generator().manual_seed(0)
    assert torch.equal(next_token(logits, ids, SamplingSettings(do_sample=True, top_k=1), g), logits.argmax(-1))


# ---- Properties -------------------------------------------------------------------------------------

finite_rows = st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=1, max_size=40)


def row(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


@settings(max_examples=60, deadline=None)
@given(finite_rows, st.integers(0, 50))
def test_top_k_keeps_k_unless_ties(values, k):
    out = apply_top_k(row(values), k)
    kept = int(torch.isfinite(out).sum())
    if k == 0 or k >= len(values):
        assert kept == len(values)
    elif len(set(values)) == len(values):
        assert kept == k
    else:
        assert kept >= k
    assert not out.isnan().any()


@settings(max_examples=60, deadline=None)
@given(finite_rows, st.floats(1e-6, 1.0), st.floats(0.0, 1.0), st.floats(0.05, 5.0), st.floats(0.1, 3.0))
def test_filters_keep_the_top_token_and_never_make_nan(values, p, min_p, temperature, penalty):
    logits = row(values)
    is_top = logits[0] == logits.max()  # several tokens may tie for the top
    for out in (apply_top_p(logits, p), apply_min_p(logits, min_p), apply_top_k(logits, 1)):
        assert not out.isnan().any()
        assert torch.isfinite(out[0, is_top]).any()
    s = SamplingSettings(do_sample=True, temperature=temperature, top_k=5, top_p=p, min_p=min_p,
                         repetition_penalty=penalty)
    out = process_logits(logits, torch.tensor([[0]]), s)
    assert not out.isnan().any() and torch.isfinite(out).any()
    token = sample(out, torch.Generator().manual_seed(0))
    assert torch.isfinite(out[0, token]).all()


@settings(max_examples=40, deadline=None)
@given(finite_rows, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(values, p):
    logits = row(values)
    kept = torch.isfinite(apply_top_p(logits, p))
    probs = logits.softmax(-1)
    # Everything kept is at least as likely as everything dropped.
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()


bad_values = [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature="hot"), dict(top_p=0.0),
    dict(top_p=1.5), dict(top_p=-1), dict(top_k=-1), dict(top_k=2.5), dict(min_p=-0.01), dict(min_p=1.01),
    dict(repetition_penalty=0.0), dict(repetition_penalty=-1), dict(max_new_tokens=0), dict(max_new_tokens=True),
]


@pytest.mark.parametrize("kwargs", bad_values)
def test_validation_rejects_bad_values(kwargs):
    with pytest.raises(MinillamaError) as e:
        check_sampling_args(**kwargs)
    assert "\n" not in str(e.value) and next(iter(kwargs)) in str(e.value)


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=True), st.integers(-5, 5))
def test_validation_accepts_exactly_the_valid_range(x, n):
    def ok(**kw) -> bool:
        try:
            check_sampling_args(**kw)
            return True
        except MinillamaError:
            return False

    finite = math.isfinite(x)
    assert ok(temperature=x) == (finite and x >= 0)
    assert ok(top_p=x) == (finite and 0 < x <= 1)
    assert ok(min_p=x) == (finite and 0 <= x <= 1)
    assert ok(repetition_penalty=x) == (finite and x > 0)
    assert ok(top_k=n) == (n >= 0)
    assert ok(max_new_tokens=n) == (n >= 1)


@pytest.mark.parametrize("settings_", [
    SamplingSettings(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    SamplingSettings(repetition_penalty=1.3),
])
def test_the_chain_traces_into_one_graph(settings_):
    """No host syncs or data-dependent branches: torch.compile captures it whole (fullgraph), as a
    compiled decode step needs. backend="eager" checks the tracing without compiling kernels."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(next_token, fullgraph=True, backend="eager")
    logits, seen = random_logits(5), seen_tokens(random_ids(5), V)
    noise = sampling_noise(logits, torch.Generator().manual_seed(0))
    assert torch.equal(compiled(logits, seen, settings_, noise=noise), next_token(logits, seen, settings_, noise=noise))
