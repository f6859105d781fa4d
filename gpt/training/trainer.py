"""What the training loop touches, and how a run builds it.

`build_trainer` checks everything the user gave before it writes anything, then locks the run
folder and builds the model, its wrapped forms (DDP, FSDP2, compiled), the optimizer and the
data, and restores a checkpoint when resuming. The `Trainer` holds all of it, and saves and
restores it (`Trainer.save`, `Trainer.restore`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sys
from pathlib import Path
from typing import Callable

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
from gpt.config import Config, to_dict
from gpt.data.formats import RunFolder, RunState
from gpt.data.shards import DeviceBatches
from gpt.data.tokenizer import TokenizerSpec
from gpt.device import autocast_for, maybe_compile, pick_device, pick_dtype
from gpt.durable import FolderLock
from gpt.errors import GptError
from gpt.model import GPT
from gpt.training import budget as budgeting
from gpt.training import distributed
from gpt.training.objectives import Objective, check_init_from, make_objective, shape_differences
from gpt.training.optim import build_optimizer
from gpt.training.state import Resumable, RNGState, TrainState

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


# ----------------------------------------------------------------------------- the trainer

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
