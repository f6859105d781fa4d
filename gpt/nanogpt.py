"""nanoGPT checkpoints in: a ckpt.pt (GPT-2's tensor names, nn.Linear projections) and, for a
character-level run, its meta.pkl. The ckpt.pt is read with `torch.load(weights_only=True)`; the
meta.pkl goes through an unpickler that builds nothing but dicts, lists, strings and ints.
Nothing here uses the network.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import safe_torch_load
from gpt.config import ModelConfig, build_config
from gpt.convert import GPT2_VOCAB, ImportedModel, from_gpt2_tensors
from gpt.data.formats import RunState
from gpt.data.tokenizer import CharTokenizer, TokenizerSpec
from gpt.errors import GptError


def read_nanogpt(ckpt_path: str | Path, meta_path: str | Path | None = None) -> ImportedModel:
    """A nanoGPT ckpt.pt and, for character-level runs, its meta.pkl (stoi/itos)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise GptError(f"{ckpt_path} not found; give the ckpt.pt of a nanoGPT run (its out_dir)")
    ckpt = safe_torch_load(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or "model_args" not in ckpt:
        raise GptError(f"{ckpt_path} is not a nanoGPT checkpoint (no model and model_args); give nanoGPT's ckpt.pt")
    args = ckpt["model_args"] if isinstance(ckpt["model_args"], dict) else {}
    # nanoGPT: learned positions, pre-norm LayerNorm (eps 1e-5), exact GELU, tied embeddings.
    model = {key: args.get(key) for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    model.update(bias=args.get("bias", True), activation="gelu", norm_eps=1e-5, pos_encoding="learned",
                 norm="layernorm", norm_position="pre", tie_embeddings=True, dropout=0.0)
    try:
        config = build_config({"model": model}).model
    except GptError as exc:
        raise GptError(f"{ckpt_path}: model_args: {exc}") from None
    weights = from_gpt2_tensors(ckpt["model"], config, conv1d=False, source=str(ckpt_path))
    if meta_path is not None:
        chars = _char_vocab(Path(meta_path))
        tokenizer = CharTokenizer("".join(chars))
        # Our char ids follow the sorted vocabulary; take each character's row from nanoGPT's id.
        rows = [chars.index(ch) for ch in tokenizer.vocab]
        if len(rows) != config.vocab_size:  # nanoGPT sizes a character model's vocabulary by its meta.pkl
            raise GptError(f"{meta_path} has {len(rows)} characters but the model {config.vocab_size} ids; "
                           "give the meta.pkl of the same run")
    elif config.vocab_size >= GPT2_VOCAB:
        tokenizer = TokenizerSpec("gpt2").build()
        # nanoGPT pads GPT-2's vocabulary (to 50304) for speed; the padding ids are never
        # produced by the tokenizer, and dropping their rows leaves every real logit unchanged.
        rows = list(range(GPT2_VOCAB))
    else:
        raise GptError(f"{ckpt_path}: vocab_size {config.vocab_size} is not GPT-2's; "
                       "for a character-level run pass its meta.pkl with --meta")
    weights, config = _keep_vocab_rows(weights, config, rows)
    iteration, best = _plain_number(ckpt.get("iter_num")), _plain_number(ckpt.get("best_val_loss"))
    state = RunState(iter=int(iteration) if isinstance(iteration, int) and iteration >= 0 else 0,
                     best_loss=float(best) if isinstance(best, (int, float)) else math.inf,
                     converted_from=str(ckpt_path))
    return ImportedModel(config, tokenizer.spec, weights, state)


def _plain_number(value: Any) -> Any:
    """nanoGPT keeps best_val_loss as a tensor; state.json wants plain numbers."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _keep_vocab_rows(weights: dict[str, torch.Tensor], config: ModelConfig,
                     rows: list[int]) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Keep (and order) the embedding and output rows of these token ids."""
    index = torch.tensor(rows)
    kept = {k: v[index].contiguous() if k in ("wte.weight", "lm_head.weight") else v for k, v in weights.items()}
    return kept, dataclasses.replace(config, vocab_size=len(rows))


PLAIN_ONLY = "a meta.pkl may hold only dicts, lists, strings and ints"


class _NamesCode(pickle.UnpicklingError):
    """A pickle that names a class or function (which unpickling would import and may run)."""


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings and numbers only: any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise _NamesCode(f"it names {module}.{name}")


def read_plain_pickle(path: Path) -> Any:
    """Unpickle a file that should hold only dicts, lists, strings and ints, or refuse it."""
    if not path.is_file():
        raise GptError(f"{path} not found; give the meta.pkl next to the run's data")
    try:
        value = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except _NamesCode as exc:
        raise GptError(f"{path} was refused: {exc}; {PLAIN_ONLY}") from None
    except Exception:  # a malformed pickle fails in many ways, with messages about its bytes
        raise GptError(f"{path} is not a pickle file, or a damaged one; give the meta.pkl of the run") from None
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend([*item.keys(), *item.values()])
        elif isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, (str, int)):
            raise GptError(f"{path} was refused: it holds a {type(item).__name__}; {PLAIN_ONLY}")
    return value


def _char_vocab(meta_path: Path) -> list[str]:
    """nanoGPT's characters in id order, from meta.pkl's itos (id -> character)."""
    meta = read_plain_pickle(meta_path)
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))) or not itos:
        raise GptError(f"{meta_path} has no itos mapping ids 0..N-1 to characters; give a character-level meta.pkl")
    chars = [itos[i] for i in range(len(itos))]
    if not all(isinstance(ch, str) and len(ch) == 1 for ch in chars) or len(set(chars)) != len(chars):
        raise GptError(f"{meta_path}: itos must map each id to a distinct single character")
    return chars
