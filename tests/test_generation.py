"""generate(): greedy parity with transformers (single and left-padded batches), stopping, errors, settings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import llama32_like, make_hf_checkpoint

from minillama import load_model
from minillama.errors import MinillamaError
from minillama.generation import EagerEngine, GenerationConfig, generate, left_pad

N_NEW = 48
PROMPTS = [[1, 5, 9, 33, 70, 4, 18, 200], [1, 77, 3], [1, 12, 250, 6, 9]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine extra threads make
    transformers' generate several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Random init at transformers' default scale makes a tiny model repeat one token forever; a larger init
# gives varied output, which is what exposes a wrong position or mask.
@pytest.fixture(scope="module")
def lively_llama32(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("lively32"), seed=3, initializer_range=0.2, **llama32_like())


@pytest.fixture(scope="module")
def lively_llama2(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("lively2"), seed=4, initializer_range=0.2,
                              num_key_value_heads=4, tie_word_embeddings=False)


def load_pair(path, attn: str = "eager", pack: bool = False):
    from transformers import LlamaForCausalLM as HFLlama

    hf = HFLlama.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    ours = load_model(path, device="cpu", dtype="float32", pack=pack)
    ours.set_attn_implementation(attn)
    return hf, ours


def hf_greedy(hf, input_ids, attention_mask=None, **kw) -> torch.Tensor:
    """transformers' greedy continuation (new tokens only); eos off unless given."""
    kw = {"eos_token_id": None, "pad_token_id": 0, **kw}
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=N_NEW, do_sample=False, **kw)
    return out[:, input_ids.shape[1]:]


# ---- Parity with transformers -------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint,penalty,attn", [
    ("tiny_llama32", 1.3, "eager"), ("tiny_llama2", 1.3, "eager"),
    ("lively_llama32", 1.0, "eager"), ("lively_llama32", 1.0, "sdpa"), ("lively_llama2", 1.0, "eager"),
])
@pytest.mark.parametrize("pack", [False, True])  # plain weights, and the CPU default of chat: oneDNN-packed
def test_greedy_single_matches_transformers(checkpoint, penalty, attn, pack, request):
    hf, ours = load_pair(request.getfixturevalue(checkpoint), attn, pack)
    prompt = torch.tensor([PROMPTS[0]])
    expected = hf_greedy(hf, prompt, repetition_penalty=penalty)[0].tolist()
    generation = generate(ours, PROMPTS[0], max_new_tokens=N_NEW, repetition_penalty=penalty, engine="eager",
                          eos_token_id=[])  # as transformers above (the model's generation_config says eos=2)
    got = list(generation)
    assert all(isinstance(t, int) for t in got)
    assert got == expected
    assert generation.stop_reason == "length" and generation.tokens == [expected]
    assert generation.input_pos == len(PROMPTS[0]) + N_NEW - 1  # the last token is not fed back


@pytest.mark.parametrize("checkpoint", ["lively_llama32", "lively_llama2"])
def test_greedy_batch_with_left_padding_matches_transformers(checkpoint, request):
    hf, ours = load_pair(request.getfixturevalue(checkpoint))
    ids, mask = left_pad(PROMPTS, pad_id=0)
    expected = hf_greedy(hf, ids, mask)  # (B, N_NEW)
    steps = list(generate(ours, ids, attention_mask=mask, max_new_tokens=N_NEW))
    assert all(s.shape == (3,) and s.dtype == torch.long for s in steps)
    got = torch.stack(steps, dim=1)
    assert torch.equal(got, expected)
    # Every row is what it would be alone, and a list of lists is padded for you.
    for row, prompt in zip(got, PROMPTS):
        assert list(generate(ours, prompt, max_new_tokens=N_NEW)) == row.tolist()
    assert torch.equal(torch.stack(list(generate(ours, PROMPTS, max_new_tokens=N_NEW)), 1), got)


def test_batch_rows_finish_independently_like_transformers(lively_llama32):
    hf, ours = load_pair(lively_llama32)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    free = hf_greedy(hf, ids, mask)
    eos = free[0, 5].item()  # row 0 stops at step 5 (or earlier); pick an id that is not everywhere
    expected = hf_greedy(hf, ids, mask, eos_token_id=eos, pad_token_id=255)
    generation = generate(ours, ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=255)
    got = torch.stack(list(generation), dim=1)
    assert torch.equal(got, expected[:, : got.shape[1]])
    assert generation.stop_reasons[0] == "eos"
    first_stop = generation.tokens[0].index(eos)
    assert (got[0, first_stop + 1:] == 255).all()  # finished rows yield the pad id
    for b, reason in enumerate(generation.stop_reasons):
        assert reason == ("eos" if eos in generation.tokens[b] else "length")


# ---- Stopping -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model32(lively_llama32):
    return load_model(lively_llama32, device="cpu")


def test_stops_on_any_eos_id(model32):
    free = list(generate(model32, PROMPTS[0], max_new_tokens=20))
    eos = [9999 % 256, free[7]]
    generation = generate(model32, PROMPTS[0], max_new_tokens=20, eos_token_id=eos)
    got = list(generation)
    assert got == free[: free.index(free[7]) + 1]  # the eos token itself is yielded, then it stops
    assert generation.stop_reason == "eos"


def test_stops_on_max_new_tokens(model32):
    generation = generate(model32, PROMPTS[1], max_new_tokens=3)
    assert len(list(generation)) == 3 and generation.stop_reason == "length"


class LetterTokenizer:
    """Token id i decodes to one letter: enough to test stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stops_on_stop_string(model32):
    tok = LetterTokenizer()
    free = list(generate(model32, PROMPTS[0], max_new_tokens=30))
    stop = tok.decode(free[10:13])
    generation = generate(model32, PROMPTS[0], max_new_tokens=30, tokenizer=tok, stop_strings=[stop, "zzzzzzzzz"])
    got = list(generation)
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])
    assert got == free[: len(got)] and generation.stop_reason == "stop_string"
    with pytest.raises(MinillamaError, match="tokenizer"):
        generate(model32, PROMPTS[0], stop_strings=["x"])


def test_a_loaded_model_carries_its_generation_config(tiny_llama2, tmp_path):
    """generate() uses the model's own generation_config.json by default (eos, sampling), as transformers'
    model.generation_config; explicit settings still win."""
    path = tmp_path / "m"
    path.mkdir()
    for file in tiny_llama2.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    free = list(generate(load_model(path, device="cpu"), PROMPTS[0], max_new_tokens=20, eos_token_id=[]))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[3]], "max_new_tokens": 7}))
    model = load_model(path, device="cpu")
    assert model.generation_config.eos_token_id == [free[3]] and model.generation_config.max_new_tokens == 7
    generation = generate(model, PROMPTS[0])
    assert list(generation) == free[: free.index(free[3]) + 1] and generation.stop_reason == "eos"
    assert list(generate(model, PROMPTS[0], eos_token_id=[])) == free[:7]  # its max_new_tokens, no eos


# ---- Continuing from a cache --------------------------------------------------------------------------

def test_continuing_from_a_cache_equals_one_long_prompt(model32):
    engine = EagerEngine(model32, model32.new_cache(1, 128))
    first = generate(model32, PROMPTS[0], max_new_tokens=10, engine=engine)
    reply = list(first)
    # Next turn: feed the last reply token (not yet in the cache) and the new prompt tokens only.
    second = generate(model32, [reply[-1], *PROMPTS[2]], max_new_tokens=15, engine=first.engine,
                      input_pos=first.input_pos)
    whole = PROMPTS[0] + reply + PROMPTS[2]
    assert list(second) == list(generate(model32, whole, max_new_tokens=15))
    assert second.input_pos == len(whole) + 15 - 1


# ---- Errors before any work --------------------------------------------------------------------------

class NoForward(torch.nn.Module):
    """Looks like a model, fails the test if ever run."""

    def __init__(self, model):
        super().__init__()
        self.config, self.inner = model.config, model

    def forward(self, *a, **k):
        raise AssertionError("the model ran before the arguments were checked")

    def new_cache(self, *a, **k):
        raise AssertionError("a cache was allocated before the arguments were checked")

    device = property(lambda self: self.inner.device)


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=list(range(200)), max_new_tokens=57), "context of 256"),
    (dict(input_ids=[1, 2], max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=[1, 2], temperature=-1.0), "temperature"),
    (dict(input_ids=[1, 2], top_p=0.0), "top_p"),
    (dict(input_ids=[], max_new_tokens=4), "empty"),
    (dict(input_ids=[1, 256]), "vocabulary"),
    (dict(input_ids=[1, 2], input_pos=3), "cache"),
    (dict(input_ids=[1, 2], bogus=1), "bogus"),
])
def test_bad_requests_raise_before_any_work(model32, kwargs, match):
    with pytest.raises(MinillamaError, match=match) as e:
        generate(NoForward(model32), **kwargs)
    assert "\n" not in str(e.value)


def test_a_cache_too_short_raises_before_any_work(model32):
    engine = EagerEngine(NoForward(model32), model32.new_cache(1, 16))
    with pytest.raises(MinillamaError, match="context of 16"):
        generate(NoForward(model32), [1, 2, 3], max_new_tokens=10, engine=engine, input_pos=4)


def test_nan_logits_raise(lively_llama32):
    model = load_model(lively_llama32, device="cpu")
    generation = generate(model, PROMPTS[0], max_new_tokens=5)
    assert isinstance(next(generation), int)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")  # poisons every logit from the next step on
    with pytest.raises(MinillamaError, match="NaN"):
        next(generation)


# ---- Sampling ------------------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible(model32):
    def run(seed, **kw):
        return list(generate(model32, PROMPTS[0], max_new_tokens=20, do_sample=True, temperature=1.5,
                             generator=torch.Generator().manual_seed(seed), **kw))

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0, top_k=1) == list(generate(model32, PROMPTS[0], max_new_tokens=20))  # top-1 is greedy
    batch = torch.stack(list(generate(model32, PROMPTS, max_new_tokens=8, do_sample=True,
                                      generator=torch.Generator().manual_seed(0))), 1)
    assert batch.shape == (3, 8)


def test_the_iterator_leaves_inference_mode_between_steps(model32):
    generation = generate(model32, PROMPTS[0], max_new_tokens=3)
    for _ in generation:
        assert not torch.is_inference_mode_enabled()


# ---- GenerationConfig ----------------------------------------------------------------------------------

def test_generation_config_defaults_match_transformers():
    c = GenerationConfig()
    assert (c.do_sample, c.temperature, c.top_k, c.top_p, c.repetition_penalty) == (False, 1.0, 50, 1.0, 1.0)


def test_generation_config_reads_llama3_instruct(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128001, "pad_token_id": None}))
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
        "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0"}))
    c = GenerationConfig.from_model_dir(tmp_path)
    assert c.eos_token_id == [128001, 128008, 128009]
    assert (c.do_sample, c.temperature, c.top_p, c.top_k) == (True, 0.6, 0.9, 50)
    assert c.pad_id == 128001


def test_generation_config_falls_back_to_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "hidden_size": 64}))
    c = GenerationConfig.from_model_dir(tmp_path)
    assert c.eos_token_id == [2] and c.do_sample is False
    assert GenerationConfig.from_model_dir(tmp_path / "missing") == GenerationConfig()


def test_generation_config_errors_name_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(MinillamaError, match="generation_config.json"):
        GenerationConfig.from_model_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 2.0}))
    with pytest.raises(MinillamaError, match="generation_config.json.*top_p"):
        GenerationConfig.from_model_dir(tmp_path)


def test_updated_ignores_none_and_checks_values():
    c = GenerationConfig(temperature=0.7)
    assert c.updated(temperature=None, top_k=None) == c
    assert c.updated(top_k=5, eos_token_id=7).eos_token_id == [7]
    assert c.updated(stop_strings="END").stop_strings == ["END"]
    with pytest.raises(MinillamaError, match="top_k"):
        c.updated(top_k=-1)
    with pytest.raises(MinillamaError, match="unknown generation setting 'topk'"):
        c.updated(topk=5)


def test_batch_pad_id_must_be_in_the_vocabulary(model32):
    ids, mask = left_pad(PROMPTS[:2])
    with pytest.raises(MinillamaError, match="pad_token_id 300"):
        generate(NoForward(model32), ids, attention_mask=mask, pad_token_id=300)
    assert GenerationConfig().updated(eos_token_id=[]).eos_token_id == []


def test_repetition_penalty_leaves_left_padding_out_like_transformers(lively_llama32):
    """transformers 5.x skips a row's left padding when it counts tokens for the penalty, as minillama does.
    The pad id is one the padded row would otherwise say, so counting the pads would change its output."""
    hf, ours = load_pair(lively_llama32)
    pad = hf_greedy(hf, torch.tensor([PROMPTS[1]]))[0, 0].item()
    ids, mask = left_pad(PROMPTS, pad_id=pad)
    expected = hf_greedy(hf, ids, mask, repetition_penalty=1.3, pad_token_id=pad)
    got = torch.stack(list(generate(ours, ids, attention_mask=mask, max_new_tokens=N_NEW, repetition_penalty=1.3,
                                    pad_token_id=pad)), dim=1)
    assert torch.equal(got, expected)
    assert expected[1, 0].item() == pad  # not penalised: the pads before the prompt did not count
