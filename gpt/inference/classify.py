"""`gpt classify`: label items with a fine-tuned GPT-1 task model (inference; the training side
is `gpt.tasks`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt.chat import ChatTemplate
from gpt.checkpoint import Checkpoint, load_weights, read_checkpoint
from gpt.data.tokenizer import Tokenizer
from gpt.errors import GptError
from gpt.model import GPT
from gpt.tasks.framing import NUM_SPECIAL, SpecialTokens, encode_items
from gpt.tasks.items import TaskItem, item_from_record, label_names
from gpt.tasks.model import TaskModel, accuracy, batch_logits, confusion_matrix, make_head

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
    if config.task.kind in (None, "chat"):
        what = "a chat model: talk to it with gpt chat" if config.task.kind else "a language model"
        raise GptError(f"{checkpoint.path} has no task head (it is {what}); fine-tune it for a task first "
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
    if task.kind == "chat":
        return ChatTemplate.of(checkpoint.config).describe()
    special = SpecialTokens.after(checkpoint.config.model.vocab_size - NUM_SPECIAL)
    labels = f"labels {', '.join(task.labels)}" if task.labels else "label: the index of the right choice"
    accuracy = ", ".join(f"{k} {100 * v:.1f}%" for k, v in checkpoint.state.accuracy.items())
    return (f"task: {task.kind}, {labels}; special tokens start={special.start} delim={special.delim} "
            f"extract={special.extract}; lm_weight {task.lm_weight}; accuracy: {accuracy or 'not evaluated yet'}")
