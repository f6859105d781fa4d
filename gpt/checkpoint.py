"""Checkpoints: atomic writes, retention, safe loading.

The layout of a run folder is `gpt.data.formats.RunFolder`. A checkpoint is written to
`ckpt_N.tmp/`, fsynced and renamed; only then does `latest` move. The rename is the
completeness marker, so a crash at any moment leaves the previous checkpoint intact. `best`
is a link to a complete `best_N/` folder, switched the same way. Nothing is unpickled:
weights are safetensors and the training state is read with `torch.load(weights_only=True)`.

Under FSDP the optimizer state is never gathered onto one rank (for a model too large for one
device it would not fit): each rank writes its shard with `torch.distributed.checkpoint` into
the checkpoint's `optimizer/` folder, which moves into `ckpt_N.tmp/` before the rename, so the
completeness rule is unchanged. The weights are still gathered into one model.safetensors on
rank 0: every reader (`gpt sample`, `convert`, `eval`, `init_from`) keeps working in one process
and on any device, and weights are a small part of training memory (the AdamW state is twice
their size). DCP reshards on load, so the optimizer resumes under any world size, FSDP or not.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from gpt.config import Config, build_config, dump_yaml, read_yaml
from gpt.data.formats import RunFolder, RunState
from gpt.data.tokenizer import Tokenizer, TokenizerSpec
from gpt.durable import link_atomically, replacing_folder, write_durably
from gpt.errors import GptError
from gpt.inference.weights import dequantize_linears, is_int8, load_int8
from gpt.model import GPT
from gpt.training import distributed

WEIGHTS = RunFolder.WEIGHTS
OPTIMIZER_SHARDS = RunFolder.OPTIMIZER_SHARDS
# A task head's weights sit beside the model's in model.safetensors under this prefix.
HEAD_PREFIX = "head."


@dataclass
class Checkpoint:
    path: Path
    config: Config
    tokenizer_spec: TokenizerSpec
    state: RunState  # state.json

    @property
    def tokenizer(self) -> Tokenizer:
        return self.tokenizer_spec.build()


def _weights(model: GPT, head: torch.nn.Module | None, state: dict[str, torch.Tensor] | None
             ) -> dict[str, torch.Tensor]:
    """The model's state dict (or `state`, an FSDP model's gathered one) without the tied
    output matrix (safetensors stores no shared tensors), plus the task head's under HEAD_PREFIX."""
    state = dict(state) if state is not None else model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    if head is not None:
        state.update({HEAD_PREFIX + k: v for k, v in head.state_dict().items()})
    return {k: v.detach().contiguous() for k, v in state.items()}


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point value of `tensors` is finite (one read from the device)."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(checks).all()) if checks else True


def _write_model_files(folder: Path, model: GPT, config: Config, tokenizer: TokenizerSpec, state: RunState,
                       head: torch.nn.Module | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:
    tensors = _weights(model, head, weights)
    if not all_finite(tensors.values()):  # the loop stops a diverged run before it saves; this is the last guard
        raise GptError("refusing to write a checkpoint whose weights hold NaN or inf: the run diverged; lower "
                       "train.lr and resume from an earlier checkpoint")
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS))
    write_durably(folder / RunFolder.CONFIG, dump_yaml(config))
    write_durably(folder / RunFolder.TOKENIZER, json.dumps(tokenizer.to_json(), ensure_ascii=False) + "\n")
    tokenizer.write_file(folder, RunFolder.TOKENIZER_FILE)
    write_durably(folder / RunFolder.STATE, json.dumps(state.to_json(), indent=1) + "\n")


def _write_folder(final: Path, model: GPT, config: Config, tokenizer: TokenizerSpec, state: RunState,
                  training: dict | None = None, head: torch.nn.Module | None = None,
                  weights: dict[str, torch.Tensor] | None = None, optimizer_shards: Path | None = None) -> None:
    """Write a complete checkpoint folder at `final` (through a temporary one and a rename). A
    failed write (disk full, no permission) leaves no partial copy and ends the run with one
    line: a run that goes on without saving would lose everything after the last checkpoint."""
    try:
        with replacing_folder(final) as tmp:
            _write_model_files(tmp, model, config, tokenizer, state, head, weights)
            if training is not None:
                torch.save(training, tmp / RunFolder.TRAINING)
            if optimizer_shards is not None:
                optimizer_shards.rename(tmp / OPTIMIZER_SHARDS)
    except (OSError, SafetensorError, RuntimeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:160]
        raise GptError(f"cannot write checkpoint {final} ({reason}); free disk space or choose another "
                       "train.out_dir, then resume: the previous checkpoint is intact") from None


def save_checkpoint(run: RunFolder, model: GPT, config: Config, tokenizer: TokenizerSpec, state: RunState,
                    training: dict, keep_last: int, head: torch.nn.Module | None = None,
                    weights: dict[str, torch.Tensor] | None = None, optimizer_shards: Path | None = None) -> Path:
    """Write ckpt_<iter>/ atomically, point `latest` at it, delete all but the newest `keep_last`.
    `state` goes to state.json (readable); `training` (optimizer, scaler, per-rank sampler and
    RNG states) to optimizer.pt; a task run's `head` goes beside the model's weights. An FSDP
    run gives its gathered `weights` and the folder `stage_optimizer_shards` wrote."""
    final = run.checkpoint(state.iter)
    # An iteration already saved (a resumed run stopped before its first step) is kept:
    # deleting it to write it again would leave `latest` dangling for a moment.
    if not final.is_dir():
        _write_folder(final, model, config, tokenizer, state, training, head, weights, optimizer_shards)
    link_atomically(run.latest, final.name)
    for old in run.checkpoints()[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_folder(folder: Path, model: GPT, config: Config, tokenizer: TokenizerSpec, state: RunState,
                      weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write (or replace) a weights-only checkpoint folder, which `gpt sample`, `gpt info` and
    `train.init_from` accept; `weights` (an int8 checkpoint's tensors) instead of the model's."""
    with replacing_folder(folder) as tmp:
        _write_model_files(tmp, model, config, tokenizer, state, weights=weights)


def save_best(run: RunFolder, model: GPT, config: Config, tokenizer: TokenizerSpec, state: RunState,
              head: torch.nn.Module | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Point `best` at a new complete best_<iter>/ folder, then delete the previous one. At
    every moment `best` is either the old complete folder or the new one."""
    final = run.best_folder(state.iter)
    if not final.is_dir():
        _write_folder(final, model, config, tokenizer, state, head=head, weights=weights)
    link_atomically(run.best, final.name)
    for old in run.best_folders():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the checkpoint of a run folder that `latest` points to
    (the newest complete one if `latest` is missing)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    if not path.exists():
        raise GptError(f"checkpoint not found: {path}; give a run folder (train.out_dir) or a ckpt_* folder")
    run = RunFolder(path)
    if (run.latest / WEIGHTS).is_file():
        return run.latest.resolve()
    complete = run.checkpoints()
    if not complete:
        raise GptError(f"{path} holds no complete checkpoint; train first or give a ckpt_* folder")
    return complete[-1]


# A run folder resolves to its newest complete checkpoint, so moving a damaged one aside is how
# --resume (which takes the run folder) goes on from the one before.
ANOTHER_CHECKPOINT = "give another ckpt_* folder, or move this one out of the run to go on from the one before"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Config, tokenizer and state of a checkpoint (weights are loaded by `load_model`)."""
    folder = find_checkpoint(path)
    try:
        config = build_config(read_yaml(folder / RunFolder.CONFIG))
        tokenizer_json = json.loads((folder / RunFolder.TOKENIZER).read_text(encoding="utf-8"))
        tokenizer = TokenizerSpec.from_json(tokenizer_json, str(folder / RunFolder.TOKENIZER), folder,
                                            RunFolder.TOKENIZER_FILE)
        state_json = json.loads((folder / RunFolder.STATE).read_text(encoding="utf-8"))
        state = RunState.from_json(state_json, str(folder / RunFolder.STATE))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, GptError) as exc:
        raise GptError(f"checkpoint {folder} is incomplete or corrupt ({exc}); {ANOTHER_CHECKPOINT}") from None
    if config.model.vocab_size is None:
        raise GptError(f"checkpoint {folder} is corrupt (no vocab_size in {RunFolder.CONFIG}); {ANOTHER_CHECKPOINT}")
    return Checkpoint(path=folder, config=config, tokenizer_spec=tokenizer, state=state)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's model.safetensors (the model's, and a task head's under HEAD_PREFIX)."""
    try:
        return load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise GptError(f"{folder / WEIGHTS} cannot be read ({exc}); the checkpoint is corrupt") from None


def holds_int8(folder: Path) -> bool:
    """Whether a checkpoint's weights are int8 (`gpt convert quantize`), from the file's header alone."""
    try:
        with safe_open(str(folder / WEIGHTS), "pt") as tensors:
            return any(tensors.get_slice(name).get_dtype() == "I8" for name in tensors.keys())
    except (OSError, SafetensorError) as exc:
        raise GptError(f"{folder / WEIGHTS} cannot be read ({exc}); the checkpoint is corrupt") from None


def split_head(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the model's weights, the task head's weights without their prefix)."""
    head = {k[len(HEAD_PREFIX):]: v for k, v in weights.items() if k.startswith(HEAD_PREFIX)}
    return {k: v for k, v in weights.items() if not k.startswith(HEAD_PREFIX)}, head


def assign_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load `weights` into `module` strictly. A module on the meta device gets the tensors
    assigned (no copy); a real one is copied into, so that an optimizer already holding its
    parameters keeps updating the same tensors."""
    refuse_int8(weights, source)
    if isinstance(module, GPT) and module.config.tie_embeddings and "wte.weight" in weights:
        weights = {**weights, "lm_head.weight": weights["wte.weight"]}
    try:
        module.load_state_dict(weights, strict=True, assign=next(module.parameters()).is_meta)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise GptError(f"{source}: weights do not fit the model config ({first})") from None
    if isinstance(module, GPT):
        module.tie_weights()


def refuse_int8(weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Training (init_from, --resume) and task heads need the weights an int8 checkpoint rounded away."""
    if is_int8(weights):
        raise GptError(f"{source} holds int8 weights (gpt convert quantize), which only the reading verbs take "
                       "(sample, chat, eval, next, ...); train or classify from the checkpoint it was made from")


def load_weights(model: GPT, folder: Path, head: torch.nn.Module | None = None) -> None:
    """Load a checkpoint's weights into `model` and, given one, a task head. Without a head
    the task head's weights are skipped: the language model of a task run still samples."""
    weights, head_weights = split_head(read_weights(folder))
    assign_weights(model, weights, folder)
    if head is not None:
        if not head_weights:
            raise GptError(f"{folder} holds no task head; fine-tune it for a task first (a task: section)")
        assign_weights(head, head_weights, folder)


def load_model(checkpoint: Checkpoint, device: str | torch.device = "cpu", keep_int8: bool = False) -> GPT:
    """Build the checkpoint's model on the meta device (no allocation) and assign its weights.
    An int8 checkpoint's model keeps its `Int8Linear` layers with `keep_int8` (for
    `gpt.inference.weights.prepare_weights`), else they are widened to fp32."""
    with torch.device("meta"):
        model = GPT(checkpoint.config.model)
    weights, _ = split_head(read_weights(checkpoint.path))
    if not is_int8(weights):
        assign_weights(model, weights, checkpoint.path)
        return model.to(device)
    model = load_int8(model, weights, str(checkpoint.path))
    return (model if keep_int8 else dequantize_linears(model)).to(device)


def load_training_state(folder: Path) -> dict[str, Any]:
    """Optimizer, scaler and per-rank sampler and RNG states."""
    state = safe_torch_load(folder / RunFolder.TRAINING)
    if not isinstance(state, dict):
        raise GptError(f"{folder / RunFolder.TRAINING} was refused: not a checkpoint's training state")
    return state


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, which refuses anything but tensors and plain
    containers, so a tampered file cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or hostile file can fail anywhere in torch's unpickler
        raise GptError(f"{path} was refused: not a safe checkpoint file ({_load_failure(path, exc)})") from None


def _load_failure(path: Path, exc: Exception) -> str:
    """Why torch.load refused a file, in a few words: torch's own message runs to paragraphs."""
    blocked = re.search(r"GLOBAL (\S+)", str(exc))
    if blocked:
        return f"it names {blocked.group(1)}, which loading would import and could run"
    if not zipfile.is_zipfile(path):
        return "not written by torch.save, or damaged"
    return "damaged: torch cannot read it"


# ----------------------------------------------------------------------------- sharded optimizer state (FSDP)

def stage_optimizer_shards(run: RunFolder, iteration: int, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, dist: distributed.Dist) -> Path:
    """Every rank writes its part of the optimizer state into a hidden folder beside the
    checkpoint (rank 0 writes the index last); rank 0's `save_checkpoint` then moves it into
    the new checkpoint. Every rank must call this."""
    folder = run.optimizer_staging(iteration)
    if dist.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # what an interrupted save left
    distributed.barrier(dist)
    try:
        dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=folder)
    except Exception as exc:  # DCP wraps each rank's OSError in its own exception type
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise GptError(f"cannot write checkpoint shards to {folder} ({reason}); free disk space or choose "
                       "another train.out_dir, then resume: the previous checkpoint is intact") from None
    return folder


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                   training: dict[str, Any]) -> None:
    """Restore the optimizer of `model` (plain, DDP's inner module or FSDP-sharded) from a
    checkpoint: its DCP `optimizer/` folder (resharded to this run's ranks) or optimizer.pt."""
    if (folder / OPTIMIZER_SHARDS).is_dir():
        reader = _SafeReader(folder / OPTIMIZER_SHARDS)
        reader.read_metadata()  # refuses a tampered index with its own message (DCP would wrap it)
        state = get_optimizer_state_dict(model, optimizer)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(),
                         no_dist=not torch.distributed.is_initialized())
        except Exception as exc:  # a damaged folder fails anywhere in DCP's reader
            raise GptError(f"{folder / OPTIMIZER_SHARDS} cannot be read ({type(exc).__name__}); "
                           "the checkpoint is corrupt, resume from another one") from None
        set_optimizer_state_dict(model, optimizer, state)
    elif "optimizer" in training and any(isinstance(p, DTensor) for p in model.parameters()):
        # A plain run's optimizer.pt keys its state by parameter index; FSDP needs names.
        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        saved = training["optimizer"]
        by_name = {"state": {order[i]: s for i, s in saved["state"].items()},
                   "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    elif "optimizer" not in training:
        raise GptError(f"{folder} was written by an older version of gpt and cannot be resumed; "
                       f"start a new run with train.init_from={folder} to keep its weights")
    else:
        optimizer.load_state_dict(training["optimizer"])


# What a DCP index (.metadata, a pickle) may name: DCP's own metadata records and torch's
# plain value types. Anything else is refused, so a tampered index cannot run code.
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = ((module, name) in _DCP_GLOBALS or module == "torch.distributed.checkpoint.metadata"
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the index read by `_DcpUnpickler` instead of plain pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as file:
                metadata = _DcpUnpickler(file).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise GptError(f"{path} was refused: not a checkpoint index ({exc})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner unpickles non-tensor values (learning rates, betas) with
    weights_only=False; here they are first read with weights_only=True, which admits only
    plain values, and handed on re-serialised."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        checked = torch.load(value, weights_only=True)
        buffer = io.BytesIO()
        torch.save(checked, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)
