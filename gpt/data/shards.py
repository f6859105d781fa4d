"""Token shards on disk, their reader, and the training batch sampler and loader.

The shard format and meta.json are defined in `gpt.data.formats`; this module writes shards,
memory-maps them, and draws training batches from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gpt.data.formats import HEADER_BYTES, TOKEN_DTYPE, DatasetMeta, ShardInfo, read_shard_header, shard_header
from gpt.data.tokenizer import Tokenizer
from gpt.errors import GptError


class ShardWriter:
    """Appends tokens of one split to shards of at most `shard_tokens` tokens each, noting each
    shard's largest token id while the tokens are in memory (readers then check the id range
    from meta.json instead of reading every token)."""

    def __init__(self, folder: Path, prefix: str, split: str, shard_tokens: int):
        self.folder, self.prefix, self.split, self.shard_tokens = folder, prefix, split, shard_tokens
        self.shards: list[ShardInfo] = []
        self._file = None
        self._count = self._max_id = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(TOKEN_DTYPE, copy=False)
        while len(tokens):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            chunk = tokens[:room]
            chunk.tofile(self._file)
            self._count += len(chunk)
            self._max_id = max(self._max_id, int(chunk.max()))
            tokens = tokens[room:]
            if self._count == self.shard_tokens:
                self._close()

    def close(self) -> list[ShardInfo]:
        if self._file is not None:
            self._close()
        return self.shards

    @property
    def total(self) -> int:
        return sum(s.tokens for s in self.shards) + self._count

    def _open(self) -> None:
        name = f"{self.prefix}_{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.folder / name, "wb")
        self._file.write(b"\0" * HEADER_BYTES)  # patched with the count on close
        self._count = self._max_id = 0
        self.shards.append(ShardInfo(file=name, tokens=0))

    def _close(self) -> None:
        self._file.seek(0)
        self._file.write(shard_header(self._count))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards[-1].tokens, self.shards[-1].max_id = self._count, self._max_id


def read_shard(path: Path, vocab_size: int, info: ShardInfo | None = None, verify: bool = False) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header, size and token range.

    The range check trusts the largest id that meta.json records (`info.max_id`), so opening a
    dataset reads one header per shard, whatever its size. Without a record (a dataset made
    before it was kept, or no `info`), or with `verify`, every token is read once."""
    count = read_shard_header(path)
    if info is not None and count != info.tokens:
        raise GptError(f"{path}: holds {count} tokens but meta.json says {info.tokens}; "
                       "the dataset was modified, run `gpt prepare --overwrite`")
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
    recorded = info.max_id if info is not None else None
    if recorded is not None and recorded >= vocab_size:
        raise GptError(f"{path}: token id {recorded} is out of range for vocab_size {vocab_size} (meta.json); "
                       "run `gpt prepare --overwrite`")
    if count and (verify or recorded is None):
        found = int(tokens.max())
        if found >= vocab_size:
            raise GptError(f"{path}: token id {found} is out of range for vocab_size {vocab_size}")
        if recorded is not None and found != recorded:
            raise GptError(f"{path}: its largest token id is {found} but meta.json records {recorded}; "
                           "the dataset was modified, run `gpt prepare --overwrite`")
    return tokens


@dataclass
class Dataset:
    """A prepared data folder: its meta.json, tokenizer and memory-mapped splits."""

    folder: Path
    meta: DatasetMeta
    tokenizer: Tokenizer
    splits: dict[str, list[np.ndarray]]

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    def num_tokens(self, split: str) -> int:
        return sum(len(shard) for shard in self.splits.get(split, []))


def load_dataset(folder: str | Path, verify: bool = False) -> Dataset:
    """Open a dataset, checking meta.json against the tokenizer and every shard's header (and,
    with `verify`, every token: `gpt info DATA --verify`)."""
    folder = Path(folder)
    meta = DatasetMeta.read(folder)
    tokenizer = meta.tokenizer.build()
    if tokenizer.vocab_size != meta.vocab_size:
        raise GptError(f"{folder}/meta.json: vocab_size {meta.vocab_size} does not match its "
                       f"{tokenizer.name} tokenizer ({tokenizer.vocab_size})")
    splits = {}
    for name, info in meta.splits.items():
        shards = [read_shard(folder / s.file, meta.vocab_size, s, verify) for s in info.shards]
        if sum(len(s) for s in shards) != info.tokens:
            raise GptError(f"{folder}/meta.json: token count of split {name!r} does not match its shards")
        splits[name] = shards
    return Dataset(folder=folder, meta=meta, tokenizer=tokenizer, splits=splits)


class BatchSampler:
    """Random contiguous windows of block_size + 1 tokens from one split's shards.

    Only the windows are read from the memory-mapped shards, never a whole split. The numpy
    generator is the sampler's only state, so `state_dict()` and `load_state_dict()` reproduce
    the data order exactly. Under torchrun every rank seeds alike and draws the positions of
    the whole job's batch (batch_size x world_size rows), then reads only its own rows: the
    ranks' batches are disjoint and together equal the batch one process would draw."""

    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int, seed: int | list[int],
                 rank: int = 0, world_size: int = 1):
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
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
        which = self.rng.choice(len(self.shards), size=self.batch_size * self.world_size, p=self.shard_weights)
        windows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        first = self.rank * self.batch_size
        for row, shard_index in enumerate(which):
            shard = self.shards[shard_index]
            start = int(self.rng.integers(0, len(shard) - self.block_size))
            if first <= row < first + self.batch_size:
                windows[row - first] = shard[start:start + self.block_size + 1]
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


class Sampler(Protocol):
    """Draws training micro-batches (tuples of tensors: LM windows or task items) and can save
    and restore its position."""

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DeviceBatches:
    """The training step's micro-batches, drawn and moved to the device one step ahead: on
    CUDA through pinned memory with non-blocking copies, so the host prepares the next step
    while the GPU runs this one. Its state is the sampler's state before the batches it holds,
    so a checkpoint resumes at exactly the next step's data."""

    def __init__(self, sampler: Sampler, micro_batches: int, device: torch.device):
        self.sampler, self.micro_batches, self.device = sampler, micro_batches, device
        self.pin = device.type == "cuda"
        self.ahead: list[tuple[torch.Tensor, ...]] | None = None
        self.state_before_ahead = sampler.state_dict()

    def next(self) -> list[tuple[torch.Tensor, ...]]:
        batches = self.ahead if self.ahead is not None else self._draw()
        self.state_before_ahead = self.sampler.state_dict()
        self.ahead = self._draw()
        return batches

    def _draw(self) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(self._move(t) for t in self.sampler.next_batch()) for _ in range(self.micro_batches)]

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return self.state_before_ahead

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.state_before_ahead, self.ahead = self.sampler.state_dict(), None
