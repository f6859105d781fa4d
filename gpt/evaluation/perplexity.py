"""`gpt eval --data`: how well a model predicts text, measured as the GPT-2 paper does.

The mean loss over a whole split or text file (every token scored once, in order), its
perplexity, and bits per byte, which compares models with different tokenizers. Windows of
block_size tokens advance by `stride`; the first window scores all its tokens, later ones only
their last `stride`, so every scored token sees at least block_size - stride tokens of context
(or all of the text before it). A dataset split is read window by window from its memory-mapped
shards, so memory stays constant whatever the size of the split.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt.data.shards import load_dataset
from gpt.data.tokenizer import Tokenizer, TokenizerSpec, UnknownCharacter
from gpt.errors import GptError
from gpt.model import evaluating

Autocast = Callable[[], contextlib.AbstractContextManager]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=None, leave=False)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of every token id; 0 for end-of-text, which separates documents and is not
    text. All our tokenizers decode a sequence to the concatenation of its tokens' bytes, so
    the bytes of any token sequence are the sum of this table over it."""
    lengths = np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    if tokenizer.eot is not None:
        lengths[tokenizer.eot] = 0
    return lengths


def count_text_bytes(tokenizer: Tokenizer, tokens: np.ndarray) -> int:
    """UTF-8 bytes of the text that `tokens` stand for, end-of-text separators excluded."""
    return int(token_byte_lengths(tokenizer)[np.asarray(tokens, dtype=np.int64)].sum())


def bits_per_byte(mean_loss: float, tokens: int, text_bytes: int) -> float:
    """Mean loss in nats per token -> bits per UTF-8 byte of the text those tokens encode."""
    return mean_loss * tokens / math.log(2) / text_bytes


def strided_windows(num_predictions: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, scored) for windows over input positions [start, end): each window predicts
    the token after every position and scores only the last `scored` predictions. Together the
    windows score predictions 0 .. num_predictions - 1 exactly once. Windows after the first end
    `stride` further on (the last one less) and start block_size before their end, so all are
    equally long and batch without padding. Made one at a time: a large split has millions."""
    end = min(block_size, num_predictions)
    yield 0, end, end
    while end < num_predictions:
        new_end = min(end + stride, num_predictions)
        yield new_end - block_size, new_end, new_end - end
        end = new_end


def count_windows(num_predictions: int, block_size: int, stride: int) -> int:
    return 1 + math.ceil(max(0, num_predictions - block_size) / stride)


def _batches(windows: Iterator[tuple[int, int, int]], size: int) -> Iterator[list[tuple[int, int, int]]]:
    batch = []
    for window in windows:
        batch.append(window)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ConcatenatedShards:
    """The memory-mapped shards of a split read as one sequence of tokens (they are consecutive),
    its first `length` tokens: a slice copies only the tokens it covers, so scoring a split holds
    one batch of windows in memory whatever the split's size."""

    def __init__(self, shards: Sequence[np.ndarray], length: int | None = None):
        self.shards = shards
        self.starts = np.cumsum([0, *(len(shard) for shard in shards)])
        self.length = int(self.starts[-1]) if length is None else min(length, int(self.starts[-1]))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.length)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            offset = start - int(self.starts[shard])
            take = min(stop, int(self.starts[shard + 1])) - start
            parts.append(np.asarray(self.shards[shard][offset:offset + take]))
            start, shard = start + take, shard + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class LMResult:
    """Loss over `tokens` scored tokens that encode `text_bytes` bytes of text."""

    tokens: int
    loss_sum: float
    text_bytes: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        return bits_per_byte(self.loss, self.tokens, self.text_bytes) if self.text_bytes else None

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "bytes": self.text_bytes, "loss": self.loss,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


@torch.no_grad()
def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray | ConcatenatedShards, byte_lengths: np.ndarray, *,
                    stride: int | None = None, batch_size: int = 8,
                    autocast: Autocast = contextlib.nullcontext) -> LMResult:
    """Loss of `model` predicting each of tokens[1:] from the tokens before it (strided windows
    of the model's block_size; stride defaults to half of it)."""
    block_size = model.config.block_size
    if stride is None:
        stride = max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise GptError(f"--stride must be between 1 and the model's block_size ({block_size}), got {stride}")
    if len(tokens) < 2:
        raise GptError("the text has fewer than 2 tokens, nothing to predict; evaluate a longer text")
    windows = strided_windows(len(tokens) - 1, block_size, stride)
    device = model_device(model)
    result = LMResult(tokens=0, loss_sum=0.0, text_bytes=0)
    batches = math.ceil(count_windows(len(tokens) - 1, block_size, stride) / batch_size)
    with evaluating(model), progress(batches, "eval") as bar:
        for batch in _batches(windows, batch_size):
            rows = np.stack([tokens[start:end + 1] for start, end, _ in batch]).astype(np.int64)
            width = rows.shape[1] - 1
            scored = np.arange(width) >= width - np.array([n for _, _, n in batch])[:, None]
            result.tokens += int(scored.sum())
            result.text_bytes += int(byte_lengths[rows[:, 1:][scored]].sum())
            rows, scored = torch.from_numpy(rows).to(device), torch.from_numpy(scored).to(device)
            with autocast():
                logits = model(rows[:, :-1])[0]
            result.loss_sum += F.cross_entropy(logits[scored].float(), rows[:, 1:][scored], reduction="sum").item()
            bar.update(1)
    return result


def text_file_tokens(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """A text file as one document: end-of-text (when the tokenizer has one, as at the start of
    every document in prepared data) then the text, so that every token of the text is scored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
        raise GptError(f"cannot read {path} ({reason}); give a UTF-8 text file or a dataset folder") from None
    try:
        ids = tokenizer.encode_array(text)
    except UnknownCharacter as exc:
        raise GptError(f"{path}: {exc.problem}; remove it from {path}, or evaluate a model whose data had it") \
            from None
    return ids if tokenizer.eot is None else np.concatenate([[tokenizer.eot], ids])


def dataset_split_tokens(folder: str | Path, split: str, tokenizer: TokenizerSpec) -> ConcatenatedShards:
    """All tokens of one split of a prepared dataset, in order, read as they are needed."""
    dataset = load_dataset(folder)
    if dataset.meta.tokenizer != tokenizer:
        fix = ("evaluate the data the checkpoint was trained on, or give the text file itself (--data FILE), which "
               "is read with the checkpoint's characters" if tokenizer.name == "char" == dataset.meta.tokenizer.name
               else "prepare the data with the checkpoint's tokenizer")
        raise GptError(f"{folder} does not fit the checkpoint: "
                       f"{dataset.meta.tokenizer.difference(tokenizer, 'the data', 'the checkpoint')}; {fix}")
    if split not in dataset.splits:
        raise GptError(f"{folder} has no {split!r} split; choose one of {', '.join(dataset.splits)}")
    return ConcatenatedShards(dataset.splits[split])


def evaluate_lm(model: torch.nn.Module, spec: TokenizerSpec, data: str | Path, *, split: str = "val",
                stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                autocast: Autocast = contextlib.nullcontext) -> LMResult:
    """`gpt eval --data`: a dataset folder's split or a text file, the first max_tokens + 1 tokens."""
    tokenizer = spec.build()
    if max_tokens is not None and max_tokens < 1:
        raise GptError(f"--max-tokens must be at least 1, got {max_tokens}")
    length = None if max_tokens is None else max_tokens + 1
    if Path(data).is_dir():
        tokens = dataset_split_tokens(data, split, spec)
        tokens = ConcatenatedShards(tokens.shards, length)
    else:
        tokens = text_file_tokens(data, tokenizer)[:length]
    return evaluate_tokens(model, tokens, token_byte_lengths(tokenizer), stride=stride,
                           batch_size=batch_size, autocast=autocast)
