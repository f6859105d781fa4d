"""Checkpoints: atomic writes, retention, safe loading.

Layout of a run folder (see DESIGN.md):
    ckpt_000500/  model.safetensors, config.yaml, tokenizer.json, state.json, optimizer.pt
    latest -> ckpt_000500
    best/         model.safetensors, config.yaml, tokenizer.json, state.json

A checkpoint is written to `ckpt_N.tmp/`, fsynced and renamed; only then does `latest` move.
The rename is the completeness marker, so a crash at any moment leaves the previous
checkpoint intact. Nothing is unpickled: weights are safetensors and the optimizer file is
read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.config import Config, build_config, dump_yaml, read_yaml
from gpt.errors import GptError
from gpt.model import GPT
from gpt.shards import fsync_path
from gpt.tokenizer import Tokenizer, tokenizer_from_json

CKPT_PATTERN = re.compile(r"^ckpt_(\d{6,})$")
WEIGHTS = "model.safetensors"


@dataclass
class Checkpoint:
    path: Path
    config: Config
    tokenizer_info: dict[str, Any]
    state: dict[str, Any]

    @property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_json(self.tokenizer_info)


def _write_file(path: Path, data: bytes | str) -> None:
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _weights(model: GPT) -> dict[str, torch.Tensor]:
    """State dict without the tied output matrix (safetensors stores no shared tensors)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return {k: v.detach().contiguous() for k, v in state.items()}


def _write_model_files(folder: Path, model: GPT, config: Config, tokenizer_info: dict, state: dict) -> None:
    folder.mkdir(parents=True)
    save_file(_weights(model), str(folder / WEIGHTS))
    fsync_path(folder / WEIGHTS)
    _write_file(folder / "config.yaml", dump_yaml(config))
    _write_file(folder / "tokenizer.json", json.dumps(tokenizer_info, ensure_ascii=False) + "\n")
    _write_file(folder / "state.json", json.dumps(state, indent=1) + "\n")


def _atomic_link(out_dir: Path, name: str, target: str) -> None:
    tmp = out_dir / f".{name}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, out_dir / name)
    fsync_path(out_dir)


def save_checkpoint(out_dir: Path, model: GPT, config: Config, tokenizer_info: dict, state: dict,
                    training_state: dict, keep_last: int) -> Path:
    """Write ckpt_<iter>/ atomically, point `latest` at it, delete all but the newest `keep_last`."""
    name = f"ckpt_{state['iter']:06d}"
    final, tmp = out_dir / name, out_dir / f"{name}.tmp"
    if final.is_dir():
        # This iteration is already saved (a resumed run stopped before its first step).
        # Deleting it to write it again would leave `latest` dangling for a moment.
        _atomic_link(out_dir, "latest", name)
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    _write_model_files(tmp, model, config, tokenizer_info, state)
    torch.save(training_state, tmp / "optimizer.pt")
    fsync_path(tmp / "optimizer.pt")
    fsync_path(tmp)
    tmp.rename(final)
    fsync_path(out_dir)
    _atomic_link(out_dir, "latest", name)
    for old in complete_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(out_dir: Path, model: GPT, config: Config, tokenizer_info: dict, state: dict) -> None:
    """Replace best/ with these weights (new copy written first, then swapped in)."""
    save_model_folder(out_dir / "best", model, config, tokenizer_info, state)


def save_model_folder(folder: Path, model: GPT, config: Config, tokenizer_info: dict, state: dict) -> None:
    """Write (or replace) a weights-only checkpoint folder like best/, which `gpt sample`,
    `gpt info` and `train.init_from` accept."""
    with replacing_folder(folder) as tmp:
        _write_model_files(tmp, model, config, tokenizer_info, state)


@contextlib.contextmanager
def replacing_folder(final: Path) -> Iterator[Path]:
    """Yield a path beside `final` to write a new folder at. When the block succeeds the new
    folder is fsynced and replaces `final` (an old one is moved aside first, then deleted);
    when it fails the new folder is removed. Readers see the old folder or the new one,
    never a half-written one."""
    tmp, old = final.with_name(f"{final.name}.tmp"), final.with_name(f"{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (unfinished ones still end in .tmp)."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_PATTERN.match(p.name).group(1)))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    if not path.exists():
        raise GptError(f"checkpoint not found: {path}; give a run folder (train.out_dir) or a ckpt_* folder")
    complete = complete_checkpoints(path)
    if not complete:
        raise GptError(f"{path} holds no complete checkpoint; train first or give a ckpt_* folder")
    return complete[-1]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Config, tokenizer and state of a checkpoint (weights are loaded by `load_model`)."""
    folder = find_checkpoint(path)
    try:
        config = build_config(read_yaml(folder / "config.yaml"))
        tokenizer_info = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, GptError) as exc:
        raise GptError(f"checkpoint {folder} is incomplete or corrupt ({exc}); use another checkpoint") from None
    return Checkpoint(path=folder, config=config, tokenizer_info=tokenizer_info, state=state)


def load_weights(model: GPT, folder: Path) -> None:
    """Load a checkpoint folder's safetensors weights into `model` (see `assign_weights`)."""
    assign_weights(model, read_weights(folder), folder)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder's model.safetensors, by name."""
    try:
        return load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise GptError(f"{folder / WEIGHTS} cannot be read ({exc}); the checkpoint is corrupt") from None


def assign_weights(model: GPT, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load named tensors into `model`. A model on the meta device gets the tensors assigned
    (no copy); a real one is copied into, so that an optimizer already holding its
    parameters keeps updating the same tensors."""
    if model.config.tie_embeddings and "wte.weight" in weights:
        weights = {**weights, "lm_head.weight": weights["wte.weight"]}
    try:
        model.load_state_dict(weights, strict=True, assign=next(model.parameters()).is_meta)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise GptError(f"{source}: weights do not fit the model config ({first})") from None
    model.tie_weights()


def load_model(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> GPT:
    """Build the checkpoint's model on the meta device (no allocation) and assign its weights."""
    with torch.device("meta"):
        model = GPT(checkpoint.config.model)
    load_weights(model, checkpoint.path)
    return model.to(device)


def load_training_state(folder: Path) -> dict[str, Any]:
    """Optimizer, scaler and RNG states."""
    return safe_torch_load(folder / "optimizer.pt")


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, which refuses anything but tensors and plain
    containers, so a tampered file cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GptError(f"{path} was refused: not a safe checkpoint file ({reason[:160]})") from None
