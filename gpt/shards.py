"""Token shards on disk (llm.c's format), their reader, and the training batch sampler.

A shard is a header of 256 little-endian int32 (magic, version, token count, zeros) followed
by the tokens as little-endian uint16. `meta.json` beside the shards lists them per split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt.errors import GptError
from gpt.tokenizer import Tokenizer, tokenizer_from_json

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
META_FORMAT = 1
SPLITS = ("train", "val")


def fsync_path(path: Path) -> None:
    """Flush a file or folder's metadata to disk so that a rename is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Appends tokens of one split to shards of at most `shard_tokens` tokens each."""

    def __init__(self, folder: Path, prefix: str, split: str, shard_tokens: int):
        self.folder, self.prefix, self.split, self.shard_tokens = folder, prefix, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(TOKEN_DTYPE, copy=False)
        while len(tokens):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            tokens[:room].tofile(self._file)
            self._count += min(room, len(tokens))
            tokens = tokens[room:]
            if self._count == self.shard_tokens:
                self._close()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._close()
        return self.shards

    @property
    def total(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._count

    def _open(self) -> None:
        name = f"{self.prefix}_{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.folder / name, "wb")
        self._file.write(b"\0" * HEADER_BYTES)  # patched with the count on close
        self._count = 0
        self.shards.append({"file": name, "tokens": 0})

    def _close(self) -> None:
        self._file.seek(0)
        self._file.write(make_header(self._count).tobytes())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards[-1]["tokens"] = self._count


def make_header(num_tokens: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, num_tokens)
    return header


def read_shard(path: Path, vocab_size: int, expected_tokens: int | None = None) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header, size and token range."""
    size = path.stat().st_size if path.is_file() else -1
    if size < HEADER_BYTES:
        raise GptError(f"{path}: missing or shorter than a shard header; run `gpt prepare` again")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise GptError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC}); run `gpt prepare` again")
    if header[1] != VERSION:
        raise GptError(f"{path}: shard version {header[1]} is not supported (expected {VERSION}); "
                       "run `gpt prepare` again")
    count = int(header[2])
    if size != HEADER_BYTES + count * TOKEN_DTYPE.itemsize:
        raise GptError(f"{path}: header says {count} tokens but the file holds "
                       f"{(size - HEADER_BYTES) / TOKEN_DTYPE.itemsize:g}; the shard is truncated or corrupt")
    if expected_tokens is not None and count != expected_tokens:
        raise GptError(f"{path}: holds {count} tokens but meta.json says {expected_tokens}; "
                       "the dataset was modified, run `gpt prepare --overwrite`")
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
    if count and int(tokens.max()) >= vocab_size:
        raise GptError(f"{path}: token id {int(tokens.max())} is out of range for vocab_size {vocab_size}")
    return tokens


@dataclass
class Dataset:
    """A prepared data folder: its meta.json, tokenizer and memory-mapped splits."""

    folder: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    splits: dict[str, list[np.ndarray]]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def num_tokens(self, split: str) -> int:
        return sum(len(shard) for shard in self.splits.get(split, []))


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / "meta.json"
    if not folder.is_dir():
        raise GptError(f"data folder not found: {folder}; run `gpt prepare` first or fix data.dir")
    if not path.is_file():
        raise GptError(f"{folder} has no meta.json; it is not a dataset made by `gpt prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GptError(f"{path} is not valid JSON; run `gpt prepare --overwrite` to rebuild it") from None
    if not isinstance(meta, dict) or meta.get("format_version") != META_FORMAT:
        raise GptError(f"{path}: unsupported meta.json format; run `gpt prepare --overwrite` to rebuild it")
    return meta


def load_dataset(folder: str | Path) -> Dataset:
    """Open a dataset, checking meta.json against the tokenizer and every shard."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        tokenizer = tokenizer_from_json(meta["tokenizer"])
        vocab_size = int(meta["vocab_size"])
        split_infos = {name: meta["splits"][name] for name in meta["splits"]}
    except (KeyError, TypeError, ValueError):
        raise GptError(f"{folder}/meta.json is missing fields; run `gpt prepare --overwrite`") from None
    if tokenizer.vocab_size != vocab_size:
        raise GptError(f"{folder}/meta.json: vocab_size {vocab_size} does not match its "
                       f"{tokenizer.name} tokenizer ({tokenizer.vocab_size})")
    splits = {}
    for name, info in split_infos.items():
        shards = [read_shard(folder / s["file"], vocab_size, s["tokens"]) for s in info["shards"]]
        if sum(len(s) for s in shards) != info["tokens"]:
            raise GptError(f"{folder}/meta.json: token count of split {name!r} does not match its shards")
        splits[name] = shards
    return Dataset(folder=folder, meta=meta, tokenizer=tokenizer, splits=splits)


class BatchSampler:
    """Random contiguous windows of block_size + 1 tokens from one split's shards.

    Only the windows are read from the memory-mapped shards, never a whole split. The numpy
    generator is the sampler's only state, so saving `state()` and restoring it with
    `load_state()` reproduces the data order exactly."""

    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int, seed: int | list[int]):
        self.block_size, self.batch_size = block_size, batch_size
        self.shards = [s for s in shards if len(s) > block_size]
        if not self.shards:
            longest = max((len(s) for s in shards), default=0)
            raise GptError(f"no shard holds more than block_size={block_size} tokens (longest: {longest}); "
                           "lower model.block_size or prepare more data")
        starts = np.array([len(s) - block_size for s in self.shards], dtype=np.float64)
        self.shard_weights = starts / starts.sum()
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and next-token targets y, both (batch_size, block_size) int64."""
        which = self.rng.choice(len(self.shards), size=self.batch_size, p=self.shard_weights)
        windows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        for row, shard_index in enumerate(which):
            shard = self.shards[shard_index]
            start = int(self.rng.integers(0, len(shard) - self.block_size))
            windows[row] = shard[start:start + self.block_size + 1]
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
