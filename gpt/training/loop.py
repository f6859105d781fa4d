"""`gpt train`: AdamW, warmup + cosine LR, gradient accumulation, AMP, eval, checkpoints, signals.

One loop serves pretraining, fine-tuning (`train.init_from`), task fine-tuning (a `task:`
section) and resuming (`--resume`). What differs between language modelling and a task is an
`Objective` (`gpt.training.objectives`): the module trained around the GPT, the micro-batches it reads
and the evaluation.
Resuming is exact: weights, optimizer, the data sampler's RNG and torch's RNG are restored,
so on CPU the losses after a resume equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import torch

from gpt.config import Config, TrainConfig, describe_changes, dump_yaml
from gpt.device import peak_flops, pick_device, training_matmul_shapes
from gpt.durable import replace_atomically
from gpt.errors import GptError
from gpt.training import budget as budgeting
from gpt.training import distributed
from gpt.training.metrics import MetricsLog, Mfu, Progress
from gpt.training.optim import set_lr
from gpt.training.state import TrainState
from gpt.training.trainer import Trainer, build_trainer, diverged

# ----------------------------------------------------------------------------- optimisation

def lr_at(it: int, lr: float, min_lr: float, warmup_iters: int, progress: float) -> float:
    """Learning rate for step `it` (0-based): linear warmup to `lr` over `warmup_iters` steps, then a
    cosine from `lr` at decay `progress` 0 to `min_lr` at 1."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def decay_progress(it: int, warmup_iters: int, decay_iters: int) -> float:
    """How far step `it` is through a decay of fixed length: from 0 after the warmup to 1 at `decay_iters`."""
    if it >= decay_iters:
        return 1.0
    return (it - warmup_iters) / max(1, decay_iters - warmup_iters)


def scheduled_lr(it: int, tc: TrainConfig, budget: budgeting.Budget | None) -> float:
    """Step `it`'s learning rate. A time budget plans the run's length, so it sets the decay's progress
    (unless train.lr_decay_iters fixes the decay's length)."""
    follows_plan = budget is not None and tc.lr_decay_iters is None
    progress = budget.progress(it) if follows_plan else decay_progress(it, tc.warmup_iters, tc.decay_iters)
    return lr_at(it, tc.lr, tc.min_lr, tc.warmup_iters, progress)


def schedule_note(tc: TrainConfig) -> str | None:
    """What the schedule becomes when the run ends before its warmup does: allowed (short
    trials and tests stop early on purpose), but said, since the rate then never decays."""
    if tc.warmup_iters < tc.max_iters:
        return None
    last = tc.max_iters - 1
    top = lr_at(last, 1.0, 0.0, tc.warmup_iters, decay_progress(last, tc.warmup_iters, tc.decay_iters))
    return (f"note: train.warmup_iters={tc.warmup_iters} is not below train.max_iters={tc.max_iters}: the learning "
            f"rate only warms up, to {top:.0%} of train.lr at the last step, and never decays; lower "
            "train.warmup_iters for a full schedule")


def accumulate_gradients(model: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]],
                         autocast: Callable, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Forward and backward over micro-batches, gradients summed as if they were one batch.
    A micro-batch is the tuple of tensors that `model` takes, returning (output, loss).
    Returns the mean loss as a device tensor: reading it would wait for the device, so the
    loop does that only when it logs. Under DDP and FSDP only the last micro-batch reduces gradients."""
    losses = []
    for i, batch in enumerate(batches):
        with distributed.gradient_sync(model, enabled=i == len(batches) - 1):
            with autocast():
                _, loss = model(*batch)
            loss = loss / len(batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum()


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   grad_clip: float) -> torch.Tensor:
    """Clip, step and zero the gradients; returns the gradient norm before clipping (a device tensor)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------- signals

class StopRequest:
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, exit 130/143. A second
    Ctrl-C exits at once (the last complete checkpoint stays valid)."""

    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for signum in self.EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(self.EXIT_CODES[self.signum])
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint, then stopping "
              "(press Ctrl-C again to quit at once)", file=sys.stderr)

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES[self.signum] if self.signum is not None else 0



# ----------------------------------------------------------------------------- the loop

def train(config: Config, *, resume: bool = False, overwrite: bool = False, show_config: bool = False) -> int:
    """Train (or continue) the run described by `config`; returns the process exit code.
    `show_config` prints every setting at start, not only those that differ from the defaults."""
    dist = distributed.setup(pick_device(config.train.device).type, config.train.dist_timeout)
    try:
        with contextlib.ExitStack() as hold:
            trainer, checkpoint = build_trainer(config, resume=resume, overwrite=overwrite, dist=dist, hold=hold)
            code = _loop(trainer, resumed=checkpoint is not None, show_config=show_config)
            # Let rank 0 finish writing before any rank tears the process group down: a rank that
            # leaves early aborts inside gloo ("terminate called without an active exception").
            distributed.barrier(dist)
            del trainer  # DDP's reducer holds the process group: let teardown, not it, destroy the group
        return code
    except torch.cuda.OutOfMemoryError:
        t = config.train
        raise GptError(f"out of GPU memory at train.batch_size={t.batch_size}, model.block_size="
                       f"{config.model.block_size}; lower train.batch_size and raise train.grad_accum to keep "
                       "the effective batch, or use a smaller model") from None
    except RuntimeError as exc:  # DistError is one
        if not (dist.enabled and distributed.lost_peer(exc)):
            raise
        reason = str(exc).strip().splitlines()[0][-120:]
        raise GptError(f"rank {dist.rank} lost contact with the other processes ({reason}): one died (its error "
                       f"is above) or hung for longer than train.dist_timeout={config.train.dist_timeout:g} s; "
                       "fix it, then resume from the last checkpoint") from None
    finally:
        distributed.teardown(dist)


def nothing_to_train(tc: TrainConfig, state: TrainState) -> str:
    """What to change when a resumed run is already at its last step (it then stops at once)."""
    if tc.max_minutes and (state.budget or {}).get("plan") is not None:
        return (f"nothing to train: the run is at iteration {state.iter}, the last step its time budget "
                f"(train.max_minutes={tc.max_minutes:g}) planned; add train.max_minutes=null and a higher "
                "train.max_iters to train on")
    return (f"nothing to train: the run is already at iteration {state.iter} (train.max_iters={tc.max_iters}); "
            "pass a higher train.max_iters to train on")


def _loop(tr: Trainer, resumed: bool, show_config: bool = False) -> int:
    """Step until the last step or a signal, logging, evaluating and saving at their intervals;
    returns the exit code."""
    tc, main, state = tr.config.train, tr.dist.is_main, tr.state
    metrics = MetricsLog(tr.run, state.iter if resumed else None, tc.tensorboard) if main else None
    if main:
        _announce(tr, resumed, show_config)
    mfu = _mfu(tr)
    progress = Progress(tc.max_iters, state.iter, enabled=main)
    window_start, window_tokens, window_iters = time.perf_counter(), 0, 0
    budget = tr.budget = _start_budget(tr) if tc.max_minutes else None
    end = budget.end if budget is not None else tc.max_iters  # a budget's plan, infinity until it has one
    with StopRequest() as stop:
        # Every rank must take the same number of steps, or one waits forever in a collective:
        # the stop request is agreed between ranks before each step.
        while state.iter < end and not distributed.any_rank(stop.signum is not None, tr.dist, tr.device):
            lr = scheduled_lr(state.iter, tc, budget)
            batches, loss, grad_norm, step_tokens = _step(tr, lr)
            state.iter += 1
            state.tokens += step_tokens
            last = state.iter == end  # a budget plans again only before its last step, never onto this one
            window_tokens += step_tokens
            window_iters += 1
            row: dict[str, Any] = {}
            if state.iter % tc.log_interval == 0 or last:
                row = {"loss": distributed.mean_across_ranks(loss, tr.dist), "lr": lr, "grad_norm": grad_norm.item()}
                elapsed = time.perf_counter() - window_start  # after the reads above: the device has caught up
                tok_s = window_tokens / elapsed
                row.update(tok_per_s=tok_s, ms_per_iter=1000 * elapsed / window_iters, mfu=mfu(tok_s))
                window_start, window_tokens, window_iters = time.perf_counter(), 0, 0
                if not math.isfinite(row["loss"]) and tr.scaler is None:  # fp16's scaler skips such steps itself
                    raise diverged(f"the training loss is {row['loss']}", state.iter)
            paused = time.perf_counter()
            if budget is not None:
                first = budget.plan is None
                if budget.after_step(state.iter, functools.partial(_measure_events, tr, batches[-1])):
                    end = budget.plan
                    tc = _follow_plan(tr, budget, progress, first)
            if state.iter % tc.eval_interval == 0 or last:
                row.update(_evaluate(tr, budget))
            if row and main:
                metrics.write({"iter": state.iter, "tokens": state.tokens, **row})
                progress.report(state.iter, row)
                if "val_loss" in row or "eval_train_loss" in row:
                    metrics.plot()
            progress.advance(state.iter)
            if state.iter % tc.ckpt_interval == 0 or last:
                with _pausing(budget, "ckpt"):
                    tr.check_finite(loss)
                    tr.save()
            window_start += time.perf_counter() - paused  # speed counts training steps only
        stopped = state.iter < end
        if stopped:
            _save_on_stop(tr, metrics)
        elif budget is not None and main:
            print(budget.summary(state.iter))
        progress.close()
        return stop.exit_code or (130 if stopped else 0)


def _step(tr: Trainer, lr: float) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor, torch.Tensor, int]:
    """One optimizer step at `lr`: its micro-batches, the loss and gradient norm (device tensors,
    not waited for) and the positions the model ran across ranks (padding included)."""
    set_lr(tr.optimizer, lr)
    batches = tr.batches.next()
    loss = accumulate_gradients(tr.forward_model, batches, tr.autocast, tr.scaler)
    grad_norm = optimizer_step(tr.trained, tr.optimizer, tr.scaler, tr.config.train.grad_clip)
    # Read from shapes: no wait for the device.
    return batches, loss, grad_norm, sum(batch[0].numel() for batch in batches) * tr.dist.world_size


def _announce(tr: Trainer, resumed: bool, show_config: bool) -> None:
    """Rank 0 saves the resolved config and says what matters before the first step: the
    settings that differ from the defaults (all with `show_config`), the objective, the model
    and the step's size, and what a resumed run at its end or a short schedule should change."""
    tc, state = tr.config.train, tr.state
    replace_atomically(tr.run.run_config, dump_yaml(tr.config))
    if show_config:
        print(dump_yaml(tr.config).rstrip())
    else:
        print(f"config: every setting in {tr.run.run_config} (--show-config prints them); set apart from the "
              f"defaults:\n{describe_changes(tr.config)}")
    print(tr.objective.describe())
    rows = tc.batch_size * tc.grad_accum * tr.dist.world_size
    print(f"model: {sum(p.numel() for p in tr.trained.parameters()):,} parameters | device {tr.device} | "
          f"{rows:,} {tr.objective.unit} per step | starting at iter {state.iter}")
    if resumed and state.iter >= tc.max_iters:
        print(nothing_to_train(tc, state))
    elif note := schedule_note(tc):
        print(note)
    if tr.parallel != "none":
        print(f"parallel: {tr.parallel} over {tr.dist.world_size} processes | global batch = batch_size "
              f"{tc.batch_size} x grad_accum {tc.grad_accum} x world_size {tr.dist.world_size} = {rows:,} | "
              "tok/s below counts the whole job")


def _evaluate(tr: Trainer, budget: budgeting.Budget | None) -> dict[str, float | None]:
    """Evaluate (every rank), keep the result, and save best/ when it is the best so far; returns
    the metrics row's evaluation columns."""
    with _pausing(budget, "eval"):
        evaluation = tr.objective.evaluate(_unwrap_ddp(tr.forward_model), tr.device, tr.autocast, tr.dist)
        if tr.state.record(evaluation) and tr.config.train.save_best:  # every rank: the evaluation agrees
            tr.check_finite(None)
            tr.save_best()
    return evaluation.row()


def _save_on_stop(tr: Trainer, metrics: MetricsLog | None) -> None:
    """A run stopped by a signal saves where it is (every rank), so that --resume goes on from there."""
    tr.check_finite(None)
    tr.save()
    if tr.dist.is_main:
        metrics.plot()  # a run stopped before its first evaluation has drawn nothing yet
        print(f"stopped at iter {tr.state.iter}; continue with: gpt train --resume {tr.run.root}", file=sys.stderr)


def _mfu(tr: Trainer) -> Mfu:
    """MFU against one device's peak times the world size (tokens/s counts every rank)."""
    tc = tr.config.train
    shapes = training_matmul_shapes(tr.trained, tc.batch_size * tr.config.model.block_size)

    def peak(fresh: bool = False) -> float | None:
        one = peak_flops(tc.peak_flops, tr.device, shapes, tr.dtype, fresh)
        return one * tr.dist.world_size if one else None

    measured = tc.peak_flops is None and tr.device.type == "cpu"
    return Mfu(tr.model.flops_per_token(), peak(), configured=tc.peak_flops is not None,
               remeasure=(lambda: peak(fresh=True)) if measured else None, enabled=tr.dist.is_main)


def _start_budget(tr: Trainer) -> budgeting.Budget:
    """The run's time budget (gpt.training.budget), from its checkpoint's plan when resumed. Every rank
    takes rank 0's decisions, or ranks would stop at different steps and wait for each other forever."""
    def synchronize() -> None:
        if tr.device.type != "cpu":
            torch.accelerator.synchronize(tr.device)

    return budgeting.Budget(tr.config.train, tr.state.iter, tr.state.budget,
                            share=lambda obj: distributed.gather_objects(obj, tr.dist)[0], sync=synchronize)


def _measure_events(tr: Trainer, batch: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """Seconds an evaluation and a checkpoint of this run take, estimated for its budget's first plan."""
    checkpoint = {"model": tr.model.state_dict(), **{k: v.state_dict() for k, v in tr.shared_state().items()}}
    forward = budgeting.timed_forward(_unwrap_ddp(tr.forward_model), batch, tr.autocast)
    return budgeting.measure_events(forward, tr.objective.eval_batches(), checkpoint)


def _follow_plan(tr: Trainer, budget: budgeting.Budget, progress: Progress, first: bool) -> TrainConfig:
    """The run's max_iters (in checkpoints' config and the progress bar) is its budget's plan."""
    tr.config = budgeting.with_max_iters(tr.config, budget.plan)
    progress.set_total(budget.plan)
    if first and tr.dist.is_main:
        print(budget.describe())
        if note := schedule_note(tr.config.train):
            print(note)
    return tr.config.train


def _pausing(budget: budgeting.Budget | None, kind: str) -> contextlib.AbstractContextManager:
    """An evaluation or checkpoint, timed for the budget (when there is one) as not training time."""
    return budget.pausing(kind) if budget is not None else contextlib.nullcontext()


def _unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") else model
