"""`gpt train`: AdamW, warmup + cosine LR, gradient accumulation, AMP, eval, checkpoints, signals.

One loop serves pretraining, fine-tuning (`train.init_from`) and resuming (`--resume`).
Resuming is exact: weights, optimizer, the data sampler's RNG and torch's RNG are restored,
so on CPU the losses after a resume equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from gpt import distributed
from gpt.checkpoint import (
    Checkpoint,
    assign_weights,
    complete_checkpoints,
    load_training_state,
    load_weights,
    read_checkpoint,
    save_best,
    save_checkpoint,
)
from gpt.config import Config, ModelConfig, dump_yaml, to_dict
from gpt.convert import read_model_source
from gpt.device import autocast_for, maybe_compile, peak_flops, pick_device, pick_dtype
from gpt.errors import GptError
from gpt.metrics import MetricsLog
from gpt.model import GPT
from gpt.shards import BatchSampler, Dataset, load_dataset

RUN_FILES = ("latest", "best", "metrics.csv", "loss.png", "tensorboard")
# Model fields that may change between a checkpoint and the run that continues it.
NON_SHAPE_FIELDS = {"dropout", "attn_dropout", "preset"}


# ----------------------------------------------------------------------------- optimisation

def lr_at(it: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Learning rate for step `it` (0-based): linear warmup to `lr` over `warmup_iters` steps,
    cosine decay to `min_lr` at `decay_iters`, then constant."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: GPT, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weight matrices of attention and MLP only.

    Biases, norm gains and embedding tables (the token embedding is also the output matrix
    when tied) are not decayed, as in GPT-2 and minGPT: decaying them shrinks features the
    model needs without regularising anything useful."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))


def accumulate_gradients(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         autocast: Callable, scaler: torch.amp.GradScaler | None = None) -> float:
    """Forward and backward over micro-batches, gradients summed as if they were one batch.
    Returns the mean loss. Under DDP only the last micro-batch synchronises gradients."""
    total = 0.0
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                _, loss = model(x, y)
            loss = loss / len(batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
    return total


def optimizer_step(model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   grad_clip: float) -> float:
    """Clip, step and zero the gradients; returns the gradient norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, block_size: int, batch_size: int, eval_iters: int,
             seed: int, device: torch.device, autocast: Callable) -> dict[str, float]:
    """Mean loss per split over `eval_iters` batches. The batches are the same at every
    evaluation (own RNG), so the curve shows the model changing, not the sample."""
    model.eval()
    losses = {}
    for split, shards in dataset.splits.items():
        sampler = BatchSampler(shards, block_size, batch_size, seed=[seed, 1])
        total = 0.0
        for _ in range(eval_iters):
            x, y = sampler.next_batch()
            with autocast():
                total += model(x.to(device), y.to(device))[1].item()
        losses[split] = total / eval_iters
    model.train()
    return losses


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


# ----------------------------------------------------------------------------- run set-up

def resolve_vocab(config: Config, dataset: Dataset) -> Config:
    """Fill model.vocab_size from the data, or check that the given one matches it."""
    if config.model.vocab_size is None:
        model = dataclasses.replace(config.model, vocab_size=dataset.vocab_size)
        return dataclasses.replace(config, model=model)
    if config.model.vocab_size != dataset.vocab_size:
        raise GptError(f"model.vocab_size is {config.model.vocab_size} but the data in {dataset.folder} has "
                       f"{dataset.vocab_size} tokens; set model.vocab_size=null to take it from the data")
    return config


def check_block_size(dataset: Dataset, block_size: int) -> None:
    for split, shards in dataset.splits.items():
        longest = max((len(s) for s in shards), default=0)
        if longest <= block_size:
            raise GptError(f"the {split} split's longest shard has {longest} tokens, not more than "
                           f"model.block_size={block_size}; lower model.block_size or prepare more data")


def shape_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in NON_SHAPE_FIELDS and getattr(a, f.name) != getattr(b, f.name)]


def config_diff(old: Config, new: Config) -> list[str]:
    before = to_dict(old)
    return [f"  {section}.{key}: {before[section][key]!r} -> {value!r}"
            for section, body in to_dict(new).items() for key, value in body.items()
            if before[section][key] != value]


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    has_run = bool(complete_checkpoints(out_dir)) or any((out_dir / f).exists() for f in RUN_FILES)
    if has_run and not resume and not overwrite:
        raise GptError(f"{out_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    if has_run and overwrite and not resume:
        for path in complete_checkpoints(out_dir) + [out_dir / f for f in RUN_FILES]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise GptError(f"cannot write to train.out_dir {out_dir} ({exc.strerror}); choose another folder") from None


def check_resume_config(checkpoint: Checkpoint, config: Config) -> None:
    changed = shape_differences(checkpoint.config.model, config.model)
    if changed:
        fields = ", ".join(f"model.{name}" for name in changed)
        raise GptError(f"cannot resume {checkpoint.path}: {fields} differ from the checkpoint's; "
                       "resume with the same model or start a new run with another train.out_dir")
    diff = config_diff(checkpoint.config, config)
    if diff:
        print("resuming with these config changes:\n" + "\n".join(diff))


def init_from_checkpoint(model: GPT, path: str, config: Config, dataset: Dataset) -> None:
    """Fine-tuning start: the weights of another run (or of a Hugging Face GPT-2 folder,
    `hf:DIR`), checked against this model and data."""
    source = read_model_source(path)
    changed = shape_differences(source.config, config.model)
    if changed:
        detail = ", ".join(f"model.{n}={getattr(source.config, n)!r} (here {getattr(config.model, n)!r})"
                           for n in changed)
        raise GptError(f"train.init_from {path}: the checkpoint's model differs: {detail}; "
                       "use the checkpoint's model settings")
    if source.tokenizer_info != dataset.meta["tokenizer"]:
        raise GptError(f"train.init_from {path}: the checkpoint's {source.tokenizer_info.get('name')} tokenizer "
                       f"differs from the data's {dataset.meta['tokenizer'].get('name')}; prepare the data "
                       "with the checkpoint's tokenizer")
    assign_weights(model, source.weights, path)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Run:
    """Everything the loop touches, so that helpers stay small."""

    config: Config
    out_dir: Path
    dataset: Dataset
    model: GPT                   # the plain module: its state dict has no wrapper prefixes
    forward_model: torch.nn.Module  # compiled and/or DDP-wrapped, used for forward passes
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    sampler: BatchSampler
    device: torch.device
    autocast: Callable
    dist: distributed.Dist
    it: int = 0
    best_val: float = math.inf

    @property
    def tokens_per_step(self) -> int:
        t = self.config.train
        return t.batch_size * t.grad_accum * self.config.model.block_size * self.dist.world_size

    def checkpoint(self, last_losses: dict[str, float]) -> None:
        data_states = distributed.gather_objects(self.sampler.state(), self.dist)
        rng_states = distributed.gather_objects(torch.get_rng_state(), self.dist)
        if not self.dist.is_main:
            return
        state = {"iter": self.it, "tokens": self.it * self.tokens_per_step, "best_val_loss": _finite(self.best_val),
                 "world_size": self.dist.world_size, "data_state": data_states, "losses": last_losses}
        training_state = {"optimizer": self.optimizer.state_dict(),
                          "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                          "torch_rng": rng_states,
                          "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        save_checkpoint(self.out_dir, self.model, self.config, self.dataset.meta["tokenizer"], state,
                        training_state, self.config.train.keep_last)

    def restore(self, checkpoint: Checkpoint) -> None:
        load_weights(self.model, checkpoint.path)
        self.model.to(self.device)
        training = load_training_state(checkpoint.path)
        self.optimizer.load_state_dict(training["optimizer"])
        if self.scaler is not None and training.get("scaler"):
            self.scaler.load_state_dict(training["scaler"])
        state = checkpoint.state
        self.it = state["iter"]
        self.best_val = state.get("best_val_loss") or math.inf
        if state.get("world_size", 1) == self.dist.world_size:
            self.sampler.load_state(state["data_state"][self.dist.rank])
            torch.set_rng_state(training["torch_rng"][self.dist.rank])
            if training.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(training["cuda_rng"])
        elif self.dist.is_main:
            print(f"warning: checkpoint was written by {state.get('world_size')} processes, this run has "
                  f"{self.dist.world_size}; the data order restarts from a new random position", file=sys.stderr)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def build_run(config: Config, *, resume: bool, overwrite: bool,
              dist: distributed.Dist) -> tuple[Run, Checkpoint | None]:
    tc = config.train
    device = pick_device(tc.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    dtype = pick_dtype(tc.dtype, device)
    dataset = load_dataset(config.data.dir)
    config = resolve_vocab(config, dataset)
    check_block_size(dataset, config.model.block_size)
    if "train" not in dataset.splits:
        raise GptError(f"{dataset.folder} has no train split; run `gpt prepare` again")
    out_dir = Path(tc.out_dir)
    checkpoint = None
    if dist.is_main:
        prepare_out_dir(out_dir, resume, overwrite)
    if resume:
        checkpoint = read_checkpoint(out_dir) if complete_checkpoints(out_dir) else None
        if checkpoint is None:
            raise GptError(f"nothing to resume: {out_dir} has no complete checkpoint; drop --resume to start a new run")
        if dist.is_main:
            check_resume_config(checkpoint, config)
    distributed.barrier(dist)

    torch.manual_seed(tc.seed + dist.rank)
    model = GPT(config.model)
    if tc.init_from and checkpoint is None:
        init_from_checkpoint(model, tc.init_from, config, dataset)
    model.to(device)
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    forward_model = distributed.wrap(maybe_compile(model, tc.compile, device), dist, device)
    sampler = BatchSampler(dataset.splits["train"], config.model.block_size, tc.batch_size,
                           seed=[tc.seed, 0, dist.rank])
    run = Run(config=config, out_dir=out_dir, dataset=dataset, model=model, forward_model=forward_model,
              optimizer=optimizer, scaler=scaler, sampler=sampler, device=device,
              autocast=autocast_for(device, dtype), dist=dist)
    if checkpoint is not None:
        run.restore(checkpoint)
    return run, checkpoint


def train(config: Config, *, resume: bool = False, overwrite: bool = False) -> int:
    """Train (or continue) the run described by `config`; returns the process exit code."""
    dist = distributed.setup(pick_device(config.train.device).type)
    try:
        run, checkpoint = build_run(config, resume=resume, overwrite=overwrite, dist=dist)
        code = _loop(run, checkpoint)
        # Let rank 0 finish writing before any rank tears the process group down: a rank that
        # leaves early aborts inside gloo ("terminate called without an active exception").
        distributed.barrier(dist)
        return code
    except torch.cuda.OutOfMemoryError:
        t = config.train
        raise GptError(f"out of GPU memory at train.batch_size={t.batch_size}, model.block_size="
                       f"{config.model.block_size}; lower train.batch_size and raise train.grad_accum to keep "
                       "the effective batch, or use a smaller model") from None
    finally:
        distributed.teardown(dist)


def _loop(run: Run, checkpoint: Checkpoint | None) -> int:
    tc, main = run.config.train, run.dist.is_main
    metrics = MetricsLog(run.out_dir, run.it if checkpoint else None, tc.tensorboard) if main else None
    if main:
        print(dump_yaml(run.config).rstrip())
        print(f"model: {run.model.num_params():,} parameters | device {run.device} | "
              f"{run.tokens_per_step:,} tokens per step | starting at iter {run.it}")
    peak = peak_flops(tc.peak_flops, run.device)
    flops_per_token = run.model.flops_per_token()
    progress = Progress(tc.max_iters, run.it, enabled=main)
    window_start, window_iters = time.perf_counter(), 0
    last_losses: dict[str, float] = {}
    with StopRequest() as stop:
        while run.it < tc.max_iters and stop.signum is None:
            lr = lr_at(run.it, tc.lr, tc.min_lr, tc.warmup_iters, tc.decay_iters)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            batches = [tuple(t.to(run.device, non_blocking=True) for t in run.sampler.next_batch())
                       for _ in range(tc.grad_accum)]
            loss = accumulate_gradients(run.forward_model, batches, run.autocast, run.scaler)
            grad_norm = optimizer_step(run.model, run.optimizer, run.scaler, tc.grad_clip)
            run.it += 1
            window_iters += 1
            row: dict[str, Any] = {}
            if run.it % tc.log_interval == 0 or run.it == tc.max_iters:
                elapsed = time.perf_counter() - window_start
                tok_s = window_iters * run.tokens_per_step / elapsed
                row = {"loss": distributed.mean_across_ranks(loss, run.dist, run.device), "lr": lr,
                       "grad_norm": grad_norm, "tok_per_s": tok_s, "ms_per_iter": 1000 * elapsed / window_iters,
                       "mfu": flops_per_token * tok_s / peak if peak else None}
                window_start, window_iters = time.perf_counter(), 0
            if run.it % tc.eval_interval == 0 or run.it == tc.max_iters:
                last_losses = evaluate(_unwrap_ddp(run.forward_model), run.dataset, run.config.model.block_size,
                                       tc.batch_size, tc.eval_iters, tc.seed, run.device, run.autocast)
                row.update(eval_train_loss=last_losses.get("train"), val_loss=last_losses.get("val"))
                _maybe_save_best(run, last_losses)
            if row and main:
                metrics.write({"iter": run.it, "tokens": run.it * run.tokens_per_step, **row})
                progress.report(run.it, row)
                if "val_loss" in row or "eval_train_loss" in row:
                    metrics.plot()
            progress.advance(run.it)
            if run.it % tc.ckpt_interval == 0 or run.it == tc.max_iters:
                run.checkpoint(last_losses)
        if stop.signum is not None:
            run.checkpoint(last_losses)
            if main:
                print(f"stopped at iter {run.it}; continue with: gpt train --resume {run.out_dir}", file=sys.stderr)
        progress.close()
        return stop.exit_code


def _unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") else model


def _maybe_save_best(run: Run, losses: dict[str, float]) -> None:
    score = losses.get("val", losses.get("train"))
    if score is None or score >= run.best_val:
        return
    run.best_val = score
    if run.config.train.save_best and run.dist.is_main:
        state = {"iter": run.it, "tokens": run.it * run.tokens_per_step, "losses": losses}
        save_best(run.out_dir, run.model, run.config, run.dataset.meta["tokenizer"], state)


class Progress:
    """A tqdm bar on a terminal; compact log lines otherwise (CI, files, pipes)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled, self.total = enabled, total
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True) if self.tty else None
        self.last_ms: float | None = None

    def report(self, it: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"loss {row['loss']:.4f}" if row.get("loss") is not None else None,
                 f"val {row['val_loss']:.4f}" if row.get("val_loss") is not None else None,
                 f"lr {row['lr']:.2e}" if row.get("lr") is not None else None,
                 f"{row['tok_per_s']:,.0f} tok/s" if row.get("tok_per_s") else None,
                 f"{row['ms_per_iter']:.1f} ms/iter" if row.get("ms_per_iter") else None,
                 f"mfu {100 * row['mfu']:.1f}%" if row.get("mfu") else None]
        if row.get("ms_per_iter"):
            self.last_ms = row["ms_per_iter"]
        if self.last_ms:
            parts.append(f"eta {_duration((self.total - it) * self.last_ms / 1000)}")
        text = " | ".join(p for p in parts if p)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(f"iter {it}/{self.total} | {text}", flush=True)

    def advance(self, it: int) -> None:
        if self.bar is not None:
            self.bar.n = it
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
