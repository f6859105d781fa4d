"""GPT-1's input transformation: task items -> token rows framed by start, delim and extract
(three special tokens after the tokenizer's vocabulary), cropped to the context, and batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpt.data.tokenizer import Tokenizer
from gpt.errors import GptError
from gpt.supervised import IGNORE, BucketSampler, encode_text
from gpt.tasks.items import TaskItem

NUM_SPECIAL = 3


@dataclass(frozen=True)
class SpecialTokens:
    """The ids of start, delim and extract: the three ids after the tokenizer's vocabulary."""

    start: int
    delim: int
    extract: int

    @classmethod
    def after(cls, vocab_size: int) -> SpecialTokens:
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)


@dataclass
class Example:
    """An item as the model reads it: token rows (start ... extract), the label's index (None
    when unlabelled), and whether a row had to be cropped to fit the context."""

    rows: list[list[int]]
    label: int | None
    cropped: bool


def crop(first: list[int], second: list[int], room: int) -> tuple[list[int], list[int]]:
    """Fit two token lists into `room` tokens. The first (text, premise, context) loses tokens
    from its start, so the end next to the second part stays; the second (hypothesis, choice)
    is kept whole where possible and otherwise keeps its start, at least half the room."""
    if len(first) + len(second) <= room:
        return first, second
    keep_second = min(len(second), max(room - len(first), room // 2))
    keep_first = room - keep_second
    return first[len(first) - keep_first:], second[:keep_second]


def frame(first: list[int], second: list[int] | None, special: SpecialTokens, block_size: int
          ) -> tuple[list[int], bool]:
    """One row of GPT-1's input transformation, cropped to `block_size` tokens; and whether it was."""
    if second is None:
        kept, _ = crop(first, [], block_size - 2)
        return [special.start, *kept, special.extract], len(kept) < len(first)
    kept_first, kept_second = crop(first, second, block_size - 3)
    row = [special.start, *kept_first, special.delim, *kept_second, special.extract]
    return row, len(kept_first) + len(kept_second) < len(first) + len(second)


def encode_items(items: list[TaskItem], names: list[str], tokenizer: Tokenizer, block_size: int,
                 labelled: bool = True) -> list[Example]:
    """Tokenize and frame every item; labels become indices into `names`."""
    if block_size < 2 + NUM_SPECIAL:
        raise GptError(f"model.block_size={block_size} leaves no room for task text; use a larger context")
    special = SpecialTokens.after(tokenizer.vocab_size)
    examples = []
    for item in items:
        encoded = {text: encode_text(tokenizer, text, item.where)
                   for pair in item.rows for text in pair if text is not None}
        framed = [frame(encoded[a], None if b is None else encoded[b], special, block_size) for a, b in item.rows]
        examples.append(Example(rows=[row for row, _ in framed], label=_label_index(item, names, labelled),
                                cropped=any(cropped for _, cropped in framed)))
    return examples


def _label_index(item: TaskItem, names: list[str], labelled: bool) -> int | None:
    if item.label is None:
        if labelled:
            raise GptError(f"{item.where}: missing key 'label'; every training and evaluation item needs one")
        return None
    if item.label not in names:
        raise GptError(f"{item.where}: unknown label {item.label!r}; the labels are {', '.join(names)} "
                       "(set task.labels to name them all)")
    return names.index(item.label)


# ----------------------------------------------------------------------------- batches

def collate(examples: list[Example], text_vocab: int) -> tuple[torch.Tensor, ...]:
    """A batch as tensors (ids, lm_targets, extract, labels).

    Item i owns rows i*k .. i*k+k-1, k being the most rows of any item here; a row an item does
    not have (fewer choices) has extract position -1. Rows are padded on the right, which a
    causal model never attends to, so padding changes no result. lm_targets holds each
    position's next token where that is text (below `text_vocab`), else -1 (special tokens,
    padding). Unlabelled items have label -1."""
    k = max(len(e.rows) for e in examples)
    length = max(len(row) for e in examples for row in e.rows)
    ids = np.zeros((len(examples) * k, length), dtype=np.int64)
    targets = np.full_like(ids, IGNORE)
    extract = np.full(len(examples) * k, IGNORE, dtype=np.int64)
    for i, example in enumerate(examples):
        for j, row in enumerate(example.rows):
            r, tokens = i * k + j, np.asarray(row, dtype=np.int64)
            ids[r, :len(row)] = tokens
            targets[r, :len(row) - 1] = np.where(tokens[1:] < text_vocab, tokens[1:], IGNORE)
            extract[r] = len(row) - 1
    labels = np.array([IGNORE if e.label is None else e.label for e in examples], dtype=np.int64)
    return tuple(torch.from_numpy(a) for a in (ids, targets, extract, labels))


def task_sampler(examples: list[Example], batch_size: int, text_vocab: int, seed: int | list[int],
                rank: int = 0, world_size: int = 1) -> BucketSampler[Example]:
    """Training batches of task items, bucketed by their longest row (see BucketSampler)."""
    return BucketSampler(examples, [max(len(row) for row in e.rows) for e in examples], batch_size,
                         lambda picked: collate(picked, text_vocab), seed, rank, world_size)
