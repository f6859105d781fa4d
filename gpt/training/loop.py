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
import dataclasses
import functools
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from gpt.checkpoint import (
    Checkpoint,
    all_finite,
    load_optimizer,
    load_training_state,
    load_weights,
    read_checkpoint,
    save_best,
    save_checkpoint,
    stage_optimizer_shards,
)
from gpt.config import Config, TrainConfig, describe_changes, dump_yaml, to_dict
from gpt.data.formats import RunFolder, RunState
from gpt.data.shards import DeviceBatches
from gpt.data.tokenizer import TokenizerSpec
from gpt.device import autocast_for, maybe_compile, peak_flops, pick_device, pick_dtype, training_matmul_shapes
from gpt.durable import FolderLock, replace_atomically
from gpt.errors import GptError
from gpt.model import GPT
from gpt.training import budget as budgeting
from gpt.training import distributed
from gpt.training.metrics import Evaluation, MetricsLog, Mfu, Progress
from gpt.training.objectives import Objective, check_init_from, make_objective, shape_differences
from gpt.training.optim import build_optimizer, set_lr

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


# ----------------------------------------------------------------------------- resumable state

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


# ----------------------------------------------------------------------------- run set-up

def config_diff(old: Config, new: Config) -> list[str]:
    before = to_dict(old)
    return [f"  {section}.{key}: {before[section][key]!r} -> {value!r}"
            for section, body in to_dict(new).items() for key, value in body.items()
            if before[section][key] != value]


def prepare_out_dir(run: RunFolder, resume: bool, overwrite: bool) -> None:
    if run.holds_run() and not resume and not overwrite:
        raise GptError(f"{run.root} already holds a run; pass --resume to continue it or --overwrite to start over")
    if overwrite and not resume:
        for path in run.run_files():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def check_resume_config(checkpoint: Checkpoint, config: Config, tokenizer: TokenizerSpec) -> None:
    if checkpoint.tokenizer_spec != tokenizer:  # a BPE trained again has the same vocab_size but other ids
        raise GptError(f"cannot resume {checkpoint.path}: "
                       f"{checkpoint.tokenizer_spec.difference(tokenizer, 'the checkpoint', 'the data')}; "
                       "resume on the data it was trained on")
    changed = shape_differences(checkpoint.config.model, config.model)
    if changed:
        fields = ", ".join(f"model.{name}" for name in changed)
        raise GptError(f"cannot resume {checkpoint.path}: {fields} differ from the checkpoint's; "
                       "resume with the same model or start a new run with another train.out_dir")
    if checkpoint.config.train.optimizer != config.train.optimizer:
        raise GptError(f"cannot resume {checkpoint.path} with train.optimizer={config.train.optimizer}: it was "
                       f"trained with {checkpoint.config.train.optimizer}; resume with the same optimizer")
    diff = config_diff(checkpoint.config, config)
    if diff:
        print("resuming with these config changes:\n" + "\n".join(diff))


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Trainer:
    """Everything the loop touches, so that helpers stay small."""

    config: Config
    run: RunFolder
    objective: Objective
    model: GPT                      # the language model: its state dict has no wrapper prefixes
    head: torch.nn.Module | None    # a task run's head, saved beside the model's weights
    trained: torch.nn.Module        # what the optimizer trains: the model, or the model with its head
    forward_model: torch.nn.Module  # `trained` compiled and/or DDP-wrapped, used for forward passes
    optimizer: torch.optim.Optimizer  # or gpt.training.optim.Optimizers, which acts as one
    scaler: torch.amp.GradScaler | None
    batches: DeviceBatches
    device: torch.device
    autocast: Callable
    dist: distributed.Dist
    parallel: str = "none"          # none | ddp | fsdp, as resolved for this job
    dtype: torch.dtype = torch.float32  # what matmuls compute in (autocast's dtype)
    state: TrainState = dataclasses.field(default_factory=TrainState)
    budget: budgeting.Budget | None = None  # train.max_minutes, once the loop has started

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def shared_state(self) -> dict[str, Resumable]:
        """What every rank holds alike (rank 0's copy is saved). A sharded optimizer is not
        alike: each rank saves its own part (`stage_optimizer_shards`)."""
        return {**({} if self.sharded else {"optimizer": self.optimizer}),
                **({"scaler": self.scaler} if self.scaler is not None else {})}

    def rank_state(self) -> dict[str, Resumable]:
        """What differs between ranks: the data position and the random generators."""
        return {"data": self.batches, "rng": RNGState(self.device)}

    def save(self) -> None:
        """Every rank calls this (gathers are collectives); rank 0 writes the checkpoint."""
        ranks = distributed.gather_objects({k: v.state_dict() for k, v in self.rank_state().items()}, self.dist)
        weights, shards = self.gather_weights(), None
        if self.sharded:
            shards = stage_optimizer_shards(self.run, self.state.iter, self.trained, self.optimizer, self.dist)
        if not self.dist.is_main:
            return
        training = {**{k: v.state_dict() for k, v in self.shared_state().items()}, "ranks": ranks}
        save_checkpoint(self.run, self.model, self.config, self.objective.tokenizer, self.state_json(), training,
                        self.config.train.keep_last, head=self.head, weights=weights, optimizer_shards=shards)

    def save_best(self) -> None:
        """Every rank calls this; rank 0 writes best/."""
        weights = self.gather_weights()
        if self.dist.is_main:
            save_best(self.run, self.model, self.config, self.objective.tokenizer, self.state_json(),
                      head=self.head, weights=weights)

    def check_finite(self, loss: torch.Tensor | None) -> None:
        """Stop with one line, before anything is saved, when the step's loss (where given; not
        under fp16, whose scaler skips such steps) or any weight is NaN or inf: a diverged run
        must not leave a NaN checkpoint as `latest` while `keep_last` rotates the good ones out.
        Every rank calls this and all agree (each checks its own shard of the weights)."""
        loss_value = None if loss is None or self.scaler is not None else distributed.mean_across_ranks(loss, self.dist)
        weights_bad = not all_finite(distributed.local_tensors(self.trained.parameters()))
        if distributed.any_rank(weights_bad, self.dist, self.device):
            raise diverged("the weights hold NaN or inf", self.state.iter)
        if loss_value is not None and not math.isfinite(loss_value):
            raise diverged(f"the training loss is {loss_value}", self.state.iter)

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """An FSDP model's full weights on rank 0 (None when each rank holds them whole)."""
        return distributed.full_state_dict(self.trained) if self.sharded else None

    def state_json(self) -> RunState:
        budget = self.budget.state_dict() if self.budget is not None else self.state.budget
        return dataclasses.replace(self.state, budget=budget, world_size=self.dist.world_size)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Optimizer, scaler, progress and (same world size) data position and RNG; the
        weights were loaded before the model was wrapped (`build_trainer`)."""
        training = load_training_state(checkpoint.path)
        if "ranks" not in training:
            raise GptError(f"{checkpoint.path} was written by an older version of gpt and cannot be resumed; "
                           f"start a new run with train.init_from={checkpoint.path} to keep its weights")
        self.state = TrainState.of(checkpoint.state)
        load_optimizer(self.trained, self.optimizer, checkpoint.path, training)
        if self.scaler is not None and "scaler" in training:
            self.scaler.load_state_dict(training["scaler"])
        ranks = training["ranks"]
        if len(ranks) == self.dist.world_size:
            for key, part in self.rank_state().items():
                part.load_state_dict(ranks[self.dist.rank][key])
        elif self.dist.is_main:
            print(f"warning: checkpoint was written by {len(ranks)} processes, this run has "
                  f"{self.dist.world_size}: weights and optimizer carry over; the data order and the random "
                  "generators restart from the seed", file=sys.stderr)


def diverged(what: str, iteration: int) -> GptError:
    return GptError(f"{what} at iter {iteration}: the run diverged; lower train.lr (and train.muon_lr), then resume "
                    "from a checkpoint before it or start over")


def check_parallel(parallel: str, config: Config, dtype: torch.dtype) -> None:
    if parallel != "fsdp":
        return
    if config.task.kind is not None:
        raise GptError("train.parallel=fsdp shards language models only; fine-tune a task with train.parallel=ddp")
    if config.train.optimizer == "muon":
        raise GptError("train.parallel=fsdp with train.optimizer=muon is not supported (Muon orthogonalises whole "
                       "matrices, FSDP holds shards of them); use train.parallel=ddp or train.optimizer=adamw")
    if dtype == torch.float16:
        raise GptError("train.parallel=fsdp with train.dtype=float16 is not supported (its GradScaler does not "
                       "handle sharded gradients); use train.dtype=bfloat16 or float32")


def parallelize(trained: torch.nn.Module, model: GPT, parallel: str, compile_setting: bool | str,
                device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The module forward passes go through: FSDP shards `trained` in place and is then
    compiled; DDP wraps the compiled module (each in the order torch documents)."""
    if parallel == "fsdp":
        distributed.shard(trained, model.blocks, torch.bfloat16 if dtype == torch.bfloat16 else None)
        return maybe_compile(trained, compile_setting, device)
    compiled = maybe_compile(trained, compile_setting, device)
    return distributed.wrap_ddp(compiled, device) if parallel == "ddp" else compiled


def build_trainer(config: Config, *, resume: bool, overwrite: bool, dist: distributed.Dist,
                  hold: contextlib.ExitStack) -> tuple[Trainer, Checkpoint | None]:
    """Check everything the user gave, then (and only then: a mistake must leave no trace)
    lock and prepare the run folder and build the model, optimizer and data. The lock stays
    in `hold` for the whole run."""
    tc = config.train
    device = pick_device(tc.device)
    if device.type == "cuda" and (dist.enabled or device.index is None):
        device = torch.device("cuda", dist.local_rank)  # DDP and NCCL need the index
    dtype = pick_dtype(tc.dtype, device)
    parallel = distributed.resolve_parallel(tc.parallel, dist)
    run = RunFolder(Path(tc.out_dir))
    if resume and not run.checkpoints():
        raise GptError(f"nothing to resume: {run.root} has no complete checkpoint; drop --resume to start a new run")
    checkpoint = read_checkpoint(run.root) if resume else None
    if checkpoint is not None:
        config = budgeting.resumed_config(config, checkpoint.state)
    objective = make_objective(config, checkpoint)
    config = objective.config
    check_parallel(parallel, config, dtype)
    source = check_init_from(tc.init_from, config, objective.tokenizer) if tc.init_from and not resume else None
    if dist.is_main:
        hold.enter_context(FolderLock(run.lock, f"train.out_dir {run.root}"))
        prepare_out_dir(run, resume, overwrite)
        if checkpoint is not None:
            check_resume_config(checkpoint, config, objective.tokenizer)
    distributed.barrier(dist)

    torch.manual_seed(tc.seed)  # the same initial weights on every rank: FSDP shards them as they are
    model, head, trained = objective.build_model(source)
    if dist.rank:
        torch.manual_seed(tc.seed + dist.rank)  # but each rank its own dropout
    if checkpoint is not None:
        load_weights(model, checkpoint.path, head)  # before sharding: FSDP splits the loaded tensors
    trained.to(device)
    forward_model = parallelize(trained, model, parallel, tc.compile, device, dtype)
    # After sharding: FSDP replaces the parameters the optimizer must hold.
    optimizer = build_optimizer(trained, tc, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    batches = DeviceBatches(objective.sampler([tc.seed, 0], dist), tc.grad_accum, device)
    trainer = Trainer(config=config, run=run, objective=objective, model=model, head=head, trained=trained,
                      forward_model=forward_model, optimizer=optimizer, scaler=scaler, batches=batches,
                      device=device, autocast=autocast_for(device, dtype), dist=dist, parallel=parallel,
                      dtype=dtype)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    return trainer, checkpoint


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
    tc, main, state = tr.config.train, tr.dist.is_main, tr.state
    metrics = MetricsLog(tr.run, state.iter if resumed else None, tc.tensorboard) if main else None
    if main:
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
            set_lr(tr.optimizer, lr)
            batches = tr.batches.next()
            loss = accumulate_gradients(tr.forward_model, batches, tr.autocast, tr.scaler)
            grad_norm = optimizer_step(tr.trained, tr.optimizer, tr.scaler, tc.grad_clip)
            # Positions the model ran (padding included), read from shapes: no wait for the device.
            step_tokens = sum(batch[0].numel() for batch in batches) * tr.dist.world_size
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
                with _pausing(budget, "eval"):
                    evaluation = tr.objective.evaluate(_unwrap_ddp(tr.forward_model), tr.device, tr.autocast, tr.dist)
                    if state.record(evaluation) and tc.save_best:  # every rank: the evaluation agrees
                        tr.check_finite(None)
                        tr.save_best()
                row.update(evaluation.row())
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
            tr.check_finite(None)
            tr.save()
            if main:
                metrics.plot()  # a run stopped before its first evaluation has drawn nothing yet
                print(f"stopped at iter {state.iter}; continue with: gpt train --resume {tr.run.root}", file=sys.stderr)
        elif budget is not None and main:
            print(budget.summary(state.iter))
        progress.close()
        return stop.exit_code or (130 if stopped else 0)


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
