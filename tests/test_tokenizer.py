import pytest

from gpt.data.tokenizer import ByteTokenizer, CharTokenizer, TextDecoder, TokenizerSpec, make_tokenizer
from gpt.errors import GptError

TEXTS = ["hello world", "Ünïcödé — 世界 🚀\n\ttabs  and  spaces", "", "a" * 1000]


def test_gpt2_known_ids_and_special_token():
    tok = make_tokenizer("gpt2")
    assert tok.encode("hello world") == [31373, 995]
    assert tok.vocab_size == 50257 and tok.eot == 50256
    assert tok.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize("name", ["gpt2", "byte", "char"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trips(name, text):
    tok = CharTokenizer(text or "x") if name == "char" else make_tokenizer(name)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_text_decoder_holds_back_split_characters_and_matches_decode(name):
    tok = make_tokenizer(name)
    text = "Ünïcödé — 世界 🚀 done"
    ids = tok.encode(text)
    decoder = TextDecoder(tok)
    pieces = [decoder.add(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if not p]) > 0  # some tokens end inside a character
    truncated = TextDecoder(tok)
    assert "".join(truncated.add(i) for i in tok.encode("🚀")[:1]) + truncated.finish() == "\ufffd"


def test_tokenizer_spec_round_trips():
    spec = CharTokenizer("banana").spec
    assert spec == TokenizerSpec("char", "abn") and TokenizerSpec.from_json(spec.to_json(), "t") == spec
    assert spec.build().encode("nab") == [2, 0, 1]


@pytest.mark.parametrize("junk", [{"name": "wordpiece"}, ["gpt2"], {"name": "char", "vocab": 5}])
def test_tokenizer_spec_rejects_junk(junk):
    with pytest.raises(GptError, match="t.json: unknown or malformed tokenizer"):
        TokenizerSpec.from_json(junk, "t.json")


def test_two_char_vocabularies_are_told_apart_by_the_characters_one_lacks():
    data, checkpoint = TokenizerSpec("char", "abc\n"), TokenizerSpec("char", "abdefghijklmn")
    assert data.difference(checkpoint, "the data", "the checkpoint") == (
        "the data and the checkpoint have different char vocabularies (4 and 13 characters): the data has 2 "
        "characters ('\\n', 'c') that the checkpoint lacks; the checkpoint has 11 characters ('d', 'e', 'f', 'g', "
        "'h', 'i', 'j', 'k' and 3 more) that the data lacks")
    assert TokenizerSpec("char", "ab").difference(TokenizerSpec("char", "abc"), "A", "B") == (
        "A and B have different char vocabularies (2 and 3 characters): B has 1 character ('c') that A lacks")
    assert data.difference(TokenizerSpec("gpt2"), "A", "B") == "A uses the char tokenizer, B the gpt2 one"


def test_gpt2_encode_ignores_special_token_text():
    tok = make_tokenizer("gpt2")
    assert 50256 not in tok.encode("<|endoftext|>")


def test_gpt2_batch_encoding_in_threads_equals_tiktoken_ordinary_encoding():
    tok = make_tokenizer("gpt2")
    texts = [*TEXTS, "a <|endoftext|> b", "x" * 100_000]
    for workers in (1, 3):
        batch = tok.encode_batch(texts, workers)
        assert [ids.tolist() for ids in batch] == [tok.encoding.encode_ordinary(t) for t in texts]
        assert all(ids.dtype.kind == "u" and ids.itemsize >= 2 for ids in batch)  # unsigned, wide enough for GPT-2 ids


def test_char_vocab_is_sorted_and_unknown_chars_are_named():
    tok = CharTokenizer("banana")
    assert tok.vocab == "abn" and tok.vocab_size == 3
    assert tok.encode("nab") == [2, 0, 1]
    with pytest.raises(GptError, match="'z'"):
        tok.encode("zebra")


def test_byte_tokenizer_is_lossless_on_binary_data():
    tok = ByteTokenizer()
    raw = bytes(range(256))
    text = raw.decode("utf-8", errors="surrogateescape")
    ids = tok.encode(text)
    assert ids == list(range(256)) and tok.decode_bytes(ids) == raw
    assert tok.vocab_size == 257 and tok.eot == 256


def test_unknown_tokenizer_name():
    with pytest.raises(GptError, match="choose one of gpt2, char, byte"):
        make_tokenizer("sentencepiece")
