"""The tokenizer: the walkthrough's 66 ids, encode/decode equal to transformers on the real Llama 3.2
tokenizer, and a streaming detokenizer that never prints half a character."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillama.chat_template import BUILTIN_LLAMA3
from minillama.errors import MinillamaError
from minillama.tokenizer import load_tokenizer

# From ../shared/docs/ASSETS.md: the seed walkthrough's chat and its ids with the Llama 3.2 tokenizer.
WALKTHROUGH_CHAT = [
    {"role": "system", "content": "You are an intelligent assistant trained to follow user instructions and "
                                  "provide accurate, concise, and helpful responses."},
    {"role": "user", "content": "write 3 lines about transfromers in llms"},
]
WALKTHROUGH_IDS = [int(i) for i in """
128000 128006 9125 128007 271 38766 1303 33025 2696 25 6790 220 2366 18 198 15724 2696 25 220 1627 10263
220 2366 19 271 2675 527 459 25530 18328 16572 311 1833 1217 11470 323 3493 13687 11 64694 11 323 11190
14847 13 128009 128006 882 128007 271 5040 220 18 5238 922 1380 1527 388 304 9507 1026 128009 128006
78191 128007 271""".split()]

CORPUS = [
    "Hello, world!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\n  mixed \t \n",
    "Ünïcödé àccents: naïve café, façade, Ærøskøbing, ß",
    "Emoji: 😀👍🏽👨‍👩‍👧‍👦🇯🇵 and ❤️ with 🤖 robots",
    "中文：你好，世界！日本語のテキスト、한국어 텍스트",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(12345))",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 3.14159; }",
    "digits 1234567890 0.000123 -42 1e10 3,141,592 2024-07-26",
    "whitespace runs:" + " " * 17 + "x" + "\n" * 5 + "\t" * 3 + "y",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "special-looking text <|eot_id|> mid sentence and <|reserved_special_token_5|>",
    "HTML <b>bold</b> &amp; \"quotes\" 'single' `back`",
    "a" * 300,
    "🤖" * 50,
    "mixed 中文 and English and 😀 in one line, 123 numbers",
    "\u200b zero-width \u00a0 nbsp \ufeff bom",
]


@pytest.fixture
def tok(llama32_tokenizer):
    return llama32_tokenizer


@pytest.fixture
def hf(llama32_hf_tokenizer):
    return llama32_hf_tokenizer


# ---------------------------------------------------------------- the walkthrough


def test_walkthrough_chat_renders_to_the_66_ids(tok):
    assert tok.chat_template_source == BUILTIN_LLAMA3
    ids = tok.apply_chat_template(WALKTHROUGH_CHAT, tokenize=True, date_string="26 Jul 2024")
    assert len(WALKTHROUGH_IDS) == 66
    assert ids == WALKTHROUGH_IDS


def test_walkthrough_ids_round_trip(tok):
    text = tok.apply_chat_template(WALKTHROUGH_CHAT, date_string="26 Jul 2024")
    assert tok.decode(WALKTHROUGH_IDS) == text
    assert tok.encode(tok.decode(WALKTHROUGH_IDS), add_special_tokens=False) == WALKTHROUGH_IDS
    plain = tok.decode(WALKTHROUGH_IDS, skip_special_tokens=True)
    assert plain == re.sub(r"<\|[a-z_]+\|>", "", text)
    assert "<|" not in plain and plain.startswith("system\n\nCutting Knowledge Date: December 2023\n")


def test_setting_date_on_the_format(tok):
    tok.chat_format.date_string = "26 Jul 2024"
    try:
        assert tok.apply_chat_template(WALKTHROUGH_CHAT, tokenize=True) == WALKTHROUGH_IDS
    finally:
        tok.chat_format.date_string = None


def test_encoding_the_rendered_prompt_with_special_tokens_doubles_bos(tok):
    """Why apply_chat_template(tokenize=True) encodes with add_special_tokens=False."""
    text = tok.apply_chat_template(WALKTHROUGH_CHAT, date_string="26 Jul 2024")
    assert tok.encode(text)[:2] == [128000, 128000]


# ---------------------------------------------------------------- special tokens


def test_special_tokens(tok, hf):
    assert (tok.bos_token, tok.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (tok.eos_token, tok.eos_token_id) == ("<|end_of_text|>", 128001)
    assert tok.pad_token_id == 128004 == hf.pad_token_id
    assert tok.vocab_size == len(hf) == len(tok)
    assert set(range(128000, 128256)) <= tok.special_ids
    assert tok.token_to_id("<|eot_id|>") == 128009 and 9906 not in tok.special_ids
    assert tok.path == tok.path.resolve() or tok.path.name == "tokenizer"


def test_special_tokens_from_special_tokens_map_and_dicts(tmp_path, llama32_tokenizer_dir):
    """Old repos name bos/eos only in special_tokens_map.json, often as {"content": ...} dicts."""
    (tmp_path / "tokenizer.json").symlink_to(llama32_tokenizer_dir / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False},
        "eos_token": "<|eot_id|>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>"}, "pad_token": None}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token, tok.eos_token_id, tok.pad_token_id) == (128000, "<|end_of_text|>",
                                                                                     128001, None)


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf, add_special_tokens):
    for text in CORPUS:
        assert tok.encode(text, add_special_tokens=add_special_tokens) == \
            hf.encode(text, add_special_tokens=add_special_tokens), text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tok, hf, skip_special_tokens):
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=skip_special_tokens) == \
            hf.decode(ids, skip_special_tokens=skip_special_tokens), text
    # Arbitrary id sequences too, cut mid-character and mixed with special ids.
    ids = list(range(0, 128257, 997)) + [128009, 220, 9906, 128256, 15722, 128000]
    assert tok.decode(ids, skip_special_tokens=skip_special_tokens) == \
        hf.decode(ids, skip_special_tokens=skip_special_tokens)


def test_pieces_match_transformers(tok, hf):
    ids = tok.encode(" ".join(CORPUS[:10]))
    assert [tok.id_to_piece(i) for i in ids] == hf.convert_ids_to_tokens(ids)
    assert tok.id_to_piece(9906) == "Hello" and tok.id_to_piece(24748) == "Ġhello"
    assert tok.piece_text(24748) == " hello" and tok.piece_text(128009) == "<|eot_id|>"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_encode_decode_match_transformers_on_random_text(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level BPE is lossless


def test_out_of_range_ids_are_a_clear_error(tok):
    for bad in (tok.vocab_size, -1, 10**12):
        with pytest.raises(MinillamaError, match="outside the vocabulary"):
            tok.decode([1, bad])
        with pytest.raises(MinillamaError, match="outside the vocabulary"):
            tok.id_to_piece(bad)


# ---------------------------------------------------------------- streaming detokenizer


def stream(tok, ids, skip_special_tokens=True):
    decoder = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces, decoder


MULTIBYTE = ["Emoji: 😀👍🏽👨‍👩‍👧‍👦🇯🇵 ❤️ 🤖🤖🤖", "中文：你好，世界！日本語のテキスト、한국어", "naïve café Ærøskøbing façade",
             "mixed 中文 and 😀, numbers 12345 and <b>tags</b>", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∀x∈ℝ: x²≥0"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_equals_decode_and_never_splits_a_character(tok, skip_special_tokens):
    for text in MULTIBYTE + CORPUS:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                      date_string="26 Jul 2024") + tok.encode(text, add_special_tokens=False)
        pieces, _ = stream(tok, ids, skip_special_tokens)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens), text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)


def test_multibyte_corpus_really_splits_characters_across_tokens(tok):
    """Otherwise the streaming test above would pass with a naive token-by-token decoder."""
    ids = tok.encode("".join(MULTIBYTE), add_special_tokens=False)
    assert sum("\ufffd" in tok.piece_text(i) for i in ids) > 10


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_stream_equals_decode_on_random_text(tok, text):
    ids = tok.encode(text)
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    # no piece holds a replacement character the text did not have (hypothesis may generate U+FFFD itself)
    assert sum(p.count("\ufffd") for p in pieces) == text.count("\ufffd")


def test_stream_decoder_keeps_a_small_window(tok):
    """Each push decodes a few tokens, not the whole history."""
    ids = tok.encode("😀 中文 word " * 500, add_special_tokens=False)
    decoder = tok.stream_decoder()
    for i in ids:
        decoder.push(i)
        assert len(decoder._ids) <= decoder.MAX_PENDING + 4


def test_stream_decoder_emits_invalid_bytes_eventually(tok):
    """A lone lead byte followed by many lead bytes can never form a character: do not hold text forever."""
    lead = tok.token_to_id("ä")  # byte-level piece for the single byte 0xE4, a 3-byte lead
    ids = [lead] * 20 + tok.encode(" done", add_special_tokens=False)
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-2].endswith("done") or pieces[-3].endswith("done")


def test_stream_decoder_with_a_sentencepiece_style_decoder(tmp_path):
    """Metaspace decoders drop the first token's leading space: the prefix window keeps later pieces right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    text = "the quick brown fox jumps over the lazy dog, naïve café 中文 words words"
    backend.train_from_iterator([text] * 5, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>"]))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert len([p for p in pieces if p]) > 5


# ---------------------------------------------------------------- bad files


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(MinillamaError, match="no tokenizer.json in .*SentencePiece"):
        load_tokenizer(tmp_path)


def test_corrupt_files_name_the_file(tmp_path, llama32_tokenizer_dir):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(MinillamaError, match="tokenizer.json is not a valid tokenizer file") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").symlink_to(llama32_tokenizer_dir / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(MinillamaError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": 5}))
    with pytest.raises(MinillamaError, match="bos_token is a int"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(MinillamaError, match="chat template from tokenizer_config.json has a syntax error"):
        load_tokenizer(tmp_path)


def test_why_not_tokenizers_decode_stream(tok):
    """`tokenizers.decoders.DecodeStream` streams the same text but has no flush: a reply that stops in the middle
    of a character (a length limit inside an emoji) loses its tail, the space before it included. Ours flushes
    the held-back bytes, so the pieces always add up to `decode(ids)`; that is why minillama keeps its own."""
    from tokenizers.decoders import DecodeStream

    ids = tok.encode("ok 🤖", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    theirs = DecodeStream(skip_special_tokens=True)
    their_text = "".join(piece for i in ids if (piece := theirs.step(tok.backend, i)) is not None)
    pieces, _ = stream(tok, ids)  # its last piece is the flush
    ours = "".join(pieces)
    assert ours == tok.decode(ids) == "ok \ufffd"
    assert their_text != ours
