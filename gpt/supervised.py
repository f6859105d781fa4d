"""What supervised fine-tuning shares, for GPT-1 tasks (`gpt.tasks`) and chat (`gpt.chat`):

- special tokens appended after a tokenizer's vocabulary, and their rows added to a pretrained
  embedding (`with_appended_rows`);
- JSONL files of items, one object a line, whose mistakes are reported as `file:line`
  (`read_jsonl`); text inside an item is always encoded as plain text (`encode_text`), so a
  user who writes a special token's name gets those characters, never the token;
- training batches drawn in a new order every epoch, items of similar length together so that
  padding stays small, with a state that resumes exactly (`BucketSampler`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

import numpy as np
import torch

from gpt.data.tokenizer import Tokenizer, UnknownCharacter
from gpt.errors import GptError
from gpt.model import GPT

IGNORE = -1  # a target the loss skips (prompt, special tokens, padding); an extract position of a missing row

Example = TypeVar("Example")


def with_appended_rows(weights: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """A language model's weights with rows for tokens appended after its vocabulary added to
    its embedding (and to an untied output matrix; a tied one is the embedding), taken from
    `model`'s fresh N(0, 0.02) initialisation."""
    fresh = model.state_dict()
    grown = dict(weights)
    for name in ("wte.weight", "lm_head.weight"):
        if name in weights:
            grown[name] = torch.cat([weights[name], fresh[name][len(weights[name]):].to(weights[name].dtype)])
    return grown


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[Any, int]]:
    """(record, line number) for each non-blank line of a JSONL file of `what` (e.g. "choice
    items", naming the file's expected content in messages). Callers name an item's mistakes
    "file:line"."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise GptError(f"cannot read task file {path} ({exc.strerror or exc}); give a JSONL file of {what}") from None
    except UnicodeDecodeError:
        raise GptError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    found = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise GptError(f"{path}:{number}: not valid JSON; write one JSON object a line") from None
        found = True
        yield record, number
    if not found:
        raise GptError(f"{path} holds none of the {what}; write one JSON object a line")


def encode_text(tokenizer: Tokenizer, text: str, where: str) -> list[int]:
    """The ids of `text` as plain text; a character the tokenizer lacks is reported at `where`."""
    try:
        return tokenizer.encode(text)
    except UnknownCharacter as exc:
        raise GptError(f"{where}: {exc.problem}; remove it from that item, or use a model whose data had it") \
            from None


class BucketSampler(Generic[Example]):
    """Training batches of items in a new random order every epoch, items of similar length
    batched together. Its state is the generator's state at the start of the epoch plus the
    position in it, so a resumed run draws exactly the batches an uninterrupted one would.

    Under torchrun every rank draws the same order (one seed) and keeps its own `batch_size`
    items of each job batch of `batch_size x world_size`, so that N processes read each item
    once an epoch, as one process with an N times larger batch would."""

    WINDOW = 32  # job batches whose items are sorted by length together

    def __init__(self, examples: list[Example], lengths: list[int], batch_size: int,
                 collate: Callable[[list[Example]], tuple[torch.Tensor, ...]], seed: int | list[int],
                 rank: int = 0, world_size: int = 1):
        self.examples, self.lengths, self.collate = examples, lengths, collate
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.rng = np.random.default_rng(seed)
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_state = self.rng.bit_generator.state
        self.order = self._by_length(self.rng.permutation(len(self.examples)).tolist())
        self.position = 0

    def _by_length(self, order: list[int]) -> list[int]:
        """`order` with each window of WINDOW job batches sorted by length and cut into batches,
        in random order: a batch pads to its longest row, and random texts vary in length a lot
        (speeches of tiny Shakespeare: 70% of a random batch would be padding)."""
        size, result = self.batch_size * self.world_size, []
        for start in range(0, len(order), size * self.WINDOW):
            window = sorted(order[start:start + size * self.WINDOW], key=self.lengths.__getitem__)
            batches = [window[i:i + size] for i in range(0, len(window), size)]
            short = batches.pop() if len(batches[-1]) < size else []  # stays last: later batches keep their bounds
            for i in self.rng.permutation(len(batches)):
                result += batches[i]
            result += short
        return result

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        picked = []
        for _ in range(self.batch_size * self.world_size):
            if self.position == len(self.order):
                self._start_epoch()
            picked.append(self.examples[self.order[self.position]])
            self.position += 1
        return self.collate(picked[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch_state, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["epoch"]
        self._start_epoch()
        self.position = int(state["position"])

    def padding_share(self) -> float:
        """The share of padding in this epoch's batches (each pads to its longest item): printed
        at the start of a run, as a check that bucketing works."""
        size = self.batch_size * self.world_size
        batches = [[self.lengths[i] for i in self.order[s:s + size]] for s in range(0, len(self.order), size)]
        padded = sum(max(batch) * len(batch) for batch in batches)
        return 1 - sum(map(sum, batches)) / padded
