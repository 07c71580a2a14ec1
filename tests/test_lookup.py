"""Prompt-lookup decoding (lookup.py): the draft function, and generate/chat giving exactly the tokens they give
without it, with the drafts counted so a lookup that never runs fails."""

from __future__ import annotations

import functools

import pytest
from conftest import llama32_like, make_hf_checkpoint

from minillama import load_model
from minillama.chat import ChatSession
from minillama.engine import Engine, Request
from minillama.errors import MinillamaError
from minillama.generation import EagerEngine, GenerationConfig, generate
from minillama.lookup import find_draft
from minillama.sampling import make_generator
from minillama.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread", "one_token_matches")


@pytest.fixture
def one_token_matches(request, monkeypatch):
    """Drafts after 1-gram matches too (min_ngram=1, not MIN_NGRAM): random models seldom repeat two tokens in a
    row under a penalty or sampling, and many drafts, most of them rejected, are the harder test of the loop.
    A test parametrized with drafts="default" keeps lookup.py's own rule."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("drafts") != "default":
        import minillama.engine
        import minillama.generation

        for module in (minillama.generation, minillama.engine):
            monkeypatch.setattr(module, "find_draft", functools.partial(find_draft, min_ngram=1))

PROMPT = [1, 5, 9, 33, 70, 4, 18, 200] * 3 + [1, 5]  # repeats itself
KS = [1, 2, 3, 5, 8]


# ---- The draft --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,k,draft", [
    ([5, 6, 7, 8, 1, 5, 6], 3, [7, 8, 1]),  # the 2-gram [5, 6] recurs
    ([1, 2, 3, 9, 2, 3, 7, 2, 3], 2, [7, 2]),  # the latest occurrence, not the first
    ([1, 2, 3, 8, 9, 2, 3, 4, 5, 3], 2, []),  # a 1-gram is not enough (MIN_NGRAM)
    ([1, 2, 3, 8, 9, 2, 3, 4, 5, 1, 2, 3], 2, [8, 9]),  # ... but a longer match first: [1, 2, 3]
    ([3, 9, 4, 9, 4], 5, [9, 4, 9, 4, 9]),  # a loop: the copy runs on into itself
    ([7, 7, 7], 3, [7, 7, 7]),
    ([7, 7], 3, []),
    ([1, 2, 3], 4, []),  # nothing recurs (the tail itself does not count)
    ([4], 4, []),
    ([], 4, []),
    ([5, 6, 5], 0, []),
])
def test_find_draft(tokens, k, draft):
    assert find_draft(tokens, k) == draft


def test_find_draft_tries_at_most_max_ngram():
    tokens = [1, 2, 3, 4, 8, 2, 3, 4, 9, 3, 4, 6, 1, 2, 3, 4]
    assert find_draft(tokens, 1) == find_draft(tokens, 1, max_ngram=3) == [9]  # [2, 3, 4]; not [1, 2, 3, 4]
    assert find_draft(tokens, 1, max_ngram=4) == [8]
    assert find_draft(tokens, 1, max_ngram=2) == [6]
    assert find_draft([1, 2, 3, 8, 9, 2, 3, 4, 5, 3], 2, min_ngram=1) == [4, 5]  # the latest 1-gram [3]


# ---- generate: the same tokens --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """Varied output with loops now and then: drafts are both accepted and rejected."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("lively"), seed=3, initializer_range=0.14, **llama32_like())
    return load_model(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def looping(tmp_path_factory):
    """transformers' default init: the reply soon repeats one token, so nearly every draft is accepted."""
    return load_model(make_hf_checkpoint(tmp_path_factory.mktemp("looping"), seed=3, **llama32_like()),
                      device="cpu", dtype="float32")


def run(model, prompt=PROMPT, **kw):
    generation = generate(model, prompt, **{"eos_token_id": [], **kw})  # no eos unless asked: full-length replies
    return list(generation), generation


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", ["lively", "looping"])
@pytest.mark.parametrize("drafts", ["1-gram", "default"])
def test_greedy_lookup_yields_the_tokens_without_it(name, k, drafts, request):
    model = request.getfixturevalue(name)
    plain, _ = run(model, max_new_tokens=80)
    got, g = run(model, max_new_tokens=80, prompt_lookup_num_tokens=k)
    assert got == plain and g.tokens[0] == plain and g.stop_reason == "length"
    assert g.input_pos == len(PROMPT) + 80 - 1  # the cache holds every token but the last, as without lookup
    assert 0 < g.accepted <= g.drafted <= 79 * k  # drafts ran, and some were right
    if name == "looping":  # a loop is copied: most tokens cost no forward of their own
        assert g.accepted >= 0.8 * 79 * k / (k + 1)


@pytest.mark.parametrize("settings", [
    {"repetition_penalty": 1.3},  # the penalty counts each accepted draft before the next choice
    {"presence_penalty": 0.5, "frequency_penalty": 0.3},
    {"do_sample": True, "temperature": 0.7, "top_k": 20},  # one draw per token chosen: seeded runs agree
    {"do_sample": True, "temperature": 1.0, "top_k": 0, "repetition_penalty": 1.2},
])
@pytest.mark.parametrize("name", ["lively", "looping"])
def test_penalties_and_seeded_sampling_give_the_same_tokens(name, settings, request):
    model = request.getfixturevalue(name)
    plain, _ = run(model, max_new_tokens=60, generator=make_generator("cpu", 7), **settings)
    got, g = run(model, max_new_tokens=60, generator=make_generator("cpu", 7), prompt_lookup_num_tokens=4, **settings)
    assert got == plain and g.drafted > 0


@pytest.mark.parametrize("k", [3, 8])
def test_max_new_tokens_cuts_inside_a_draft(looping, k):
    """Every draft of the looping model is accepted, so the limit falls inside one: exactly n tokens come out,
    and no draft reaches past the limit (a forward of m rows chooses up to m tokens)."""
    for n in range(1, 12):
        plain, _ = run(looping, max_new_tokens=n)
        got, g = run(looping, max_new_tokens=n, prompt_lookup_num_tokens=k)
        assert got == plain and len(got) == n and g.stop_reason == "length"
        assert g.drafted <= n - 1 and (g.accepted > 0) == (n > 2)


class Forwards:
    """Wraps an engine's forward_all: records each draft fed and how many tokens had been chosen before it."""

    def __init__(self, generation):
        self.generation, self.calls = generation, []
        engine = generation.engine
        inner = engine.forward_all

        def forward_all(ids, input_pos):
            self.calls.append((len(generation.tokens[0]), ids[0, 1:].tolist()))
            return inner(ids, input_pos)

        engine.forward_all = forward_all

    def inside_drafts(self, tokens):
        """Indices of chosen tokens that were an accepted draft token with more draft after it."""
        found = []
        for before, draft in self.calls:
            for i, d in enumerate(draft[:-1]):
                if before + i < len(tokens) and tokens[before + i] == d:
                    found.append(before + i)
                else:
                    break
        return found


def second_turn(model):
    """A reply, then a next turn continuing its cache: the second reply copies the first one's loops, so its
    drafts hold tokens it has not said yet. Returns (run the second turn with these settings, its plain tokens,
    the indices of its tokens chosen from inside a draft, with more draft after them)."""
    engine = EagerEngine(model, model.new_cache(1, 200))
    first = generate(model, PROMPT, max_new_tokens=40, eos_token_id=[], engine=engine)
    reply = list(first)
    cached = PROMPT + reply[:-1]

    def turn(**kw):
        return run(model, [reply[-1], 70, 4, 18], max_new_tokens=60, engine=engine, input_pos=first.input_pos,
                   cached_ids=cached, **kw)

    plain, _ = turn()
    g = generate(model, [reply[-1], 70, 4, 18], max_new_tokens=60, eos_token_id=[], engine=engine,
                 input_pos=first.input_pos, cached_ids=cached, prompt_lookup_num_tokens=5)
    forwards = Forwards(g)
    assert list(g) == plain
    return turn, plain, forwards.inside_drafts(plain)


def test_eos_inside_a_draft_stops_there(lively):
    turn, plain, inside = second_turn(lively)
    firsts = [j for j in inside if plain[j] not in plain[:j]]  # as eos, such a token ends the reply right there
    assert firsts, "no new token was accepted from inside a draft; pick another prompt"
    for j in firsts:
        without, _ = turn(eos_token_id=[plain[j]])
        got, g = turn(eos_token_id=[plain[j]], prompt_lookup_num_tokens=5)
        assert got == without == plain[:j + 1] and g.stop_reason == "eos"


class LetterTokenizer:
    """Token id i decodes to one letter: enough to test stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_a_stop_string_inside_a_draft_stops_there(lively):
    tok = LetterTokenizer()
    turn, plain, inside = second_turn(lively)
    text = tok.decode(plain)
    assert inside
    for j in inside:
        # The shortest text ending at token j that appears nowhere before: the stop string completes at j.
        stop = next(text[j - m:j + 1] for m in range(j + 1) if text.find(text[j - m:j + 1]) == j - m)
        without, _ = turn(tokenizer=tok, stop_strings=[stop])
        got, g = turn(tokenizer=tok, stop_strings=[stop], prompt_lookup_num_tokens=5)
        assert got == without == plain[:j + 1] and g.stop_reason == "stop_string"


def test_continuing_a_cache_copies_drafts_from_the_cached_ids(lively, monkeypatch):
    import minillama.generation as generation_module

    seen = []

    def recording_find_draft(text, k):
        seen.append(list(text))
        return find_draft(text, k, min_ngram=1)

    monkeypatch.setattr(generation_module, "find_draft", recording_find_draft)
    engine = EagerEngine(lively, lively.new_cache(1, 200))
    first = generate(lively, PROMPT, max_new_tokens=10, engine=engine, prompt_lookup_num_tokens=3)
    reply = list(first)
    cached = PROMPT + reply[:-1]
    second = generate(lively, [reply[-1], 9, 33], max_new_tokens=30, engine=engine, input_pos=first.input_pos,
                      cached_ids=cached, prompt_lookup_num_tokens=3)
    got = list(second)
    assert seen[-1][:len(cached) + 3] == cached + [reply[-1], 9, 33]
    assert got == list(generate(lively, PROMPT + reply + [9, 33], max_new_tokens=30))


def test_the_context_stop_is_the_same(lively):
    engine = EagerEngine(lively, lively.new_cache(1, len(PROMPT) + 20))
    got, g = run(lively, max_new_tokens=50, engine=engine, stop_at_context=True, prompt_lookup_num_tokens=4)
    plain, p = run(lively, max_new_tokens=50, engine=EagerEngine(lively, lively.new_cache(1, len(PROMPT) + 20)),
                   stop_at_context=True)
    assert got == plain and g.stop_reason == p.stop_reason == "context" and len(got) == 20


# ---- What it refuses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"input_ids": [[1, 2, 3], [4, 5, 6]]}, "one unpadded prompt"),
    ({"input_ids": [[1, 2, 3], [4, 5]]}, "one unpadded prompt"),
    ({"input_ids": [1, 2, 3], "attention_mask": [0, 1, 1]}, "one unpadded prompt"),
    ({"input_ids": [1, 2, 3], "engine": "compiled"}, "eager engine"),
    ({"input_ids": [1, 2, 3], "prompt_lookup_num_tokens": -1}, "prompt_lookup_num_tokens"),
    ({"input_ids": [1, 2, 3], "prompt_lookup_num_tokens": 1.5}, "prompt_lookup_num_tokens"),
    ({"input_ids": [1, 2, 3], "prompt_lookup_num_tokens": True}, "prompt_lookup_num_tokens"),
    ({"input_ids": [1, 2, 3], "cached_ids": [1]}, "cached_ids"),
])
def test_refused(lively, kwargs, match):
    kwargs = {"prompt_lookup_num_tokens": 4, "max_new_tokens": 8, **kwargs}
    with pytest.raises(MinillamaError, match=match):
        generate(lively, **kwargs)


def test_off_values_and_the_config_field(lively):
    plain, _ = run(lively, max_new_tokens=10)
    for off in (0, None):
        got, g = run(lively, max_new_tokens=10, prompt_lookup_num_tokens=off)
        assert got == plain and g.drafted == 0
    config = GenerationConfig.from_dict({"prompt_lookup_num_tokens": 4, "max_new_tokens": 10})  # transformers' key
    got, g = run(lively, generation_config=config)
    assert got == plain and g.drafted > 0


# ---- The chat -------------------------------------------------------------------------------------------

TURNS = ["Say it again: the cat sat on the mat.", "Again, please: the cat sat on the mat.", "Thanks."]


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": False, "repetition_penalty": 1.3},
                                      {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95}])
def test_chat_replies_are_the_same_with_lookup(chat_model, sampling):
    model, tokenizer = load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(max_new_tokens=24, **sampling)
    plain = ChatSession(model, tokenizer, config, system="Be kind.", seed=4, context=512)
    lookup = ChatSession(model, tokenizer, config.updated(prompt_lookup_num_tokens=4), system="Be kind.", seed=4,
                         context=512)
    drafted = 0
    for text in TURNS:
        assert "".join(lookup.send(text)) == "".join(plain.send(text))
        assert lookup.cached_ids == plain.cached_ids
        drafted += lookup.last_stats.drafted
        assert plain.last_stats.drafted == 0
    assert drafted > 0
    if not config.do_sample:
        assert "drafts accepted" in lookup.last_stats.line()


def test_chat_refuses_the_compiled_engine_with_lookup(chat_model):
    model, tokenizer = load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(prompt_lookup_num_tokens=4)
    with pytest.raises(MinillamaError, match="eager engine"):
        ChatSession(model, tokenizer, config, context=64, engine="compiled")
    assert isinstance(ChatSession(model, tokenizer, config, context=64).engine, EagerEngine)



# ---- The engine -----------------------------------------------------------------------------------------

def engine_tokens(model, requests, slots=3):
    """Each request's tokens, the requests submitted one every two steps while the others run."""
    engine = Engine(model, slots=slots, max_seq_len=256, chunk_size=16, eos_token_ids=[])
    handles = []
    for r in requests:
        handles.append(engine.submit(r))
        engine.step()
        engine.step()
    while not all(h.done for h in handles):
        engine.step()
    return [h.token_ids for h in handles], engine.counters


def test_engine_requests_with_lookup_yield_their_tokens_without_it(lively):
    prompts = [PROMPT, PROMPT[5:], [3, 7, 3, 7, 3], PROMPT[:9] * 2]
    settings = [{"temperature": 0}, {"temperature": 0, "repetition_penalty": 1.3},
                {"temperature": 0.8, "top_k": 20, "seed": 5}, {"temperature": 0, "presence_penalty": 0.4}]
    plain, _ = engine_tokens(lively, [Request(p, max_tokens=40, **s) for p, s in zip(prompts, settings)])
    for k in (2, 5):  # the lookup rows share the steps with one that decodes in the batch
        requests = [Request(p, max_tokens=40, prompt_lookup_num_tokens=k if i != 1 else 0, **s)
                    for i, (p, s) in enumerate(zip(prompts, settings))]
        got, counters = engine_tokens(lively, requests)
        assert got == plain and counters["accepted"] > 0 and counters["drafted"] >= counters["accepted"]
    assert plain[0] == run(lively, max_new_tokens=40)[0]  # and they are generate's


def test_engine_max_tokens_cuts_inside_a_draft(looping):
    for n in range(1, 10):
        got, counters = engine_tokens(looping, [Request(PROMPT, max_tokens=n, temperature=0,
                                                        prompt_lookup_num_tokens=4)])
        assert got[0] == run(looping, max_new_tokens=n)[0] and counters["drafted"] <= n - 1


def test_engine_eos_inside_a_draft_stops_there(lively):
    engine = EagerEngine(lively, lively.new_cache(1, 200))
    reply = list(generate(lively, PROMPT, max_new_tokens=40, eos_token_id=[], engine=engine))
    _, plain, inside = second_turn(lively)
    prompt = PROMPT + reply + [70, 4, 18]  # the second turn's whole text, as a server renders a conversation
    firsts = [j for j in inside if plain[j] not in plain[:j]]
    assert firsts
    for j in firsts:
        got, _ = engine_tokens(lively, [Request(prompt, max_tokens=60, temperature=0, eos_token_ids=[plain[j]],
                                                prompt_lookup_num_tokens=5)])
        assert got[0] == plain[:j + 1]


def test_engine_refuses_a_bad_prompt_lookup(lively):
    engine = Engine(lively, slots=1, max_seq_len=64)
    for bad in (-1, 2.5, True):
        with pytest.raises(MinillamaError, match="prompt_lookup_num_tokens"):
            engine.submit(Request([1, 2, 3], max_tokens=4, prompt_lookup_num_tokens=bad))
