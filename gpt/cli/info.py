"""`gpt info`: describe a dataset, a run or a model preset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from gpt.cli.app import app
from gpt.cli.data import print_dataset
from gpt.config import build_config
from gpt.errors import GptError


@app.command()
def info(
    path: Optional[str] = typer.Argument(None, help="A dataset folder (meta.json) or a run / checkpoint folder."),
    preset: Optional[str] = typer.Option(None, help="Describe a model preset instead (e.g. gpt2, gpt3-175b)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (for scripts)."),
    verify: bool = typer.Option(False, "--verify", help="Read every token of a dataset and check its ids against "
                                "the vocabulary and meta.json (opening a dataset reads only the shard headers)."),
) -> None:
    """Describe a dataset, a training run or a model preset (parameters and FLOPs per token)."""
    if (path is None) == (preset is None):
        raise GptError("give a dataset / run / checkpoint folder or --preset NAME (one of them)")
    if verify and (path is None or not (Path(path) / "meta.json").is_file()):
        raise GptError("--verify checks a dataset folder (one with a meta.json); give one")
    if preset is not None:
        model = build_config({"model": {"preset": preset}}).model
        if model.vocab_size is None:
            raise GptError(f"preset {preset} takes its vocabulary size from the data, so its size is not fixed; "
                           "describe a run or dataset instead")
        _print_info({"preset": preset, "model": _model_info(model)}, as_json)
        return
    folder = Path(path)
    if (folder / "meta.json").is_file():
        from gpt.data.shards import load_dataset

        dataset = load_dataset(folder, verify=verify)
        if verify and not as_json:
            shards = sum(len(split.shards) for split in dataset.meta.splits.values())
            print(f"verified: every token of the {shards} shard(s) is below vocab_size {dataset.vocab_size} "
                  "and matches meta.json")
        if as_json:
            print(json.dumps({"dataset": str(dataset.folder), **dataset.meta.to_json()}, ensure_ascii=False))
        else:
            print_dataset(dataset)
        return
    from gpt.checkpoint import holds_int8, read_checkpoint
    from gpt.data.formats import RunFolder

    ckpt = read_checkpoint(folder)
    from gpt.inference.classify import describe_task

    _print_info({"checkpoint": str(ckpt.path), "state": ckpt.state.to_json(), "tokenizer": ckpt.tokenizer_spec.name,
                 "tokenizer_sha256": ckpt.tokenizer_spec.to_json().get("sha256"),
                 "weights": "int8" if holds_int8(ckpt.path) else "fp32",
                 "model": _model_info(ckpt.config.model), "task": describe_task(ckpt),
                 "checkpoints": [other.name for other in RunFolder(folder).checkpoints()]}, as_json)


def _model_info(model) -> dict:
    """The model's settings with its parameter count and FLOPs per token (counted on the meta device)."""
    from gpt.model import size_on_meta

    params, flops = size_on_meta(model)
    return {**dataclasses.asdict(model), "params": params, "flops_per_token": flops}


def _architecture(model: dict) -> str:
    """The block's choices in words: norm, activation and the options off by default."""
    parts = [f"{model['norm_position']}-{model['norm']}", f"{model['activation']} MLP",
             "qk-norm" if model["qk_norm"] else None,
             f"logits soft-capped at {model['logit_softcap']:g}" if model["logit_softcap"] else None,
             "zero-initialised output projections" if model["zero_init_proj"] else None,
             "tied head" if model["tie_embeddings"] else "untied head"]
    return ", ".join(p for p in parts if p)


def _evaluation(state: dict) -> str:
    """The last evaluation's losses and the best one, in words (state.json holds them raw)."""
    losses = state.get("losses") or {}
    bests = {split: state.get(f"best_{split}_loss") for split in ("val", "train")}
    best = next((f" (best {split} {loss:.4f})" for split, loss in bests.items() if isinstance(loss, (int, float))), "")
    if not losses:
        return f"no evaluation recorded{best}"
    return "evaluation losses: " + ", ".join(f"{split} {loss:.4f}" for split, loss in losses.items()) + best


def _print_info(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
        return
    model, state = info["model"], info.get("state", {})
    if "checkpoint" in info:
        print(f"checkpoint {info['checkpoint']}: iter {state.get('iter')}, tokens {state.get('tokens', 0):,}")
    else:
        print(f"preset {info['preset']}")
    print(f"  model: {model['n_layer']} layers, {model['n_head']} heads, {model['n_embd']} wide, context "
          f"{model['block_size']}, vocab {model['vocab_size']}, {model['pos_encoding']} positions")
    print(f"  {_architecture(model)}")
    params = model["params"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    print(f"  {params:,} parameters ({size}), {model['flops_per_token']:.3g} training FLOPs per token "
          "(forward + backward at full context)")
    if "checkpoint" in info:
        sha = f" (tokenizer.json sha256 {info['tokenizer_sha256'][:12]})" if info["tokenizer_sha256"] else ""
        print(f"  tokenizer: {info['tokenizer']}{sha}; {_evaluation(state)}")
        if info["weights"] == "int8":
            print(f"  weights: int8 with per-row scales (gpt convert quantize of {state.get('converted_from')}); "
                  "read-only: train from the checkpoint it was made from")
    if info.get("task"):
        print(f"  {info['task']}")
    for name in info.get("checkpoints", []):
        print(f"  {name}")
