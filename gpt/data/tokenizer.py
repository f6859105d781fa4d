"""Tokenizers with one interface: `encode`, `decode`, `eot`, `vocab_size`, `name`.

- gpt2: tiktoken's GPT-2 BPE, built offline from the rank file shipped in gpt/assets.
- char: one id per character of the corpus; the vocabulary travels in meta.json.
- byte: the 256 byte values plus an end-of-text id; lossless on any input.
- bpe: a byte-level BPE trained on the corpus by `gpt prepare --tokenizer bpe` (Hugging Face
  `tokenizers`); hf: any Hugging Face tokenizer.json brought as is. Both travel as the
  tokenizer.json file itself, beside meta.json and in every checkpoint, identified by its sha256.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gpt.durable import write_durably
from gpt.errors import GptError

GPT2_RANKS = Path(__file__).parent.parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer: contractions, letters, numbers, punctuation runs, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's pre-tokenizer (tiktoken's cl100k): contractions, letter runs with one leading
# non-letter, numbers in groups of at most 3 digits, punctuation runs, newlines, other whitespace.
# Letter runs need no spaces: Chinese or Japanese text splits at punctuation and script changes.
BPE_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
               r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
EOT_TEXT = "<|endoftext|>"
# Names a brought tokenizer may give its end-of-document token, by preference.
EOT_NAMES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
FILE_KINDS = ("bpe", "hf")  # tokenizers that travel as a Hugging Face tokenizer.json
NAMES = ("gpt2", "char", "byte", *FILE_KINDS)
TOKENIZER_FILE = "tokenizer.json"  # the file's name in a dataset folder (and in a Hugging Face folder)
MAX_VOCAB = 1 << 16  # shards store uint16 ids


@dataclass(frozen=True, eq=False)
class TokenizerSpec:
    """What identifies a tokenizer on disk (meta.json, a checkpoint's tokenizer.json): its name
    and, for char, its vocabulary, for bpe and hf the text of its tokenizer.json file. Two specs
    are equal exactly when they encode alike: for a file, when the files are identical (a BPE
    trained here and the same file brought back with --tokenizer PATH are one tokenizer)."""

    name: str
    vocab: str | None = None
    file: str | None = field(default=None, repr=False)

    def _identity(self) -> tuple[str | None, ...]:
        return (self.name, self.vocab) if self.file is None else ("file", self.file)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenizerSpec) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def to_json(self) -> dict[str, Any]:
        """The description meta.json and a checkpoint's tokenizer.json hold; a file is named by
        its sha256 and stored beside it (`write_file`)."""
        info: dict[str, Any] = {"name": self.name}
        if self.vocab is not None:
            info["vocab"] = self.vocab
        if self.file is not None:
            info["sha256"] = text_sha256(self.file)
        return info

    @classmethod
    def from_json(cls, info: Any, where: str, folder: str | Path | None = None,
                  file_name: str = TOKENIZER_FILE) -> TokenizerSpec:
        """Read a spec, or raise GptError naming `where` it came from. A bpe or hf tokenizer's
        file is read from `folder` and must still have the sha256 recorded in `info`."""
        name = info.get("name") if isinstance(info, dict) else None
        vocab = info.get("vocab") if isinstance(info, dict) else None
        digest = info.get("sha256") if isinstance(info, dict) else None
        if name not in NAMES or not (vocab is None or isinstance(vocab, str)) \
                or (name in FILE_KINDS) != isinstance(digest, str):
            raise GptError(f"{where}: unknown or malformed tokenizer {info!r}; expected one of {', '.join(NAMES)}")
        if name not in FILE_KINDS:
            return cls(name, vocab)
        path = Path(folder or ".") / file_name
        text = read_tokenizer_file(path)
        if text_sha256(text) != digest:
            raise GptError(f"{path} was edited after {where} recorded it (sha256 differs); put the original back "
                           "(token ids mean what it said), or prepare the data again with --tokenizer PATH")
        return cls(name, file=text)

    def write_file(self, folder: Path, file_name: str = TOKENIZER_FILE) -> None:
        """Store a bpe or hf tokenizer's file in `folder` (nothing for the others)."""
        if self.file is not None:
            write_durably(folder / file_name, self.file)

    def build(self) -> Tokenizer:
        return make_tokenizer(self.name, self.vocab, self.file)

    def describe(self) -> str:
        """The name, and for a file its short sha256: what `gpt info` and messages show."""
        return self.name if self.file is None else f"{self.name} (tokenizer.json sha256 {text_sha256(self.file)[:12]})"

    def difference(self, other: TokenizerSpec, mine: str, theirs: str) -> str:
        """How this tokenizer differs from `other`, in words; `mine` and `theirs` name where the
        two come from ("the data", "the checkpoint"). Two char vocabularies are told apart by
        the characters one has and the other lacks."""
        if self.name != other.name or self.vocab is None or other.vocab is None:
            return f"{mine} uses the {self.describe()} tokenizer, {theirs} the {other.describe()} one"
        extra, missing = set(self.vocab) - set(other.vocab), set(other.vocab) - set(self.vocab)
        sides = [f"{mine} has {_characters(extra)} that {theirs} lacks" if extra else None,
                 f"{theirs} has {_characters(missing)} that {mine} lacks" if missing else None]
        return (f"{mine} and {theirs} have different char vocabularies ({len(self.vocab)} and {len(other.vocab)} "
                f"characters): {'; '.join(side for side in sides if side)}")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_tokenizer_file(path: Path) -> str:
    """The text of a tokenizer.json, byte for byte (no newline translation: its sha256 is its identity)."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise GptError(f"{path} is missing; copy the tokenizer.json back, or prepare the data again") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise GptError(f"cannot read {path} ({reason}); give a Hugging Face tokenizer.json") from None


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


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, run by the `tokenizers` library: kind `bpe` (trained by
    `train_bpe`) or `hf` (brought as is, special tokens included). Text is always encoded as
    text: a special token's spelling inside a document stays plain text, as with gpt2."""

    def __init__(self, name: str, file: str):
        from tokenizers import Tokenizer as Backend

        try:
            self.backend = Backend.from_str(file)
        except Exception as exc:  # the Rust parser's message names the JSON problem
            reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            raise GptError(f"not a Hugging Face tokenizer.json ({reason}); give the tokenizer.json of a "
                           "fast tokenizer (from a model folder)") from None
        self.backend.encode_special_tokens = True
        self.name, self.file = name, file
        ids = self.backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(ids.values(), default=-1) + 1
        if not self.vocab_size:
            raise GptError("this tokenizer.json has an empty vocabulary; give a trained tokenizer")
        self.eot = next((ids[token] for token in EOT_NAMES if token in ids), None)
        self._pieces = _token_bytes(self.backend, json.loads(file), ids, self.vocab_size)

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str], workers: int = 1) -> list[np.ndarray]:
        """The library encodes a batch in its own thread pool (RAYON_NUM_THREADS sizes it), `workers`
        texts at a time: an Encoding costs about 100 bytes a token, so a whole batch at once would
        hold hundreds of megabytes."""
        ids = []
        for start in range(0, len(texts), max(1, workers)):
            encodings = self.backend.encode_batch_fast(texts[start:start + max(1, workers)], add_special_tokens=False)
            ids.extend(np.array(e.ids, dtype=np.uint32) for e in encodings)
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self._pieces[i] for i in ids if 0 <= i < self.vocab_size)

    @property
    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(self.name, file=self.file)


BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _token_bytes(backend, config: dict[str, Any], ids: dict[str, int], vocab_size: int) -> list[bytes]:
    """The bytes each id decodes to, so that any id sequence decodes to the concatenation of its
    tokens' bytes (streaming, bits per byte). Byte-level tokenizers (ours, GPT-2's, Llama 3's)
    spell each byte with one character; SentencePiece-style ones write a space as '\u2581' and
    unknown bytes as '<0xAB>'. Added tokens (specials) stand for their own text."""
    decoder = json.dumps(config.get("decoder"), ensure_ascii=False)
    byte_level = '"ByteLevel"' in decoder
    metaspace = "\u2581" in decoder
    unspell = {char: byte for byte, char in enumerate(byte_spelling())}
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    pieces = [b""] * vocab_size
    for token, i in ids.items():
        fallback = BYTE_FALLBACK.match(token)
        if fallback and not byte_level:
            pieces[i] = bytes([int(fallback.group(1), 16)])
        elif token in added:
            pieces[i] = token.encode("utf-8")
        elif byte_level and all(char in unspell for char in token):
            pieces[i] = bytes(unspell[char] for char in token)
        else:
            pieces[i] = (token.replace("\u2581", " ") if metaspace else token).encode("utf-8")
    return pieces


def byte_spelling() -> list[str]:
    """GPT-2's byte -> character table (Hugging Face's ByteLevel alphabet): printable Latin-1
    bytes stand for themselves, the others are moved to code points 256 and up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    spelling, moved = [], 0
    for byte in range(256):
        spelling.append(chr(byte) if byte in printable else chr(256 + moved))
        moved += byte not in printable
    return spelling


def check_bpe_vocab_size(vocab_size: int) -> None:
    """A BPE holds the 256 bytes and end-of-text at least, and at most what uint16 shards store."""
    if not 256 + 1 <= vocab_size <= MAX_VOCAB:
        raise GptError(f"--vocab-size must be between 257 (256 bytes + end-of-text) and {MAX_VOCAB:,} "
                       f"(uint16 shards), got {vocab_size}")


def train_bpe(texts: Iterator[str], vocab_size: int) -> str:
    """Train a byte-level BPE of `vocab_size` tokens (the 256 bytes, end-of-text, merges) on a
    stream of text pieces, with GPT-4's pre-tokenizer; returns its tokenizer.json. The trainer
    counts pre-tokens as the pieces arrive (memory grows with distinct words, not with the
    corpus) and breaks ties between equally frequent pairs by the pair itself, so the same
    corpus gives the same file whatever the number of threads."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    check_bpe_vocab_size(vocab_size)
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BPE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return backend.to_str(pretty=True)


def read_hf_tokenizer(value: str | Path) -> TokenizerSpec:
    """A Hugging Face tokenizer.json brought as is (or a model folder holding one): kind `hf`,
    checked to parse and to fit uint16 shards."""
    path = Path(value)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        path = path / TOKENIZER_FILE
    text = read_tokenizer_file(path)
    try:
        tokenizer = HFTokenizer("hf", text)
    except GptError as exc:
        raise GptError(f"{path}: {exc}") from None
    if tokenizer.vocab_size > MAX_VOCAB:
        raise GptError(f"{path}: its vocabulary of {tokenizer.vocab_size:,} tokens does not fit uint16 shards (ids "
                       f"below {MAX_VOCAB:,}); choose a tokenizer of at most 65,536 tokens, or train one "
                       "with --tokenizer bpe")
    return tokenizer.spec


def make_tokenizer(name: str, vocab: str | None = None, file: str | None = None) -> Tokenizer:
    if name in FILE_KINDS:
        if file is None:
            raise GptError(f"the {name} tokenizer needs its tokenizer.json")
        return HFTokenizer(name, file)
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        if vocab is None:
            raise GptError("the char tokenizer needs its vocabulary (from meta.json or tokenizer.json)")
        return CharTokenizer(vocab)
    raise GptError(f"unknown tokenizer {name!r}; choose one of {', '.join(NAMES)}")
