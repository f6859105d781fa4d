"""`gpt eval`: what a model can do, measured the way the GPT-2 and GPT-3 papers measure it.

Language modelling: the mean loss over a whole split or text file (every token scored once, in
order), its perplexity, and bits per byte, which compares models with different tokenizers.
Windows of block_size tokens advance by `stride`; the first window scores all its tokens, later
ones only their last `stride`, so every scored token sees at least block_size - stride tokens
of context (or all of the text before it).

Multiple choice: each choice is scored by the log-probability of its tokens given the context,
zero-shot or after K solved examples of the task in the prompt (no gradient update). `acc`
picks the choice with the highest summed log-probability, `acc_norm` the highest per UTF-8
byte of the scored text (the choice and its joining space), so that long choices are not
penalised for their length (the conventions of lm-evaluation-harness).

Joining a choice to its context: the scored text is " " + choice, unless the context is empty,
ends in whitespace (say a newline) or the choice starts with whitespace; then it is the choice
itself. Context and choice are tokenized separately, so with GPT-2's BPE the choice keeps its
leading space in its first token, as in running text. End contexts without a trailing space.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt.data.shards import load_dataset
from gpt.data.tokenizer import Tokenizer, TokenizerSpec
from gpt.errors import GptError

FEWSHOT_SEPARATOR = "\n\n"  # between solved examples and before the question, as in the GPT-3 paper
Autocast = Callable[[], contextlib.AbstractContextManager]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=None, leave=False)


# ----------------------------------------------------------------------------- language modelling

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


def strided_windows(num_predictions: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, scored) for windows over input positions [start, end): each window predicts
    the token after every position and scores only the last `scored` predictions. Together the
    windows score predictions 0 .. num_predictions - 1 exactly once. Windows after the first end
    `stride` further on (the last one less) and start block_size before their end, so all are
    equally long and batch without padding."""
    end = min(block_size, num_predictions)
    windows = [(0, end, end)]
    while end < num_predictions:
        new_end = min(end + stride, num_predictions)
        windows.append((new_end - block_size, new_end, new_end - end))
        end = new_end
    return windows


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
def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, byte_lengths: np.ndarray, *,
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
    device, was_training = _device(model), model.training
    model.eval()
    result = LMResult(tokens=0, loss_sum=0.0, text_bytes=0)
    with _progress(math.ceil(len(windows) / batch_size), "eval") as bar:
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
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
    model.train(was_training)
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
    except GptError as exc:
        raise GptError(f"{path}: {exc}") from None
    return ids if tokenizer.eot is None else np.concatenate([[tokenizer.eot], ids])


def dataset_split_tokens(folder: str | Path, split: str, tokenizer: TokenizerSpec) -> np.ndarray:
    """All tokens of one split of a prepared dataset, in order (its shards are consecutive)."""
    dataset = load_dataset(folder)
    if dataset.meta.tokenizer != tokenizer:
        raise GptError(f"{folder} was prepared with the {dataset.tokenizer.name} tokenizer, not the checkpoint's "
                       f"{tokenizer.name} one; prepare the data with the checkpoint's tokenizer")
    if split not in dataset.splits:
        raise GptError(f"{folder} has no {split!r} split; choose one of {', '.join(dataset.splits)}")
    shards = dataset.splits[split]
    return np.concatenate(shards) if len(shards) > 1 else np.asarray(shards[0])


def evaluate_lm(model: torch.nn.Module, spec: TokenizerSpec, data: str | Path, *, split: str = "val",
                stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                autocast: Autocast = contextlib.nullcontext) -> LMResult:
    """`gpt eval --data`: a dataset folder's split or a text file, the first max_tokens + 1 tokens."""
    tokenizer = spec.build()
    if Path(data).is_dir():
        tokens = dataset_split_tokens(data, split, spec)
    else:
        tokens = text_file_tokens(data, tokenizer)
    if max_tokens is not None:
        if max_tokens < 1:
            raise GptError(f"--max-tokens must be at least 1, got {max_tokens}")
        tokens = tokens[:max_tokens + 1]
    return evaluate_tokens(model, tokens, token_byte_lengths(tokenizer), stride=stride,
                           batch_size=batch_size, autocast=autocast)


# ----------------------------------------------------------------------------- multiple choice

@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int
    line: int  # 1-based line number in its file, for messages

    @property
    def answer(self) -> str:
        return self.choices[self.label]


def _parse_item(raw: bytes, where: str, line: int) -> ChoiceItem:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GptError(f"{where}: not a JSON object; fix or remove the line") from None
    if not isinstance(record, dict):
        raise GptError(f"{where}: not a JSON object; expected {{\"context\", \"choices\", \"label\"}}")
    missing = [key for key in ("context", "choices", "label") if key not in record]
    if missing:
        raise GptError(f"{where}: missing key {', '.join(map(repr, missing))}; "
                       "each line needs \"context\", \"choices\" and \"label\"")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise GptError(f"{where}: \"context\" must be a string")
    if not isinstance(choices, list) or not choices:
        raise GptError(f"{where}: \"choices\" must be a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise GptError(f"{where}: every choice must be a non-empty string")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise GptError(f"{where}: \"label\" must be an index into the {len(choices)} choices (0 to "
                       f"{len(choices) - 1}), got {label!r}")
    return ChoiceItem(context=context, choices=tuple(choices), label=label, line=line)


def read_task(path: str | Path) -> list[ChoiceItem]:
    """Items of a multiple-choice JSONL file: {"context": str, "choices": [str, ...], "label": int}
    a line; blank lines are skipped. A malformed line raises one message naming its number."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise GptError(f"cannot read task file {path} ({exc.strerror}); give a .jsonl file") from None
    items = [_parse_item(raw, f"{path} line {number}", number)
             for number, raw in enumerate(lines, start=1) if raw.strip()]
    if not items:
        raise GptError(f"task file {path} has no items; add lines of {{\"context\", \"choices\", \"label\"}}")
    return items


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


def _encode(tokenizer: Tokenizer, text: str, where: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except GptError as exc:
        raise GptError(f"{where}: {exc}") from None


def _read_encodable_task(path: str | Path, tokenizer: Tokenizer) -> list[ChoiceItem]:
    """The items of a task file, each checked to be encodable on its own: a character the
    tokenizer lacks is reported at its own line, not at that of an item whose few-shot prompt
    happens to include it."""
    items = read_task(path)
    for item in items:
        _encode(tokenizer, item.context + "".join(item.choices), f"{path} line {item.line}")
    return items


def choice_requests(item: ChoiceItem, prompt: str, tokenizer: Tokenizer, block_size: int, where: str
                    ) -> list[tuple[list[int], int]]:
    """For each choice: the token ids of prompt + continuation, cropped from the left to
    block_size + 1, and how many of the last ones are the continuation's."""
    context_ids = _encode(tokenizer, prompt, where)
    if not context_ids:
        if tokenizer.eot is None:
            raise GptError(f"{where}: the context is empty and the {tokenizer.name} tokenizer has no "
                           "end-of-text token to start from; give a context")
        context_ids = [tokenizer.eot]
    requests = []
    for choice in item.choices:
        choice_ids = _encode(tokenizer, continuation(prompt, choice), where)
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
    device, was_training = _device(model), model.training
    model.eval()
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results = [0.0] * len(requests)
    with _progress(math.ceil(len(order) / batch_size), desc) as bar:
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
    model.train(was_training)
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
    per_item = [choice_requests(item, prompt, tokenizer, block_size, f"{path} line {item.line}")
                for item, prompt in zip(items, prompts)]
    requests = [request for item_requests in per_item for request in item_requests]
    logprobs = iter(continuation_logprobs(model, requests, batch_size=batch_size, autocast=autocast,
                                          desc=Path(path).stem))
    # choice_requests keeps the last block_size + 1 tokens: shorter than prompt + choice means cropped
    # (an empty prompt is one end-of-text token there).
    prompt_tokens = [max(1, len(_encode(tokenizer, prompt, ""))) for prompt in prompts]
    cropped = sum(any(len(ids) < length + n for ids, n in item_requests)
                  for item_requests, length in zip(per_item, prompt_tokens))
    result = TaskResult(name=Path(path).stem, shots=shots, cropped=cropped)
    for item, prompt in zip(items, prompts):
        result.scores.append(ItemScore(
            line=item.line, label=item.label, logprobs=[next(logprobs) for _ in item.choices],
            text_bytes=[len(continuation(prompt, c).encode("utf-8")) for c in item.choices]))
    return result


# ----------------------------------------------------------------------------- output

def results_table(lm: tuple[str, LMResult] | None, tasks: list[TaskResult]) -> str:
    """A plain-text table: one row for the language-modelling data, one per task."""
    lines = []
    if lm is not None:
        name, result = lm
        bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "-"
        lines += [f"{'data':<32} {'tokens':>10} {'loss':>8} {'ppl':>9} {'bpb':>8}",
                  f"{name[-32:]:<32} {result.tokens:>10,} {result.loss:>8.4f} {result.perplexity:>9.3f} {bpb:>8}"]
    if tasks:
        if lines:
            lines.append("")
        lines.append(f"{'task':<32} {'items':>6} {'shots':>5} {'acc':>7} {'acc_norm':>8} {'chance':>7}")
        lines += [f"{t.name[-32:]:<32} {len(t.scores):>6} {t.shots:>5} {t.acc:>7.4f} {t.acc_norm:>8.4f} "
                  f"{t.chance:>7.4f}" for t in tasks]
    return "\n".join(lines)


def write_details(path: str | Path, tasks: list[TaskResult]) -> None:
    """Per-item scores as JSONL, written to a temporary name and renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for task in tasks:
                for score in task.scores:
                    f.write(json.dumps({"task": task.name, "shots": task.shots, **score.to_json()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GptError(f"cannot write --details {path} ({exc.strerror}); choose another path") from None
