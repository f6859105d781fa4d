"""The task model: a GPT with GPT-1's linear head on the extract token's final state, and how a
split of task items is scored."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import Config
from gpt.model import GPT, evaluating
from gpt.supervised import IGNORE
from gpt.tasks.framing import Example, collate


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


@torch.no_grad()
def batch_logits(model: TaskModel, examples: list[Example], batch_size: int, text_vocab: int,
                 device: torch.device, autocast: Callable = contextlib.nullcontext
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) for consecutive batches of `examples`, with the model in eval mode."""
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            ids, _, extract, labels = (t.to(device) for t in collate(examples[start:start + batch_size], text_vocab))
            with autocast():
                logits = model.logits(ids, extract, labels.size(0))
            yield logits, labels


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
