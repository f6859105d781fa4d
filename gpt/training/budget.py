"""`train.max_minutes`: spend a wall-clock budget on as many optimizer steps as fit, on whatever host
the run is on, and end the learning-rate schedule at `min_lr` on the last of them.

The first plan. The budget counts from the first step (start-up, imports, data and model, is outside
it). Steps 1 to `UNTIMED` are not timed (the first one compiles or warms up allocators); steps
`UNTIMED + 1` to `DECIDE_AT` are, and their mean is the cost of a step, provided they took at least
`TIMED_SHARE` of the budget. If they took less (a small model's steps are short), the run times the
next window instead, twice as many steps, and so on until a window is long enough. It then times a
forward pass of its last micro-batch without gradients (what one evaluation batch costs) times the
batches an evaluation reads, and the serialisation of a checkpoint's contents in memory, and plans
the largest number of steps whose training, evaluations (every `eval_interval` and at the end) and
checkpoints (every `ckpt_interval` and at the end) end by `TARGET` of the budget. `train.max_iters`
does not apply: a budget says how long.

Re-planning. Step times drift (a CPU with native bf16 gets ~20% faster over its first minutes, a GPU
once it has compiled, a shared host when its neighbours come and go), so after every `REPLAN_SHARE`
of the planned steps the run plans again from the time left: a step costs what the steps since the
last `WINDOW` re-plans cost (evaluations and checkpoints left out), an evaluation and a checkpoint
what the last one of each took. The last re-plan is at most `REPLAN_SHARE` of the run before its end.

The schedule. The cosine decay goes by progress, from 0 after the warmup to 1 on the last planned
step, which so runs at `min_lr` exactly. Until the first plan the decay has not started (the peak
LR). A plan made at step n keeps the progress step n had and spreads what is left evenly over its
remaining steps: through drift the LR stays continuous and never rises. One exception: when the
progress is more than `LEAD` ahead of the share of the decay's steps done under the new plan, the
plan it followed came from wrong costs (a first window slowed by a neighbour: 900 ms/step against
25 once it left, and a decay nearly over after a tenth of the run), so the progress goes back to
`LEAD` ahead of that share and the LR rises once, to where a right first plan would have about had
it. (With `train.lr_decay_iters` set the decay has that fixed length instead.) A budget too short
for the warmup ends in it.

Resuming. The plan, the progress it starts from, the costs and the budget spent go into state.json
(`budget`), and the plan into the saved config's max_iters. `--resume` continues with what is left of
the budget (of a new `train.max_minutes`, if one is given), re-planning as before but never
measuring the evaluation and checkpoint costs again: given the same step times it takes the same
decisions as an uninterrupted run, and its schedule is the same bit for bit. What a resumed run does
not charge: its start-up, and the steps after the last checkpoint that the interrupted run lost
(it trains them again).

Several processes: decisions happen at steps every rank knows (from the shared plan), and there
every rank takes rank 0's, so that all stop at the same step and meet in the same collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import time
from typing import Any, Callable, Iterator

import torch

from gpt.config import Config, TrainConfig
from gpt.data.formats import RunState
from gpt.model import evaluating

UNTIMED = 2          # steps before timing starts
DECIDE_AT = 10       # steps (after the run's start or resume) after which the first plan is made, at the earliest
TIMED_SHARE = 0.02   # the first timed window must last at least this share of the budget
TARGET = 0.98        # share of the budget the plan ends at: room for noise on either side
REPLAN_SHARE = 0.02  # plan again after every this share of the planned steps
WINDOW = 3           # a step costs what the steps of the last this many re-planning intervals cost
LEAD = 0.1           # how far the decay's progress may be ahead of the share of its planned steps done

clock: Callable[[], float] = time.perf_counter  # tests replace it with a simulated clock


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


def iters_within(seconds: float, start: int, costs: Costs, eval_interval: int, ckpt_interval: int) -> int:
    """The last step of the longest run from step `start` whose remaining steps cost at most `seconds`;
    at least start + 1, so that the run ends with its final evaluation and checkpoint."""
    low = start + 1
    high = max(low, start + int(seconds / max(costs.step, 1e-9)))  # steps alone would already fill the time
    while low < high:  # cost_of grows with `end`: binary search
        mid = (low + high + 1) // 2
        if cost_of(start, mid, costs, eval_interval, ckpt_interval) <= seconds:
            low = mid
        else:
            high = mid - 1
    return low


def with_max_iters(config: Config, iters: int) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, max_iters=iters))


def resumed_config(config: Config, state: RunState) -> Config:
    """A resumed budgeted run shows the plan of its checkpoint as train.max_iters (state.json's `budget`)."""
    plan = (state.budget or {}).get("plan")
    if config.train.max_minutes is None or plan is None:
        return config
    return with_max_iters(config, int(plan))


def _same(obj: Any) -> Any:
    return obj


def _nothing() -> None:
    return None


class Budget:
    """The plan of a budgeted run: when it ends and how far its LR decay is at each step (see the
    module docstring). `share` gives every rank rank 0's copy of an object; `sync` waits for the
    device, so that the clock reads the work done, not the work queued."""

    def __init__(self, train: TrainConfig, start_iter: int, saved: dict[str, Any] | None = None,
                 share: Callable[[Any], Any] = _same, sync: Callable[[], None] = _nothing):
        self.seconds = 60.0 * train.max_minutes
        self.warmup_iters, self.eval_interval, self.ckpt_interval = (
            train.warmup_iters, train.eval_interval, train.ckpt_interval)
        self.share, self.sync = share, sync
        saved = saved or {}
        self.spent_before: float = saved.get("spent", 0.0)  # budget used by the run before this process
        self.paused: float = saved.get("paused", 0.0)       # of all that is spent: evaluations, checkpoints, measuring
        self.plan: int | None = saved.get("plan")
        anchor = saved.get("anchor") or (max(start_iter, train.warmup_iters), 0.0)
        self.anchor: tuple[int, float] = (int(anchor[0]), float(anchor[1]))  # (step, its decay progress)
        self.costs = Costs(**saved["costs"]) if saved.get("costs") else None
        self.marks: list[tuple[int, float]] = [(int(i), float(s)) for i, s in saved.get("marks", [])]
        self.check_at: int = saved["check_at"] if self.plan is not None else start_iter + DECIDE_AT
        self.start_iter = start_iter
        self.timed_from, self.timed_from_iter = 0.0, start_iter + UNTIMED  # the first plan's window
        self.started = clock()

    @property
    def end(self) -> float:
        """The step the run ends at: the plan's last one, or infinity before there is a plan."""
        return math.inf if self.plan is None else self.plan

    def elapsed(self) -> float:
        return self.spent_before + clock() - self.started

    def training_seconds(self) -> float:
        return self.elapsed() - self.paused

    def progress(self, it: int) -> float:
        """How far step `it` (0-based) is through the LR decay: 0 until the warmup ends (and until
        the first plan), 1 on the plan's last step."""
        at, progress = self.anchor
        if self.plan is None or it <= at:
            return progress
        if it >= self.plan - 1:
            return 1.0
        return 1.0 - (1.0 - progress) * (self.plan - 1 - it) / (self.plan - 1 - at)

    def after_step(self, it: int, measure: Callable[[], tuple[float, float]]) -> bool:
        """Call after each step `it` (steps done), before its evaluation and checkpoint; True when
        the plan changed. `measure` returns the seconds an evaluation and a checkpoint take; it is
        called once, for the first plan."""
        if self.plan is None:
            return self._first_plan(it, measure)
        if it < self.check_at or it >= self.plan:
            return False
        self.sync()
        now = self.training_seconds()
        self.marks = [*self.marks, (it, now)][-(WINDOW + 1):]
        since, then = self.marks[0]
        return self._replan(it, dataclasses.replace(self.costs, step=(now - then) / (it - since)))

    def _first_plan(self, it: int, measure: Callable[[], tuple[float, float]]) -> bool:
        if it == self.start_iter + UNTIMED:
            self.sync()
            self.timed_from = self.training_seconds()
        if it != self.check_at:
            return False
        self.sync()
        now = self.training_seconds()
        if not self.share(now - self.timed_from >= TIMED_SHARE * self.seconds):
            # Too short to trust: time the next window, twice as many steps, from here.
            self.timed_from, self.timed_from_iter = now, it
            self.check_at = self.start_iter + 2 * (it - self.start_iter)
            return False
        step = (now - self.timed_from) / (it - self.timed_from_iter)
        self.marks = [(it, now)]
        with self.pausing():
            eval_s, ckpt_s = measure()
        return self._replan(it, Costs(step=step, eval=eval_s, ckpt=ckpt_s))

    def _replan(self, it: int, costs: Costs) -> bool:
        """Plan the steps after `it` from the time left; every rank takes rank 0's plan."""
        self.costs = costs
        due_now = (it % self.eval_interval == 0) * costs.eval + (it % self.ckpt_interval == 0) * costs.ckpt
        left = TARGET * self.seconds - self.elapsed() - due_now  # step `it`'s own evaluation and checkpoint are to come
        plan = iters_within(left, it, costs, self.eval_interval, self.ckpt_interval)
        at = max(it, self.warmup_iters)
        chosen = self.share({"plan": plan, "anchor": (at, self._progress_under(plan, at)),
                             "check_at": it + max(1, math.ceil(REPLAN_SHARE * plan))})
        changed = chosen["plan"] != self.plan
        self.plan, self.anchor, self.check_at = chosen["plan"], chosen["anchor"], chosen["check_at"]
        return changed

    def _progress_under(self, plan: int, at: int) -> float:
        """The decay's progress at step `at` as a new plan of `plan` steps takes it over: what it was,
        unless that is more than `LEAD` ahead of the share of the plan's decay steps done (see above)."""
        progress, decay_steps = self.progress(at), plan - 1 - self.warmup_iters
        if decay_steps <= 0:
            return progress
        return min(progress, (at - self.warmup_iters) / decay_steps + LEAD)

    @contextlib.contextmanager
    def pausing(self, kind: str | None = None) -> Iterator[None]:
        """Time an evaluation (`kind` "eval"), a checkpoint ("ckpt") or the measuring (None): not
        training time; the next plan expects each evaluation and checkpoint to cost what the last took."""
        before = clock()
        yield
        seconds = clock() - before
        self.paused += seconds
        if kind is not None and self.costs is not None:
            self.costs = dataclasses.replace(self.costs, **{kind: seconds})

    def state_dict(self) -> dict[str, Any]:
        """What state.json keeps (`budget`), for --resume to go on with the same plan."""
        return {"spent": self.elapsed(), "paused": self.paused, "plan": self.plan, "anchor": list(self.anchor),
                "check_at": self.check_at, "costs": dataclasses.asdict(self.costs) if self.costs else None,
                "marks": [list(mark) for mark in self.marks]}

    def describe(self) -> str:
        """The line a run prints when its first plan is made."""
        c = self.costs
        return (f"budget {self.seconds / 60:g} min: max_iters={self.plan} for now (planned again as the step time "
                f"changes; train.max_iters does not apply); measured {1000 * c.step:.1f} ms/step, "
                f"{c.eval:.1f} s/eval, {c.ckpt:.2f} s/checkpoint")

    def summary(self, it: int) -> str:
        """The line a run prints at its end: where its last step ended in the budget."""
        spent = self.elapsed()
        return (f"budget {self.seconds / 60:g} min: the last step (iter {it}) ended at {spent / 60:.2f} min, "
                f"{100 * spent / self.seconds:.1f}% of the budget; last measured {1000 * self.costs.step:.1f} ms/step")


def measure_events(eval_forward: Callable[[], Any], eval_batches: int, checkpoint: dict[str, Any]
                   ) -> tuple[float, float]:
    """Seconds an evaluation and a checkpoint take: one evaluation batch (run twice: the first may
    compile) times the batches an evaluation reads, and the serialisation of `checkpoint` (the state
    dicts a checkpoint saves) in memory; the disk write is not timed: for the models a budget is
    meant for it is the smaller part, and the first real checkpoint corrects the estimate."""
    eval_forward()
    before = clock()
    eval_forward()
    eval_batch = clock() - before
    before = clock()
    torch.save(checkpoint, io.BytesIO())
    return eval_batch * eval_batches, clock() - before


def timed_forward(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], autocast: Callable) -> Callable[[], Any]:
    """A function running `model` on `batch` as an evaluation does (eval mode, no gradients)."""

    @torch.no_grad()
    def forward() -> None:
        with evaluating(model), autocast():
            output = model(*batch)[1]
        if output.device.type != "cpu":
            output.item()  # wait for the device, or the clock reads only the launch

    return forward
