"""Shared fixtures: tiny corpora, tiny datasets and an in-process CLI runner."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from gpt.cli import main
from gpt.config import build_config
from gpt.data.prepare import PrepareOptions, prepare

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (scripts import their siblings, so scripts/ is on the path
    while it loads)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return module


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `gpt ARGS...` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["gpt", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


def shakespeare_data(folder: Path, chars: int, tokenizer: str) -> Path:
    """A dataset of the first `chars` characters of tiny Shakespeare, with a val split."""
    text = folder / f"shakespeare_{chars}.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return prepare(PrepareOptions(sources=[str(text)], tokenizer=tokenizer, out=str(folder / tokenizer), workers=1))


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """The first 100 kB of tiny Shakespeare, char-level, with a val split."""
    return shakespeare_data(tmp_path_factory.mktemp("data"), 100_000, "char")


def tiny_config(data_dir: Path, out_dir: Path, **train):
    """A 2-layer model and a short schedule that trains in seconds on a CPU."""
    settings = dict(out_dir=str(out_dir), device="cpu", batch_size=4, max_iters=20, lr=3e-3, min_lr=3e-4,
                    warmup_iters=5, eval_interval=10, eval_iters=2, ckpt_interval=10, log_interval=1,
                    compile=False)
    settings.update(train)
    return build_config({"model": {"preset": "tiny", "block_size": 32, "dropout": 0.1},
                         "data": {"dir": str(data_dir)}, "train": settings})


def tiny_yaml(tmp_path, data_dir, **train) -> str:
    """A config file for subprocess runs: the tiny model, 4 x 32 tokens per step."""
    settings = {"out_dir": str(tmp_path / "run"), "device": "cpu", "batch_size": 4, "eval_iters": 2,
                "log_interval": 1, **train}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny", "block_size": 32}, "data": {"dir": str(data_dir)},
                                    "train": settings}))
    return str(path)
