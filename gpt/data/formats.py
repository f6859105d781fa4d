"""The on-disk formats, each with one owner: the token shard header (llm.c's), a dataset's
`meta.json`, and the layout of a run folder. Readers and writers elsewhere go through here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt.data.tokenizer import TokenizerSpec
from gpt.durable import write_durably
from gpt.errors import GptError

# ----------------------------------------------------------------------------- shard header
# 256 little-endian int32: magic, version, token count, then zeros; the tokens follow as uint16.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


def shard_header(num_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, num_tokens)
    return header.tobytes()


def read_shard_header(path: Path) -> int:
    """The token count of a shard, after checking its magic, version and file size."""
    size = path.stat().st_size if path.is_file() else -1
    if size < HEADER_BYTES:
        raise GptError(f"{path}: missing or shorter than a shard header; run `gpt prepare` again")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise GptError(f"{path}: not a token shard (magic {header[0]}, expected {SHARD_MAGIC}); "
                       "run `gpt prepare` again")
    if header[1] != SHARD_VERSION:
        raise GptError(f"{path}: shard version {header[1]} is not supported (expected {SHARD_VERSION}); "
                       "run `gpt prepare` again")
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + count * TOKEN_DTYPE.itemsize:
        raise GptError(f"{path}: header says {count} tokens but the file holds "
                       f"{(size - HEADER_BYTES) / TOKEN_DTYPE.itemsize:g}; the shard is truncated or corrupt")
    return count


# ----------------------------------------------------------------------------- meta.json
META_FILE = "meta.json"
META_FORMAT = 1


@dataclass
class ShardInfo:
    file: str
    tokens: int


@dataclass
class SplitInfo:
    tokens: int
    shards: list[ShardInfo]
    bytes: int | None = None  # UTF-8 bytes of the split's text (for bits per byte); None in older datasets


@dataclass
class DatasetMeta:
    """Everything `meta.json` records about a prepared dataset."""

    tokenizer: TokenizerSpec
    vocab_size: int
    eot_id: int | None
    splits: dict[str, SplitInfo]
    sources: list[dict[str, Any]] = field(default_factory=list)
    created_by: str = ""

    def to_json(self) -> dict[str, Any]:
        splits = {name: {"tokens": s.tokens, "bytes": s.bytes,
                         "shards": [{"file": sh.file, "tokens": sh.tokens} for sh in s.shards]}
                  for name, s in self.splits.items()}
        return {"format_version": META_FORMAT, "tokenizer": self.tokenizer.to_json(), "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, "dtype": "uint16", "splits": splits, "sources": self.sources,
                "created_by": self.created_by}

    def write(self, folder: Path) -> None:
        """Write meta.json, and beside it a bpe or hf tokenizer's tokenizer.json."""
        self.tokenizer.write_file(folder)
        write_durably(folder / META_FILE, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, folder: str | Path) -> DatasetMeta:
        folder = Path(folder)
        path = folder / META_FILE
        if not folder.is_dir():
            raise GptError(f"data folder not found: {folder}; run `gpt prepare` first or fix data.dir")
        if not path.is_file():
            raise GptError(f"{folder} has no {META_FILE}; it is not a dataset made by `gpt prepare`")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise GptError(f"{path} is not valid JSON; run `gpt prepare --overwrite` to rebuild it") from None
        if not isinstance(raw, dict) or raw.get("format_version") != META_FORMAT:
            raise GptError(f"{path}: unsupported meta.json format; run `gpt prepare --overwrite` to rebuild it")
        try:
            return cls.from_json(raw, str(path), folder)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise GptError(f"{path} is missing fields or has wrong types; run `gpt prepare --overwrite`") from None

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str, folder: Path) -> DatasetMeta:
        splits = {}
        for name, split in raw["splits"].items():
            shards = [ShardInfo(file=_plain_name(s["file"], where), tokens=_count(s["tokens"]))
                      for s in split["shards"]]
            size = split.get("bytes")
            splits[str(name)] = SplitInfo(tokens=_count(split["tokens"]), shards=shards,
                                          bytes=None if size is None else _count(size))
        eot = raw.get("eot_id")
        return cls(tokenizer=TokenizerSpec.from_json(raw["tokenizer"], where, folder),
                   vocab_size=_count(raw["vocab_size"]), eot_id=None if eot is None else _count(eot), splits=splits,
                   sources=list(raw.get("sources", [])), created_by=str(raw.get("created_by", "")))


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _plain_name(name: Any, where: str) -> str:
    """A shard file name inside the dataset folder (never a path that leaves it)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise GptError(f"{where}: shard name {name!r} is not a plain file name; run `gpt prepare --overwrite`")
    return name


# ----------------------------------------------------------------------------- run folder
CKPT_PATTERN = re.compile(r"^ckpt_(\d{6,})$")


@dataclass(frozen=True)
class RunFolder:
    """Where a training run keeps its files (train.out_dir):

        ckpt_000500/  model.safetensors, config.yaml, tokenizer.json (+ hf_tokenizer.json), state.json,
                      optimizer.pt
        latest -> ckpt_000500        the newest complete checkpoint
        best/                        lowest val loss: weights, config, tokenizer, state
        config.yaml                  the resolved config, written at start (each checkpoint has its own)
        metrics.csv, loss.png, tensorboard/
    """

    root: Path

    # Files inside a checkpoint folder.
    WEIGHTS = "model.safetensors"
    CONFIG = "config.yaml"
    TOKENIZER = "tokenizer.json"  # our description of the tokenizer (TokenizerSpec.to_json)
    TOKENIZER_FILE = "hf_tokenizer.json"  # a bpe or hf tokenizer's Hugging Face tokenizer.json
    STATE = "state.json"
    TRAINING = "optimizer.pt"  # optimizer, scaler and per-rank sampler/RNG states

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def latest(self) -> Path:
        return self.root / "latest"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def run_config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def checkpoint(self, iteration: int) -> Path:
        return self.root / f"ckpt_{iteration:06d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (unfinished ones still end in .tmp)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name)]
        return sorted(found, key=lambda p: int(CKPT_PATTERN.match(p.name).group(1)))

    def run_files(self) -> list[Path]:
        """Everything a new run started with --overwrite removes."""
        best_folders = sorted(p for p in self.root.glob("best_*") if p.is_dir()) if self.root.is_dir() else []
        return self.checkpoints() + best_folders + [self.latest, self.best, self.run_config, self.metrics, self.plot,
                                                         self.tensorboard]

    def holds_run(self) -> bool:
        return any(p.exists() or p.is_symlink() for p in self.run_files())
