"""`gpt train`: a config file and overrides -> the one training loop (gpt.training.loop)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from gpt.cli.app import app
from gpt.config import SECTIONS, Config, apply_overrides, build_config, config_help, load_config, to_dict
from gpt.errors import GptError


@app.command(epilog="Config keys:\n\n" + config_help().replace("\n", "\n\n"))
def train(
    args: List[str] = typer.Argument(None, help="CONFIG.yaml and/or section.key=value overrides; with --resume "
                                     "the run folder may stand in place of the config."),
    resume: bool = typer.Option(False, help="Continue the run in train.out_dir (or the given run folder)."),
    overwrite: bool = typer.Option(False, help="Start over in a train.out_dir that already holds a run."),
    show_config: bool = typer.Option(False, help="Print every setting at start (default: those that differ from "
                                     "the defaults; all are in train.out_dir/config.yaml)."),
) -> None:
    """Train a model: gpt train configs/shakespeare_char.yaml train.max_iters=500"""
    from gpt.training.loop import train as run_train

    config = _train_config(list(args or []), resume)
    code = run_train(config, resume=resume, overwrite=overwrite, show_config=show_config)
    raise typer.Exit(code)


def _train_config(args: List[str], resume: bool) -> Config:
    overrides = [a for a in args if "=" in a]
    paths = [a for a in args if "=" not in a]
    for arg in paths[1:]:
        if arg.partition(".")[0] in SECTIONS and not Path(arg).exists():
            raise GptError(f"override {arg!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
    if len(paths) > 1:
        raise GptError(f"expected one config file, got {len(paths)}: {' '.join(paths)}")
    if not paths:
        raise GptError("give a config file, e.g. gpt train configs/shakespeare_char.yaml "
                       "(or gpt train --resume RUN_DIR)")
    path = Path(paths[0])
    if resume and not path.exists():
        raise GptError(f"{path} does not exist; --resume takes a run folder (train.out_dir) or the run's config file")
    if path.is_dir():
        if not resume:
            raise GptError(f"{path} is a folder; to continue that run use gpt train --resume {path}")
        from gpt.checkpoint import read_checkpoint
        from gpt.data.formats import RunFolder

        if not RunFolder(path).holds_run() and RunFolder(path.parent).holds_run():
            raise GptError(f"{path} is one checkpoint of the run in {path.parent}; --resume takes the run folder: "
                           f"gpt train --resume {path.parent} (it goes on from the newest complete checkpoint)")
        saved = read_checkpoint(path).config
        raw = apply_overrides(to_dict(saved), [f"train.out_dir={path}", *overrides])
        return build_config(raw)
    return load_config(path, overrides, say=print)
