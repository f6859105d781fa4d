"""`train.max_minutes`: turn a wall-clock budget into a number of optimizer steps.

The rule. The budget counts from the start of training (after start-up: imports, data, model).
Steps 1 to `UNTIMED` are not timed (the first one compiles or warms up allocators); steps
`UNTIMED + 1` to `DECIDE_AT` are, and their mean is the cost of a step, provided they took at
least `TIMED_SHARE` of the budget. If they took less (a small model's steps are short, and they
get faster over the first hundred or so), the run times the next window instead, twice as many
steps, and so on until a window is long enough: the cost is then the mean of a window of
warmed-up steps. Right after the deciding step the run times a forward pass of its last micro-
batch without gradients (what one evaluation batch costs) and multiplies it by the batches an
evaluation reads, and times the serialisation of a checkpoint's contents in memory (the disk
write itself is not timed: for the models a budget is meant for it is the smaller part). It
then fixes `max_iters` to the largest number of steps whose training, evaluations (every
`eval_interval` and at the end) and checkpoints (every `ckpt_interval` and at the end) fit in
`SAFETY` of the time left. `max_iters` from the config stays an upper bound: whichever of the
two is reached first ends the run. With `lr_decay_iters: null` the cosine schedule follows the
new `max_iters`.

The number is decided once: it goes into state.json (`budget_iters`) and the saved config, and
`--resume` continues to it without measuring again, so a resumed run follows the same schedule
bit for bit (a checkpoint written before the decision has no number yet: resuming it measures
again). Steps before the decision follow the schedule of the config's `max_iters`; during the
warmup (100 steps by default) that is the same schedule. It is an estimate: a host that slows
down later (other jobs) ends late.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any, Callable

import torch

from gpt.config import Config

UNTIMED = 2          # steps before timing starts
DECIDE_AT = 10       # steps (after the run's start or resume) after which max_iters is fixed, at the earliest
TIMED_SHARE = 0.02   # the timed window must last at least this share of the budget
SAFETY = 0.95   # share of the time left that is planned for: room for noise, logging and plots

clock: Callable[[], float] = time.perf_counter  # tests replace it with a fake clock


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds taken by one optimizer step, one evaluation and one checkpoint."""

    step: float
    eval: float
    ckpt: float


def _events(start: int, end: int, interval: int) -> int:
    """How many of the steps start+1..end trigger a periodic event, plus the final one at `end`."""
    return end // interval - start // interval + (1 if end % interval else 0)


def cost_of(start: int, end: int, costs: Costs, eval_interval: int, ckpt_interval: int) -> float:
    """Seconds to go from step `start` to step `end`, evaluations and checkpoints included."""
    return ((end - start) * costs.step + _events(start, end, eval_interval) * costs.eval
            + _events(start, end, ckpt_interval) * costs.ckpt)


def iters_within(seconds: float, start: int, limit: int, costs: Costs, eval_interval: int, ckpt_interval: int) -> int:
    """The largest max_iters in (start, limit] whose remaining steps cost at most `seconds`; at
    least start + 1, so that the run ends with its final evaluation and checkpoint."""
    low, high = start + 1, max(start + 1, limit)
    while low < high:  # cost_of grows with `end`: binary search
        mid = (low + high + 1) // 2
        if cost_of(start, mid, costs, eval_interval, ckpt_interval) <= seconds:
            low = mid
        else:
            high = mid - 1
    return low


def with_max_iters(config: Config, iters: int) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, max_iters=iters))


def resumed_config(config: Config, state: dict[str, Any]) -> Config:
    """A resumed run keeps the number of steps its budget chose (state.json's `budget_iters`)."""
    chosen = state.get("budget_iters")
    if config.train.max_minutes is None or chosen is None:
        return config
    return with_max_iters(config, min(config.train.max_iters, int(chosen)))


class Budget:
    """Times the first steps of a run, then decides its max_iters (see the module docstring)."""

    def __init__(self, minutes: float, start_iter: int):
        self.seconds = 60.0 * minutes
        self.start_iter = start_iter
        self.started = clock()
        self.check_at = start_iter + DECIDE_AT
        self.timed_from = self.timed_until = 0.0
        self.timed_from_iter = start_iter + UNTIMED

    def due(self, it: int, agree: Callable[[bool], bool] = bool) -> bool:
        """Call after every step `it`; True once, when it is time to decide. Under several
        processes `agree` makes every rank give the same answer (their clocks differ), so that
        all of them decide, and meet in the decision's collectives, at the same step."""
        if it == self.start_iter + UNTIMED:
            self.timed_from = clock()
        if it != self.check_at:
            return False
        self.timed_until = clock()
        if agree(self.timed_until - self.timed_from >= TIMED_SHARE * self.seconds):
            return True
        # Too short to trust: time the next window, twice as many steps, from here.
        self.timed_from, self.timed_from_iter = self.timed_until, it
        self.check_at = self.start_iter + 2 * (it - self.start_iter)
        return False

    def measure(self, it: int, eval_forward: Callable[[], Any], eval_batches: int,
                checkpoint: dict[str, Any]) -> Costs:
        """Costs measured at step `it`: the timed steps, one evaluation batch (run twice: the
        first may compile) and the serialisation of `checkpoint` (the state dicts a checkpoint saves)."""
        step = (self.timed_until - self.timed_from) / (it - self.timed_from_iter)
        eval_forward()
        before = clock()
        eval_forward()
        eval_batch = clock() - before
        before = clock()
        torch.save(checkpoint, io.BytesIO())
        return Costs(step=step, eval=eval_batch * eval_batches, ckpt=clock() - before)

    def decide(self, it: int, limit: int, costs: Costs, eval_interval: int, ckpt_interval: int) -> int:
        left = SAFETY * self.seconds - (clock() - self.started)
        return iters_within(left, it, limit, costs, eval_interval, ckpt_interval)


def timed_forward(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], autocast: Callable) -> Callable[[], Any]:
    """A function running `model` on `batch` as an evaluation does (eval mode, no gradients)."""

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        with autocast():
            output = model(*batch)[1]
        if output.device.type != "cpu":
            output.item()  # wait for the device, or the clock reads only the launch
        model.train()

    return forward


def describe(minutes: float, iters: int, limit: int, costs: Costs) -> str:
    """The one line a run prints when its budget has decided."""
    bound = f" (train.max_iters={limit} was the smaller)" if iters == limit else ""
    return (f"budget {minutes:g} min: max_iters={iters}{bound}; measured {1000 * costs.step:.1f} ms/step, "
            f"{costs.eval:.1f} s/eval, {costs.ckpt:.2f} s/checkpoint")
