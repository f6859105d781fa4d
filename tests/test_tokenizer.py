import pytest

from gpt.errors import GptError
from gpt.tokenizer import ByteTokenizer, CharTokenizer, make_tokenizer

TEXTS = ["hello world", "Ünïcödé — 世界 🚀\n\ttabs  and  spaces", "", "a" * 1000]


def test_gpt2_known_ids_and_special_token():
    tok = make_tokenizer("gpt2")
    assert tok.encode("hello world") == [31373, 995]
    assert tok.vocab_size == 50257 and tok.eot == 50256
    assert tok.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trips(text):
    for tok in (make_tokenizer("gpt2"), ByteTokenizer(), CharTokenizer(text or "x")):
        assert tok.decode(tok.encode(text)) == text


def test_gpt2_encode_ignores_special_token_text():
    tok = make_tokenizer("gpt2")
    assert 50256 not in tok.encode("<|endoftext|>")


def test_char_vocab_is_sorted_and_unknown_chars_are_named():
    tok = CharTokenizer("banana")
    assert tok.vocab == "abn" and tok.vocab_size == 3
    assert tok.encode("nab") == [2, 0, 1]
    with pytest.raises(GptError, match="'z'"):
        tok.encode("zebra")
    assert make_tokenizer("char", tok.to_json()["vocab"]).encode("nab") == [2, 0, 1]


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
