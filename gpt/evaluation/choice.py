"""`gpt eval --task`: multiple-choice accuracy, zero- or few-shot, as the GPT-3 paper measures it.

Each choice is scored by the log-probability of its tokens given the context, zero-shot or after
K solved examples of the task in the prompt (no gradient update). `acc` picks the choice with
the highest summed log-probability, `acc_norm` the highest per UTF-8 byte of the scored text
(the choice and its joining space), so that long choices are not penalised for their length
(the conventions of lm-evaluation-harness). Task files are read by `gpt.tasks.items`, the one
reader of multiple-choice files (task fine-tuning reads them too).

Joining a choice to its context: the scored text is " " + choice, unless the context is empty,
ends in whitespace (say a newline) or the choice starts with whitespace; then it is the choice
itself. Context and choice are tokenized separately, so with GPT-2's BPE the choice keeps its
leading space in its first token, as in running text. End contexts without a trailing space.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gpt.data.tokenizer import Tokenizer
from gpt.durable import replace_atomically
from gpt.errors import GptError
from gpt.evaluation.perplexity import Autocast, model_device, progress
from gpt.model import evaluating
from gpt.supervised import encode_text
from gpt.tasks.items import ChoiceItem, read_choice_file

if TYPE_CHECKING:
    from gpt.evaluation.chat import ChatResult

FEWSHOT_SEPARATOR = "\n\n"  # between solved examples and before the question, as in the GPT-3 paper


def continuation(context: str, choice: str) -> str:
    """The text scored for `choice` after `context` (the joining rule in the module docstring)."""
    if not context or context[-1].isspace() or choice[:1].isspace():
        return choice
    return " " + choice


def few_shot_examples(item: ChoiceItem, pool: list[ChoiceItem], shots: int, seed: int, index: int
                      ) -> list[ChoiceItem]:
    """`shots` examples for the item at `index`, drawn from `pool` without the item itself (nor a
    copy of it). The draw depends only on the seed and the index: the same for the same seed."""
    if shots == 0:
        return []
    order = np.random.default_rng([seed, index]).permutation(len(pool))
    examples = []
    for i in order:
        if (pool[i].context, pool[i].choices) != (item.context, item.choices):
            examples.append(pool[i])
            if len(examples) == shots:
                return examples
    raise GptError(f"--shots {shots} needs {shots} examples other than each item, but only {len(examples)} are "
                   "available; lower --shots or give a larger --fewshot-file")


def few_shot_prompt(item: ChoiceItem, examples: list[ChoiceItem]) -> str:
    """Solved examples (context + correct choice), each followed by a blank line, then the context."""
    solved = "".join(ex.context + continuation(ex.context, ex.answer) + FEWSHOT_SEPARATOR for ex in examples)
    return solved + item.context


@dataclass
class ItemScore:
    line: int
    label: int
    logprobs: list[float]   # summed log-probability of each choice's tokens
    text_bytes: list[int]   # UTF-8 bytes of each scored continuation

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.logprobs))

    @property
    def prediction_norm(self) -> int:
        return int(np.argmax(np.array(self.logprobs) / np.array(self.text_bytes)))

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "label": self.label, "logprobs": self.logprobs, "bytes": self.text_bytes,
                "pred": self.prediction, "pred_norm": self.prediction_norm}


@dataclass
class TaskResult:
    name: str
    shots: int
    scores: list[ItemScore] = field(default_factory=list)
    cropped: int = 0  # items whose prompt lost tokens at its start to fit the context

    @property
    def acc(self) -> float:
        return float(np.mean([s.prediction == s.label for s in self.scores]))

    @property
    def acc_norm(self) -> float:
        return float(np.mean([s.prediction_norm == s.label for s in self.scores]))

    @property
    def chance(self) -> float:
        return float(np.mean([1 / len(s.logprobs) for s in self.scores]))

    def to_json(self) -> dict[str, Any]:
        return {"task": self.name, "items": len(self.scores), "shots": self.shots, "acc": self.acc,
                "acc_norm": self.acc_norm, "chance": self.chance, "cropped": self.cropped}

    def details(self) -> list[dict[str, Any]]:
        """One object per item for `--details`: its choices' scores and the predictions."""
        return [{"task": self.name, "shots": self.shots, **score.to_json()} for score in self.scores]


def _read_encodable_task(path: str | Path, tokenizer: Tokenizer) -> list[ChoiceItem]:
    """The items of a task file, each checked to be encodable on its own: a character the
    tokenizer lacks is reported at its own line, not at that of an item whose few-shot prompt
    happens to include it."""
    items = read_choice_file(path)
    for item in items:
        encode_text(tokenizer, item.context + "".join(item.choices), item.where)
    return items


def choice_requests(item: ChoiceItem, prompt: str, tokenizer: Tokenizer, block_size: int, where: str
                    ) -> list[tuple[list[int], int]]:
    """For each choice: the token ids of prompt + continuation, cropped from the left to
    block_size + 1, and how many of the last ones are the continuation's."""
    context_ids = encode_text(tokenizer, prompt, where)
    if not context_ids:
        if tokenizer.eot is None:
            raise GptError(f"{where}: the context is empty and the {tokenizer.name} tokenizer has no "
                           "end-of-text token to start from; give a context")
        context_ids = [tokenizer.eot]
    requests = []
    for choice in item.choices:
        choice_ids = encode_text(tokenizer, continuation(prompt, choice), where)
        if len(choice_ids) > block_size:
            raise GptError(f"{where}: a choice of {len(choice_ids)} tokens does not fit the model's context "
                           f"(block_size={block_size}); shorten it")
        requests.append(((context_ids + choice_ids)[-(block_size + 1):], len(choice_ids)))
    return requests


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, requests: list[tuple[list[int], int]], *, batch_size: int = 16,
                          autocast: Autocast = contextlib.nullcontext, desc: str = "score") -> list[float]:
    """Summed log-probability of the last `n` tokens of each sequence given the ones before.
    Sequences are batched longest first and padded on the right, which a causal model never
    attends to, so padding changes no score."""
    device = model_device(model)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results = [0.0] * len(requests)
    with evaluating(model), progress(math.ceil(len(order) / batch_size), desc) as bar:
        for first in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[first:first + batch_size]]
            width = len(batch[0][0]) - 1
            x = torch.zeros(len(batch), width, dtype=torch.long)
            y = torch.zeros(len(batch), width, dtype=torch.long)
            scored = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, (ids, n) in enumerate(batch):
                x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
                y[row, :len(ids) - 1] = torch.tensor(ids[1:])
                scored[row, len(ids) - 1 - n:len(ids) - 1] = True
            x, y, scored = x.to(device), y.to(device), scored.to(device)
            with autocast():
                logits = model(x)[0]
            # Unembed-sized work only for the scored positions (a 50k vocabulary is large).
            token_logprobs = torch.log_softmax(logits[scored].float(), dim=-1).gather(-1, y[scored][:, None])[:, 0]
            rows = torch.arange(len(batch), device=device)[:, None].expand_as(scored)[scored]
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
            sums.index_add_(0, rows, token_logprobs.double())
            for i, total in zip(order[first:first + batch_size], sums.tolist()):
                results[i] = total
            bar.update(1)
    return results


def evaluate_task(model: torch.nn.Module, tokenizer: Tokenizer, path: str | Path, *, shots: int = 0,
                  seed: int = 1337, fewshot_path: str | Path | None = None, batch_size: int = 16,
                  autocast: Autocast = contextlib.nullcontext) -> TaskResult:
    """`gpt eval --task`: accuracy of the model on one multiple-choice file, K-shot."""
    if shots < 0:
        raise GptError(f"--shots must be 0 or more, got {shots}")
    items = _read_encodable_task(path, tokenizer)
    pool = _read_encodable_task(fewshot_path, tokenizer) if fewshot_path is not None else items
    prompts = [few_shot_prompt(item, few_shot_examples(item, pool, shots, seed, index))
               for index, item in enumerate(items)]
    block_size = model.config.block_size
    per_item = [choice_requests(item, prompt, tokenizer, block_size, item.where)
                for item, prompt in zip(items, prompts)]
    requests = [request for item_requests in per_item for request in item_requests]
    logprobs = iter(continuation_logprobs(model, requests, batch_size=batch_size, autocast=autocast,
                                          desc=Path(path).stem))
    # choice_requests keeps the last block_size + 1 tokens: shorter than prompt + choice means cropped
    # (an empty prompt is one end-of-text token there).
    prompt_tokens = [max(1, len(encode_text(tokenizer, prompt, ""))) for prompt in prompts]
    cropped = sum(any(len(ids) < length + n for ids, n in item_requests)
                  for item_requests, length in zip(per_item, prompt_tokens))
    result = TaskResult(name=Path(path).stem, shots=shots, cropped=cropped)
    for item, prompt in zip(items, prompts):
        result.scores.append(ItemScore(
            line=item.line, label=item.label, logprobs=[next(logprobs) for _ in item.choices],
            text_bytes=[len(continuation(prompt, c).encode("utf-8")) for c in item.choices]))
    return result


def write_details(path: str | Path, results: list[TaskResult | ChatResult]) -> None:
    """Per-item results of every task and chat file as JSONL, written atomically (never a
    half-written file)."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for result in results for row in result.details()]
    try:
        replace_atomically(Path(path), "".join(lines))
    except OSError as exc:
        raise GptError(f"cannot write --details {path} ({exc.strerror}); choose another path") from None
