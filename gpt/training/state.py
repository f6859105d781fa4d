"""A run's state between steps and across a resume: its progress as the loop keeps it
(`TrainState`: state.json's fields, with the best evaluation so far) and the random generators a
resume restores (`RNGState`). A checkpoint holds each `Resumable`'s state dict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import torch

from gpt.data.formats import RunState
from gpt.training.metrics import Evaluation


class Resumable(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainState(RunState):
    """A run's progress (state.json's fields, `gpt.data.formats.RunState`) as the loop updates it."""

    @classmethod
    def of(cls, state: RunState) -> TrainState:
        return cls(**dataclasses.asdict(state))

    def record(self, evaluation: Evaluation) -> bool:
        """Keep an evaluation's results; True when it is the best so far: the highest val
        accuracy of a task run, else the lowest val loss (train when there is no val split)."""
        self.losses, self.accuracy = evaluation.losses, evaluation.accuracy
        acc = self.accuracy.get("val", self.accuracy.get("train"))  # a task's; chat's exact match is not it
        if acc is not None:
            if self.best_val_acc is not None and acc <= self.best_val_acc:
                return False
            self.best_val_acc = acc
            return True
        split = "val" if "val" in self.losses else "train"
        score = self.losses.get(split)
        if score is None or not math.isfinite(score) or score >= self.best_loss:  # a diverged run is no best
            return False
        self.best_loss, self.best_split = score, split
        return True


class RNGState:
    """torch's CPU generator and, on CUDA, this process's device generator (per rank, since
    each rank seeds its own dropout)."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)
