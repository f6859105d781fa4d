"""Task files: JSONL, one item a line (DESIGN.md "Task and evaluation files"). One reader per
kind of item, with one rule set and `file:line` messages; multiple-choice files serve both task
fine-tuning (`task.kind: choice`) and `gpt eval --task`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.errors import GptError
from gpt.supervised import read_jsonl

# The keys of an item in a task file, besides "label".
FIELDS = {"classify": ("text",), "entail": ("premise", "hypothesis"), "similar": ("text_a", "text_b"),
          "choice": ("context", "choices")}


@dataclass
class TaskItem:
    """One item of a task file: the texts of its rows as (first, second) pairs, its label name
    (the right choice's index as text for multiple choice; None when unlabelled) and where it
    came from ("file:line") for messages."""

    rows: list[tuple[str, str | None]]
    label: str | None
    where: str


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item: the context, two or more choices, the right one's index (None
    when unlabelled) and where it came from ("file:line")."""

    context: str
    choices: tuple[str, ...]
    label: int | None
    line: int = 0   # in its file, for `gpt eval --details`
    where: str = ""  # "file:line", for messages

    @property
    def answer(self) -> str:
        return self.choices[self.label]


def _check_keys(record: Any, kind: str, where: str) -> None:
    expected = ", ".join(f'"{key}"' for key in (*FIELDS[kind], "label"))
    if not isinstance(record, dict):
        raise GptError(f"{where}: not a JSON object; a {kind} item is an object with keys {expected}")
    for key in FIELDS[kind]:
        if key not in record:
            raise GptError(f"{where}: missing key {key!r}; a {kind} item has keys {expected}")


def choice_item(record: Any, where: str, line: int = 0) -> ChoiceItem:
    """The one rule set of multiple-choice items: a string context (it may be empty: the choices
    are then scored from the end-of-text token), a list of at least two non-empty choices (with
    one, accuracy would be 1 by construction), and an optional label indexing them."""
    _check_keys(record, "choice", where)
    context, choices = record["context"], record["choices"]
    if not isinstance(context, str):
        raise GptError(f"{where}: \"context\" must be a string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise GptError(f"{where}: \"choices\" must be a list of at least two texts")
    if not all(isinstance(choice, str) and choice.strip() for choice in choices):
        raise GptError(f"{where}: every choice must be a non-empty string")
    label = record.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices)):
        raise GptError(f"{where}: label {label!r} is not the index of one of the {len(choices)} choices (0 to "
                       f"{len(choices) - 1})")
    return ChoiceItem(context=context, choices=tuple(choices), label=label, line=line, where=where)


def read_choice_file(path: str | Path) -> list[ChoiceItem]:
    """The labelled items of a multiple-choice file, as `gpt eval --task` scores them."""
    items = [choice_item(record, f"{path}:{line}", line) for record, line in read_jsonl(path, "multiple-choice items")]
    unlabelled = next((item for item in items if item.label is None), None)
    if unlabelled is not None:
        raise GptError(f"{unlabelled.where}: missing key 'label'; each item needs the index of its right choice")
    return items


def item_from_record(record: Any, kind: str, where: str) -> TaskItem:
    """Check one JSON object of a task file and turn it into an item; a bad one raises GptError
    naming `where`."""
    if kind == "choice":
        item = choice_item(record, where)
        return TaskItem(rows=[(item.context, choice) for choice in item.choices],
                        label=None if item.label is None else str(item.label), where=where)
    _check_keys(record, kind, where)
    texts = [record[key] for key in FIELDS[kind]]
    if not all(isinstance(text, str) and text.strip() for text in texts):
        raise GptError(f"{where}: empty or non-text field; every text of a {kind} item must be a non-empty string")
    if kind == "classify":
        rows = [(record["text"], None)]
    elif kind == "entail":
        rows = [(record["premise"], record["hypothesis"])]
    else:
        a, b = record["text_a"], record["text_b"]
        rows = [(a, b), (b, a)]  # the paper's similarity has no order: both are read
    return TaskItem(rows=rows, label=_label(record.get("label"), where), where=where)


def _label(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise GptError(f"{where}: label {value!r} must be a non-empty string or an integer")
    return str(value)


def read_task_file(path: str | Path, kind: str) -> list[TaskItem]:
    """The items of a JSONL task file (one object a line, blank lines skipped)."""
    return [item_from_record(record, kind, f"{path}:{line}") for record, line in read_jsonl(path, f"{kind} items")]


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
