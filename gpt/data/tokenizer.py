"""Tokenizers with one interface: `encode`, `decode`, `eot`, `vocab_size`, `name`.

- gpt2: tiktoken's GPT-2 BPE, built offline from the rank file shipped in gpt/assets.
- char: one id per character of the corpus; the vocabulary travels in meta.json.
- byte: the 256 byte values plus an end-of-text id; lossless on any input.
"""

from __future__ import annotations

import codecs
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from gpt.errors import GptError

GPT2_RANKS = Path(__file__).parent.parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer: contractions, letters, numbers, punctuation runs, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TEXT = "<|endoftext|>"
NAMES = ("gpt2", "char", "byte")


@dataclass(frozen=True)
class TokenizerSpec:
    """What identifies a tokenizer on disk (meta.json, a checkpoint's tokenizer.json): its name
    and, for char, its vocabulary. Two specs are equal exactly when they encode alike."""

    name: str
    vocab: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name} if self.vocab is None else {"name": self.name, "vocab": self.vocab}

    @classmethod
    def from_json(cls, info: Any, where: str) -> TokenizerSpec:
        """Read a spec, or raise GptError naming `where` it came from."""
        name = info.get("name") if isinstance(info, dict) else None
        vocab = info.get("vocab") if isinstance(info, dict) else None
        if name not in NAMES or not (vocab is None or isinstance(vocab, str)):
            raise GptError(f"{where}: unknown or malformed tokenizer {info!r}; expected one of {', '.join(NAMES)}")
        return cls(name, vocab)

    def build(self) -> Tokenizer:
        return make_tokenizer(self.name, self.vocab)

    def difference(self, other: TokenizerSpec, mine: str, theirs: str) -> str:
        """How this tokenizer differs from `other`, in words; `mine` and `theirs` name where the
        two come from ("the data", "the checkpoint"). Two char vocabularies are told apart by
        the characters one has and the other lacks."""
        if self.name != other.name or self.vocab is None or other.vocab is None:
            return f"{mine} uses the {self.name} tokenizer, {theirs} the {other.name} one"
        extra, missing = set(self.vocab) - set(other.vocab), set(other.vocab) - set(self.vocab)
        sides = [f"{mine} has {_characters(extra)} that {theirs} lacks" if extra else None,
                 f"{theirs} has {_characters(missing)} that {mine} lacks" if missing else None]
        return (f"{mine} and {theirs} have different char vocabularies ({len(self.vocab)} and {len(other.vocab)} "
                f"characters): {'; '.join(side for side in sides if side)}")


def _characters(chars: set[str], shown: int = 8) -> str:
    """A few characters, quoted (so that whitespace shows), and how many more there are."""
    listed = ", ".join(repr(ch) for ch in sorted(chars)[:shown])
    more = f" and {len(chars) - shown} more" if len(chars) > shown else ""
    return f"{len(chars)} character{'s' if len(chars) > 1 else ''} ({listed}{more})"


class Tokenizer:
    name: str
    vocab_size: int
    eot: int | None

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str], workers: int = 1) -> list[np.ndarray]:
        """Token ids of each text, as integer arrays of any width (the path `gpt prepare` uses)."""
        return [self.encode_array(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of `ids`; a token may end in the middle of a UTF-8 character."""
        raise NotImplementedError

    @property
    def spec(self) -> TokenizerSpec:
        """What meta.json and checkpoints store to rebuild this tokenizer."""
        return TokenizerSpec(self.name)


class TextDecoder:
    """Token ids to text one token at a time. The bytes of a character split across tokens are
    held back until it is complete, so a growing sample is never decoded again from the start."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """The text that `token` completes (possibly empty)."""
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))

    def holding(self) -> bool:
        """Whether bytes of an unfinished character are held back."""
        return bool(self.utf8.getstate()[0])

    def finish(self) -> str:
        """Whatever is still held back, with an incomplete character shown as U+FFFD."""
        return self.utf8.decode(b"", final=True)


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"

    def __init__(self) -> None:
        self.encoding = gpt2_encoding()
        self.vocab_size = self.encoding.n_vocab
        self.eot = self.encoding.eot_token

    def encode_array(self, text: str) -> np.ndarray:
        return self._ids(text).astype(np.int64)

    def encode_batch(self, texts: list[str], workers: int = 1) -> list[np.ndarray]:
        # tiktoken's Rust core releases the GIL, so threads give real parallelism here.
        with ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(self._ids, texts))

    def _ids(self, text: str) -> np.ndarray:
        """uint32 ids of `text`, special-token text encoded as ordinary text. The numpy output
        skips building a Python int per token, which made `gpt prepare` slower than tiktoken."""
        return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)


@lru_cache(maxsize=1)
def gpt2_encoding():
    """GPT-2's tiktoken Encoding from the bundled rank file (no network, no cache dir)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    data = GPT2_RANKS.read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise GptError(f"{GPT2_RANKS} is corrupt (sha256 mismatch); reinstall the gpt package")
    ranks = load_tiktoken_bpe(str(GPT2_RANKS), expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: len(ranks)})


class CharTokenizer(Tokenizer):
    name = "char"

    def __init__(self, vocab: str) -> None:
        if not vocab:
            raise GptError("a char vocabulary needs at least one character")
        self.vocab = "".join(sorted(set(vocab)))
        self.vocab_size = len(self.vocab)
        self.eot = None
        # Code points in sorted order, for a vectorised lookup with searchsorted.
        self._codepoints = np.frombuffer(self.vocab.encode("utf-32-le"), dtype=np.uint32)

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, points)
        ids_clipped = np.minimum(ids, self.vocab_size - 1)
        unknown = self._codepoints[ids_clipped] != points
        if unknown.any():
            raise UnknownCharacter(chr(points[np.argmax(unknown)]))
        return ids.astype(np.int64)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return "".join(self.vocab[i] for i in ids).encode("utf-8", errors="surrogatepass")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    @property
    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(self.name, self.vocab)


class UnknownCharacter(GptError):
    """A character outside a char vocabulary. The message fits a prompt; where the text came
    from elsewhere (a file, a task item, `gpt tokenize`), the caller names what to change there."""

    def __init__(self, char: str) -> None:
        self.char = char
        self.problem = f"character {char!r} (U+{ord(char):04X}) is not in this model's char vocabulary"
        super().__init__(f"{self.problem}; remove it from the prompt or prepare the data with it")


class ByteTokenizer(Tokenizer):
    """Bytes 0..255 and id 256 for end-of-text. Text is read with 'surrogateescape', so bytes
    that are not valid UTF-8 survive the round trip unchanged."""

    name = "byte"
    vocab_size = 257
    eot = 256

    def encode_array(self, text: str) -> np.ndarray:
        raw = text.encode("utf-8", errors="surrogateescape")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i for i in ids if i < 256)


def make_tokenizer(name: str, vocab: str | None = None) -> Tokenizer:
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        if vocab is None:
            raise GptError("the char tokenizer needs its vocabulary (from meta.json or tokenizer.json)")
        return CharTokenizer(vocab)
    raise GptError(f"unknown tokenizer {name!r}; choose one of {', '.join(NAMES)}")
