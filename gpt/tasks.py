"""Task fine-tuning as in GPT-1 (Radford et al. 2018): one pretrained model adapted to
classification, entailment, similarity and multiple choice by changing its input, not its
architecture.

An item becomes one or more token rows framed by three special tokens appended after the
tokenizer's vocabulary (start, delim, extract; figure 1 of the paper):

    classify   start text extract
    entail     start premise delim hypothesis extract
    similar    start a delim b extract  and  start b delim a extract   (final states added)
    choice     start context delim choice_k extract, one row per choice (softmax over them)

A linear head reads the final hidden state at the extract token. Training minimises the
task's cross-entropy plus `lm_weight` times the language-modelling loss on the task text.
The training loop itself is `gpt.training.loop`'s; this module supplies the rows, batches, model,
evaluation and `gpt classify`.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.checkpoint import Checkpoint, load_weights, read_checkpoint
from gpt.config import Config
from gpt.data.tokenizer import Tokenizer
from gpt.errors import GptError
from gpt.model import GPT

# The keys of an item in a task file, besides "label".
FIELDS = {"classify": ("text",), "entail": ("premise", "hypothesis"), "similar": ("text_a", "text_b"),
          "choice": ("context", "choices")}
NUM_SPECIAL = 3
IGNORE = -1  # a target the language-modelling loss skips; an extract position of a missing row


@dataclass(frozen=True)
class SpecialTokens:
    """The ids of start, delim and extract: the three ids after the tokenizer's vocabulary."""

    start: int
    delim: int
    extract: int

    @classmethod
    def after(cls, vocab_size: int) -> SpecialTokens:
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)


# ----------------------------------------------------------------------------- task files

@dataclass
class TaskItem:
    """One item of a task file: the texts of its rows as (first, second) pairs, its label name
    (the right choice's index as text for multiple choice; None when unlabelled) and where it
    came from ("file:line") for messages."""

    rows: list[tuple[str, str | None]]
    label: str | None
    where: str


def item_from_record(record: Any, kind: str, where: str) -> TaskItem:
    """Check one JSON object of a task file and turn it into an item; a bad one raises GptError
    naming `where`."""
    expected = ", ".join(f'"{key}"' for key in (*FIELDS[kind], "label"))
    if not isinstance(record, dict):
        raise GptError(f"{where}: not a JSON object; a {kind} item is an object with keys {expected}")
    for key in FIELDS[kind]:
        if key not in record:
            raise GptError(f"{where}: missing key {key!r}; a {kind} item has keys {expected}")
    if kind == "choice" and not (isinstance(record["choices"], list) and len(record["choices"]) >= 2):
        raise GptError(f"{where}: \"choices\" must be a list of at least two texts")
    texts = [record["context"], *record["choices"]] if kind == "choice" else [record[k] for k in FIELDS[kind]]
    if not all(isinstance(text, str) and text.strip() for text in texts):
        raise GptError(f"{where}: empty or non-text field; every text of a {kind} item must be a non-empty string")
    return TaskItem(rows=_rows(kind, record), label=_label(record.get("label"), kind, len(texts) - 1, where),
                    where=where)


def _rows(kind: str, record: dict[str, Any]) -> list[tuple[str, str | None]]:
    if kind == "classify":
        return [(record["text"], None)]
    if kind == "entail":
        return [(record["premise"], record["hypothesis"])]
    if kind == "similar":
        a, b = record["text_a"], record["text_b"]
        return [(a, b), (b, a)]  # the paper's similarity has no order: both are read
    return [(record["context"], choice) for choice in record["choices"]]


def _label(value: Any, kind: str, choices: int, where: str) -> str | None:
    if value is None:
        return None
    if kind == "choice":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < choices:
            raise GptError(f"{where}: label {value!r} is not the index of one of the {choices} choices (0 to "
                           f"{choices - 1})")
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise GptError(f"{where}: label {value!r} must be a non-empty string or an integer")
    return str(value)


def read_task_file(path: str | Path, kind: str) -> list[TaskItem]:
    """The items of a JSONL task file (one object a line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise GptError(f"task file not found: {path}; give a JSONL file with one {kind} item a line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise GptError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise GptError(f"{path}:{number}: not valid JSON; write one JSON object a line") from None
        items.append(item_from_record(record, kind, f"{path}:{number}"))
    if not items:
        raise GptError(f"{path} holds no items; write one JSON object a line")
    return items


def label_names(items: list[TaskItem], kind: str, path: str | Path) -> list[str]:
    """Label names in the order the head's outputs take: the sorted labels of `items` (numbers
    in numeric order); for multiple choice the choice positions "0", "1", ..."""
    if kind == "choice":
        return [str(i) for i in range(max(len(item.rows) for item in items))]
    found = sorted({item.label for item in items if item.label is not None}, key=_natural_order)
    if len(found) < 2:
        raise GptError(f"{path} has {len(found)} distinct label(s); a task needs at least two (or set task.labels)")
    return found


def _natural_order(name: str) -> tuple:
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


# ----------------------------------------------------------------------------- input transformation

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
        encoded = {text: _encode(tokenizer, text, item.where)
                   for pair in item.rows for text in pair if text is not None}
        framed = [frame(encoded[a], None if b is None else encoded[b], special, block_size) for a, b in item.rows]
        examples.append(Example(rows=[row for row, _ in framed], label=_label_index(item, names, labelled),
                                cropped=any(cropped for _, cropped in framed)))
    return examples


def _encode(tokenizer: Tokenizer, text: str, where: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except GptError as exc:
        raise GptError(f"{where}: {exc}") from None


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


class TaskSampler:
    """Training batches of task items, in a new random order every epoch, items of similar
    length batched together. Its state is the generator's state at the start of the epoch
    plus the position in it, so a resumed run draws exactly the batches an uninterrupted one
    would."""

    WINDOW = 32  # batches whose items are sorted by length together

    def __init__(self, examples: list[Example], batch_size: int, text_vocab: int, seed: int | list[int]):
        self.examples, self.batch_size, self.text_vocab = examples, batch_size, text_vocab
        self.lengths = [max(len(row) for row in example.rows) for example in examples]
        self.rng = np.random.default_rng(seed)
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_state = self.rng.bit_generator.state
        self.order = self._by_length(self.rng.permutation(len(self.examples)).tolist())
        self.position = 0

    def _by_length(self, order: list[int]) -> list[int]:
        """`order` with each window of WINDOW batches sorted by length and cut into batches, in
        random order: a batch pads to its longest row, and random texts vary in length a lot
        (speeches of tiny Shakespeare: 70% of a random batch would be padding)."""
        size, result = self.batch_size, []
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
        for _ in range(self.batch_size):
            if self.position == len(self.order):
                self._start_epoch()
            picked.append(self.examples[self.order[self.position]])
            self.position += 1
        return collate(picked, self.text_vocab)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch_state, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["epoch"]
        self._start_epoch()
        self.position = int(state["position"])


# ----------------------------------------------------------------------------- model

class TaskHead(nn.Module):
    """Dropout and one linear layer on the final hidden state at each row's extract token.
    An item's rows combine as in GPT-1: similarity adds its two rows' states before the layer;
    multiple choice scores each row and the softmax runs over one item's choices."""

    def __init__(self, kind: str, n_embd: int, num_labels: int, dropout: float):
        super().__init__()
        self.kind = kind
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(n_embd, 1 if kind == "choice" else num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.02)  # as the model's own layers
        nn.init.zeros_(self.linear.bias)

    def forward(self, states: torch.Tensor, extract: torch.Tensor, items: int) -> torch.Tensor:
        """states (rows, T, C) and extract (rows,) -> float logits (items, labels or choices)."""
        rows = torch.arange(extract.size(0), device=extract.device)
        last = states[rows, extract.clamp(min=0)]
        last = last.view(items, -1, last.size(-1))  # (items, rows per item, C)
        if self.kind == "choice":
            scores = self.linear(self.dropout(last)).squeeze(-1).float()
            return scores.masked_fill(extract.view(items, -1) < 0, -math.inf)
        return self.linear(self.dropout(last.sum(dim=1))).float()


class TaskModel(nn.Module):
    """A GPT with a task head: what a task run trains (and DDP wraps, so both are synchronised)."""

    def __init__(self, gpt: GPT, head: TaskHead, lm_weight: float):
        super().__init__()
        self.gpt, self.head, self.lm_weight = gpt, head, lm_weight
        if lm_weight == 0 and not gpt.config.tie_embeddings:
            # Without the LM loss an untied output matrix gets no gradient; frozen, DDP does not wait for one.
            gpt.lm_head.weight.requires_grad_(False)

    def forward(self, ids: torch.Tensor, lm_targets: torch.Tensor, extract: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Task logits and the training loss: task cross-entropy + lm_weight x the mean
        next-token loss over the text (special tokens and padding excluded). With lm_weight 0
        the output matrix is not even applied, so the LM loss is not in the graph."""
        states = self.gpt.hidden_states(ids, None)
        logits = self.head(states, extract, labels.size(0))
        loss = F.cross_entropy(logits, labels)
        if self.lm_weight > 0:
            lm_logits = self.gpt.logits(states).float()
            lm_loss = F.cross_entropy(lm_logits.flatten(0, 1), lm_targets.flatten(), ignore_index=IGNORE)
            loss = loss + self.lm_weight * lm_loss
        return logits, loss

    def logits(self, ids: torch.Tensor, extract: torch.Tensor, items: int) -> torch.Tensor:
        """The task logits alone (evaluation, `gpt classify`)."""
        return self.head(self.gpt.hidden_states(ids, None), extract, items)


def make_head(config: Config) -> TaskHead:
    task = config.task
    return TaskHead(task.kind, config.model.n_embd, len(task.labels or []), task.head_dropout)


def with_special_rows(weights: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """A language model's weights with rows for the special tokens appended to its embedding
    (and to an untied output matrix; a tied one is the embedding), taken from `model`'s fresh
    N(0, 0.02) initialisation."""
    fresh = model.state_dict()
    grown = dict(weights)
    for name in ("wte.weight", "lm_head.weight"):
        if name in weights:
            grown[name] = torch.cat([weights[name], fresh[name][len(weights[name]):].to(weights[name].dtype)])
    return grown


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def batch_logits(model: TaskModel, examples: list[Example], batch_size: int, text_vocab: int,
                 device: torch.device, autocast: Callable = contextlib.nullcontext
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) for consecutive batches of `examples`, with the model in eval mode."""
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        ids, _, extract, labels = (t.to(device) for t in collate(examples[start:start + batch_size], text_vocab))
        with autocast():
            logits = model.logits(ids, extract, labels.size(0))
        yield logits, labels
    model.train(was_training)


def evaluate_split(model: TaskModel, examples: list[Example], names: list[str], split: str, batch_size: int,
                   text_vocab: int, device: torch.device, autocast: Callable) -> tuple[float, dict[str, float]]:
    """Mean task loss and accuracy ({split: overall, "split/LABEL": per class}) over `examples`."""
    total, predicted, labels = 0.0, [], []
    by_length = sorted(examples, key=lambda example: max(map(len, example.rows)))  # less padding, same results
    for logits, batch_labels in batch_logits(model, by_length, batch_size, text_vocab, device, autocast):
        total += F.cross_entropy(logits, batch_labels, reduction="sum").item()
        predicted.append(logits.argmax(dim=-1).cpu())
        labels.append(batch_labels.cpu())
    return total / len(examples), accuracy(torch.cat(predicted), torch.cat(labels), names, split)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor, names: list[str], prefix: str) -> dict[str, float]:
    """Share of right predictions overall ({prefix: ...}) and for each label present ("prefix/LABEL")."""
    result = {prefix: (predicted == labels).float().mean().item()}
    for index, name in enumerate(names):
        of_class = labels == index
        if of_class.any():
            result[f"{prefix}/{name}"] = (predicted[of_class] == index).float().mean().item()
    return result


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """counts[true, predicted]."""
    return torch.bincount(labels * num_labels + predicted, minlength=num_labels ** 2).view(num_labels, num_labels)


# ----------------------------------------------------------------------------- classify

# The `gpt classify` options that give one item, for each kind of model.
ITEM_OPTIONS = {"classify": ("text",), "entail": ("premise", "hypothesis"), "similar": ("text_a", "text_b"),
                "choice": ("context", "choice")}


def item_from_options(kind: str, options: dict[str, Any]) -> TaskItem:
    """The item given as `gpt classify` options, which must be the ones a `kind` model reads."""
    wanted = ITEM_OPTIONS[kind]
    given = {name for name, value in options.items() if value}
    flags = " and ".join(_flag(name) for name in wanted) + " (twice or more)" * (kind == "choice")
    empty = [name for name in wanted if options[name] == ""]
    if empty:
        raise GptError(f"{_flag(empty[0])} is empty; give it some text")
    unread = sorted(given - set(wanted))
    if unread:
        raise GptError(f"this model was fine-tuned for {kind} and does not read {_flag(unread[0])}: give {flags}, "
                       "or --file")
    if given != set(wanted):
        raise GptError(f"this model was fine-tuned for {kind}: give {flags}, or --file")
    record = {"context": options["context"], "choices": list(options["choice"])} if kind == "choice" \
        else {name: options[name] for name in wanted}
    return item_from_record(record, kind, "the command line")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


@dataclass
class Classified:
    """What `gpt classify` found: per item the label names and their probabilities; for
    labelled items also the accuracy and the confusion matrix."""

    names: list[str]
    probs: list[torch.Tensor]
    labels: torch.Tensor | None
    cropped: int

    @property
    def predicted(self) -> torch.Tensor:
        return torch.stack([p.argmax() for p in self.probs])

    def item_json(self, i: int) -> dict[str, Any]:
        probs = self.probs[i].tolist()
        return {"label": self.names[int(self.probs[i].argmax())],
                "probs": {name: round(p, 6) for name, p in zip(self.names, probs)}}

    def summary_json(self) -> dict[str, Any]:
        found = accuracy(self.predicted, self.labels, self.names, "all")
        per_class = {name: found[f"all/{name}"] for name in self.names if f"all/{name}" in found}
        matrix = confusion_matrix(self.predicted, self.labels, len(self.names))
        return {"items": len(self.labels), "accuracy": found["all"], "per_class": per_class, "labels": self.names,
                "confusion": matrix.tolist()}


def format_item(result: dict[str, Any]) -> str:
    """The label, then every label's probability, most likely first."""
    ranked = sorted(result["probs"].items(), key=lambda pair: -pair[1])
    width = max(len(name) for name, _ in ranked)
    return "\n".join([result["label"], *(f"  {name:<{width}}  {p:.4f}" for name, p in ranked)])


def format_summary(summary: dict[str, Any]) -> str:
    """Accuracy, accuracy per class and the confusion matrix (rows: true label, columns: predicted)."""
    names, matrix = summary["labels"], summary["confusion"]
    right = sum(matrix[i][i] for i in range(len(names)))
    width = max(len(name) for name in names) + len(str(len(names))) + 1
    cell = max(5, len(str(max(max(row) for row in matrix))) + 1)
    lines = [f"accuracy {summary['accuracy']:.4f} ({right}/{summary['items']})", "per class:"]
    lines += [f"  {name:<{width}}  {acc:.4f}" for name, acc in summary["per_class"].items()]
    lines += ["confusion matrix (rows: true label, columns: predicted label):",
              " " * (width + 2) + "".join(f"{j:>{cell}}" for j in range(len(names)))]
    lines += [f"{f'{i} {name}':<{width + 2}}" + "".join(f"{count:>{cell}}" for count in row)
              for i, (name, row) in enumerate(zip(names, matrix))]
    return "\n".join(lines)


@dataclass
class Classifier:
    """A fine-tuned task checkpoint ready to label items (`gpt classify`)."""

    model: TaskModel
    tokenizer: Tokenizer
    checkpoint: Checkpoint

    @property
    def kind(self) -> str:
        return self.checkpoint.config.task.kind

    def classify(self, items: list[TaskItem], batch_size: int = 32) -> Classified:
        """Probabilities of each item's labels (or choices); labelled items are scored too.
        Items are labelled all or none."""
        unlabelled = [item for item in items if item.label is None]
        if unlabelled and len(unlabelled) < len(items):
            raise GptError(f"{unlabelled[0].where}: missing key 'label'; label every item or none")
        names = label_names(items, "choice", "") if self.kind == "choice" else self.checkpoint.config.task.labels
        examples = encode_items(items, names, self.tokenizer, self.model.gpt.config.block_size, not unlabelled)
        device = next(self.model.parameters()).device
        batches = batch_logits(self.model, examples, batch_size, self.tokenizer.vocab_size, device)
        probs = [row for logits, _ in batches for row in torch.softmax(logits, dim=-1)]
        if self.kind == "choice":  # an item's missing choices have probability 0: leave them out
            probs = [row[:len(example.rows)] for row, example in zip(probs, examples)]
        labels = None if unlabelled else torch.tensor([example.label for example in examples])
        return Classified(names=names, probs=probs, labels=labels, cropped=sum(e.cropped for e in examples))


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A task run's latest (or a given) checkpoint with its head; a language model's gets a clear error."""
    checkpoint = read_checkpoint(path)
    config = checkpoint.config
    if config.task.kind is None:
        raise GptError(f"{checkpoint.path} has no task head (it is a language model); fine-tune it for a task first "
                       "with a task: section, e.g. configs/finetune_speaker.yaml")
    tokenizer = checkpoint.tokenizer
    if config.model.vocab_size != tokenizer.vocab_size + NUM_SPECIAL:
        raise GptError(f"{checkpoint.path}: model.vocab_size {config.model.vocab_size} is not the tokenizer's "
                       f"{tokenizer.vocab_size} plus {NUM_SPECIAL} special tokens; the checkpoint is corrupt")
    with torch.device("meta"):
        gpt, head = GPT(config.model), make_head(config)
    load_weights(gpt, checkpoint.path, head)
    return Classifier(model=TaskModel(gpt, head, lm_weight=0.0).to(device).eval(), tokenizer=tokenizer,
                      checkpoint=checkpoint)


def describe_task(checkpoint: Checkpoint) -> str | None:
    """What `gpt info` says about a task checkpoint (None for a language model)."""
    task = checkpoint.config.task
    if task.kind is None:
        return None
    special = SpecialTokens.after(checkpoint.config.model.vocab_size - NUM_SPECIAL)
    labels = f"labels {', '.join(task.labels)}" if task.labels else "label: the index of the right choice"
    accuracy = {k: round(v, 4) for k, v in (checkpoint.state.get("accuracy") or {}).items()}
    return (f"task: {task.kind}, {labels}; special tokens start={special.start} delim={special.delim} "
            f"extract={special.extract}; lm_weight {task.lm_weight}; accuracy: {accuracy}")
