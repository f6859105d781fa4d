"""The on-disk formats, each with one owner: the token shard header (llm.c's), a dataset's
`meta.json`, and the layout of a run folder. Readers and writers elsewhere go through here.
"""

from __future__ import annotations

import json
import math
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
    # The largest token id in the shard, found once when it was written, so that opening a dataset
    # checks the id range from meta.json alone (None in datasets made before it was recorded).
    max_id: int | None = None


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
                         "shards": [{"file": sh.file, "tokens": sh.tokens, "max_id": sh.max_id} for sh in s.shards]}
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
            shards = [ShardInfo(file=_plain_name(s["file"], where), tokens=_count(s["tokens"]),
                                max_id=None if s.get("max_id") is None else _count(s["max_id"]))
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


# ----------------------------------------------------------------------------- state.json
# 1: no format_version field (before 2026-12-05): keys could be missing (convert wrote a few), and a
# run without val data could name its train loss best_val_loss.
STATE_FORMAT = 2


@dataclass
class RunState:
    """How far a run got: what a checkpoint's state.json records beside the weights. This class
    is its one reader and writer; an older state.json is patched forward (`_upgrade_state`)."""

    iter: int = 0
    tokens: int = 0  # accumulated step by step, so it stays right when a resume changes the batch
    best_loss: float = math.inf
    best_split: str = "val"  # the split best_loss was evaluated on: train when the data has no val split
    best_val_acc: float | None = None  # task runs: best/ keeps the highest val accuracy
    losses: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)  # task runs: per split and per class
    budget: dict[str, Any] | None = None  # a time budget's plan (gpt.training.budget.Budget.state_dict())
    world_size: int = 1  # processes that wrote the checkpoint
    converted_from: str | None = None  # `gpt convert` / `train.init_from hf:`: where the weights came from

    def to_json(self) -> dict[str, Any]:
        """state.json names the best loss for its split: best_val_loss, or best_train_loss."""
        best = self.best_loss if math.isfinite(self.best_loss) else None
        return {"format_version": STATE_FORMAT, "iter": self.iter, "tokens": self.tokens,
                f"best_{self.best_split}_loss": best, "best_val_acc": self.best_val_acc, "losses": dict(self.losses),
                "accuracy": dict(self.accuracy), "budget": self.budget, "world_size": self.world_size,
                "converted_from": self.converted_from}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> RunState:
        """Parse a state.json object (of this version or an older one); a bad one raises GptError."""
        version = raw.get("format_version", 1) if isinstance(raw, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise GptError(f"{where} is not a state.json object")
        if version > STATE_FORMAT:
            raise GptError(f"{where} has format_version {version}, newer than this gpt reads ({STATE_FORMAT}); "
                           "upgrade gpt")
        raw = _upgrade_state(raw, version)
        try:
            split = "train" if "best_train_loss" in raw else "val"
            best_loss, best_acc, budget = raw[f"best_{split}_loss"], raw["best_val_acc"], raw["budget"]
            if budget is not None and not isinstance(budget, dict):
                raise ValueError(f"not a budget: {budget!r}")
            return cls(iter=_count(raw["iter"]), tokens=_count(raw["tokens"]),
                       best_loss=math.inf if best_loss is None else _number(best_loss), best_split=split,
                       best_val_acc=None if best_acc is None else _number(best_acc),
                       losses=_numbers(raw["losses"]), accuracy=_numbers(raw["accuracy"]), budget=budget,
                       world_size=_count(raw["world_size"]),
                       converted_from=None if raw["converted_from"] is None else str(raw["converted_from"]))
        except (KeyError, TypeError, ValueError):
            raise GptError(f"{where} is missing fields or has wrong types") from None


def _upgrade_state(raw: dict[str, Any], version: int) -> dict[str, Any]:
    """Patch an older state.json forward one version at a time (as nanochat's checkpoint manager
    does), so an older checkpoint is read, not refused."""
    if version == 1:  # fields that came later or that a converted model lacked; budget_iters became budget
        defaults = {"tokens": 0, "best_val_acc": None, "losses": {}, "accuracy": {}, "budget": None, "world_size": 1,
                    "converted_from": None}
        raw = {**defaults, **{k: v for k, v in raw.items() if k != "budget_iters"}}
        if "best_train_loss" not in raw:
            raw.setdefault("best_val_loss", None)
    return raw


def _number(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def _numbers(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"not an object of numbers: {value!r}")
    return {str(k): _number(v) for k, v in value.items()}


# ----------------------------------------------------------------------------- run folder
CKPT_PATTERN = re.compile(r"^ckpt_(\d{6,})$")
BEST_PATTERN = re.compile(r"^best_(\d{6,})$")


@dataclass(frozen=True)
class RunFolder:
    """Where a training run keeps its files (train.out_dir), the one owner of their names:

        ckpt_000500/  model.safetensors, config.yaml, tokenizer.json (+ hf_tokenizer.json), state.json,
                      optimizer.pt (an FSDP run: optimizer/, its sharded optimizer state, instead)
        latest -> ckpt_000500        the newest complete checkpoint
        best -> best_000400/         lowest val loss: weights, config, tokenizer, state
        config.yaml                  the resolved config, written at start (each checkpoint has its own)
        metrics.csv, loss.png, tensorboard/, .lock

    Folders are written as `NAME.tmp` and renamed (`gpt.durable.replacing_folder`), so a name
    above exists only complete; an FSDP run's ranks stage the optimizer shards of checkpoint N
    in `.ckpt_N.optimizer` before it moves into the checkpoint.
    """

    root: Path

    # Files inside a checkpoint folder.
    WEIGHTS = "model.safetensors"
    CONFIG = "config.yaml"
    TOKENIZER = "tokenizer.json"  # our description of the tokenizer (TokenizerSpec.to_json)
    TOKENIZER_FILE = "hf_tokenizer.json"  # a bpe or hf tokenizer's Hugging Face tokenizer.json
    STATE = "state.json"
    TRAINING = "optimizer.pt"  # optimizer, scaler and per-rank sampler/RNG states
    OPTIMIZER_SHARDS = "optimizer"  # an FSDP run's optimizer state: a torch.distributed.checkpoint folder

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

    def best_folder(self, iteration: int) -> Path:
        return self.root / f"best_{iteration:06d}"

    def optimizer_staging(self, iteration: int) -> Path:
        return self.root / f".{self.checkpoint(iteration).name}.{self.OPTIMIZER_SHARDS}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (unfinished ones still end in .tmp)."""
        return self._numbered(CKPT_PATTERN)

    def best_folders(self) -> list[Path]:
        """Complete best_N folders, oldest first (normally one: `best` points at it)."""
        return self._numbered(BEST_PATTERN)

    def _numbered(self, pattern: re.Pattern) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and pattern.match(p.name)]
        return sorted(found, key=lambda p: int(pattern.match(p.name).group(1)))

    def run_files(self) -> list[Path]:
        """Everything a new run started with --overwrite removes."""
        return self.checkpoints() + self.best_folders() + [self.latest, self.best, self.metrics,
                                                           self.plot, self.tensorboard]

    def holds_run(self) -> bool:
        return any(p.exists() or p.is_symlink() for p in self.run_files())
