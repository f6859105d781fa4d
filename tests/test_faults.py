"""Nothing is lost: kill -9 at random moments, full disks, and a second process on the same folder."""

import errno
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, SHAKESPEARE, tiny_config

import gpt.checkpoint
import gpt.data.shards
from gpt.checkpoint import load_model, load_training_state, read_checkpoint
from gpt.data.formats import RunFolder
from gpt.data.prepare import PrepareOptions, prepare
from gpt.data.shards import load_dataset
from gpt.durable import FolderLock, replacing_folder
from gpt.errors import GptError
from gpt.training.loop import train
from gpt.training.metrics import MetricsLog, read_metrics

LOGGED = ("iter", "tokens", "loss", "lr", "grad_norm", "eval_train_loss", "val_loss")


# ----------------------------------------------------------------------------- a second process

def test_a_second_run_on_an_out_dir_in_use_is_refused(char_data, tmp_path):
    config = tiny_config(char_data, tmp_path / "run", max_iters=2)
    with FolderLock(RunFolder(tmp_path / "run").lock, "train.out_dir"):
        with pytest.raises(GptError, match=r"train.out_dir .* is in use by pid \d+ on "):
            train(config)
    assert train(config) == 0 and not RunFolder(tmp_path / "run").lock.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(char_data, tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.lock.write_text("pid 999999 on elsewhere\n")
    assert train(tiny_config(char_data, run.root, max_iters=2)) == 0
    assert "taking over the lock of train.out_dir" in capsys.readouterr().err
    assert read_checkpoint(run.root).state.iter == 2


def test_a_second_prepare_into_the_same_folder_is_refused(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("some text\n" * 50)
    out = tmp_path / "data"
    with FolderLock(tmp_path / ".data.lock", "dataset folder"):
        with pytest.raises(GptError, match="is in use by pid"):
            prepare(PrepareOptions(sources=[str(corpus)], tokenizer="byte", out=str(out), workers=1))
    assert not out.exists()


# ----------------------------------------------------------------------------- full disks

def _fail_on_call(n: int, error: int):
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        if len(calls) >= n:
            raise OSError(error, "No space left on device" if error == errno.ENOSPC else "Permission denied")
        return original(*args, **kwargs)

    original = gpt.checkpoint.save_file
    return fail


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_previous(char_data, tmp_path, monkeypatch,
                                                                                  error):
    monkeypatch.setattr(gpt.checkpoint, "save_file", _fail_on_call(3, error))  # best and ckpt at 10, then 20
    config = tiny_config(char_data, tmp_path / "run", max_iters=30, eval_interval=10, ckpt_interval=10)
    with pytest.raises(GptError, match=r"cannot write checkpoint .*_000020 \(.*\); free disk space") as info:
        train(config)
    assert "\n" not in str(info.value)
    run = RunFolder(tmp_path / "run")
    assert [p.name for p in run.checkpoints()] == ["ckpt_000010"]
    assert not list(run.root.glob("*.tmp"))
    assert load_model(read_checkpoint(run.root)) is not None
    monkeypatch.undo()
    assert train(tiny_config(char_data, run.root, max_iters=30, eval_interval=10, ckpt_interval=10),
                 resume=True) == 0


def test_a_full_disk_while_writing_metrics_stops_the_run(char_data, tmp_path, monkeypatch):
    original = open

    def full_disk_for_metrics(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.csv") and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk_for_metrics)
    with pytest.raises(GptError, match=r"cannot write .*metrics.csv \(No space left on device\)"):
        train(tiny_config(char_data, tmp_path / "run", max_iters=4))


@pytest.fixture
def fsynced(monkeypatch):
    """The paths os.fsync was called on (resolved when it was called), in order."""
    paths = []
    original = os.fsync

    def record(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return original(fd)

    monkeypatch.setattr(os, "fsync", record)
    return paths


def test_metrics_csv_is_rewritten_durably_with_its_folder(tmp_path, fsynced):
    MetricsLog(RunFolder(tmp_path), None, tensorboard=False)
    assert (tmp_path / "metrics.csv").read_text().startswith("iter,tokens,")
    assert fsynced[-1] == str(tmp_path)  # the rename is durable only once the folder is synced
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_replaced_folder_is_synced_whole_before_and_after_its_rename(tmp_path, fsynced):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with replacing_folder(final) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "new.txt").write_text("new")  # a plain write: the swap syncs it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (final / "sub" / "new.txt").read_text() == "new" and not (final / "old.txt").exists()
    assert {str(tmp / "sub" / "new.txt"), str(tmp / "sub"), str(tmp)} <= set(fsynced) and fsynced[-1] == str(tmp_path)


def test_a_full_disk_while_writing_shards_leaves_nothing(tmp_path, monkeypatch, cli):
    def full(self, tokens):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / "x.bin"))

    monkeypatch.setattr(gpt.data.shards.ShardWriter, "write", full)
    corpus = tmp_path / "a.txt"
    corpus.write_text("some text\n" * 50)
    code, _, err = cli("prepare", corpus, "--tokenizer", "byte", "--out", tmp_path / "out", "--workers", "1")
    assert code == 2 and "No space left on device; free disk space" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ----------------------------------------------------------------------------- kill -9

def _kill_config(tmp_path, data_dir, out_dir) -> str:
    train = {"out_dir": str(out_dir), "device": "cpu", "compile": False, "batch_size": 4, "max_iters": 240,
             "lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 5, "eval_interval": 7, "eval_iters": 2,
             "ckpt_interval": 3, "keep_last": 2, "log_interval": 1}
    path = tmp_path / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny", "block_size": 32, "dropout": 0.1},
                                    "data": {"dir": str(data_dir)}, "train": train}))
    return str(path)


def _gpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt.cli", *args]


def _assert_every_visible_checkpoint_is_complete(run: RunFolder) -> None:
    for folder in run.checkpoints():
        load_model(read_checkpoint(folder))
        assert "ranks" in load_training_state(folder)
    if run.latest.is_symlink():
        assert read_checkpoint(run.root).path == run.latest.resolve()
    if run.best.is_symlink():
        load_model(read_checkpoint(run.best))


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(char_data, tmp_path):
    straight = _kill_config(tmp_path, char_data, tmp_path / "straight")
    subprocess.run(_gpt("train", straight), cwd=REPO, check=True, capture_output=True)
    config = _kill_config(tmp_path, char_data, tmp_path / "killed")
    run = RunFolder(tmp_path / "killed")
    chance = random.Random(20261124)
    kills = 0
    while kills < 10:
        resume = ["--resume"] if run.checkpoints() else ["--overwrite"]
        proc = subprocess.Popen(_gpt("train", config, *resume), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            if line.startswith("iter "):
                break
        try:
            proc.wait(timeout=chance.uniform(0.0, 0.3))
        except subprocess.TimeoutExpired:
            proc.kill()
            kills += 1
        proc.wait()
        _assert_every_visible_checkpoint_is_complete(run)
        assert proc.returncode != 0, "the run finished before it could be killed ten times"
    finished = subprocess.run(_gpt("train", config, "--resume"), cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = {name: [{k: r[k] for k in LOGGED} for r in read_metrics(tmp_path / name / "metrics.csv")]
            for name in ("straight", "killed")}
    assert [int(r["iter"]) for r in rows["killed"]] == list(range(1, 241))
    assert rows["killed"] == rows["straight"]
    a, b = (load_model(read_checkpoint(tmp_path / name)) for name in ("straight", "killed"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert read_checkpoint(run.best).state == read_checkpoint(tmp_path / "straight" / "best").state


@pytest.mark.slow
def test_kill_9_during_prepare_leaves_the_previous_dataset_or_none(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8") * 3)
    out = tmp_path / "data"
    previous = prepare(PrepareOptions(sources=[str(SHAKESPEARE)], tokenizer="gpt2", out=str(out), workers=1))
    before = load_dataset(previous).meta
    chance = random.Random(7)
    args = _gpt("prepare", str(corpus), "--tokenizer", "gpt2", "--out", str(out), "--overwrite", "--workers", "1")
    for _ in range(5):
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=chance.uniform(1.0, 6.0))
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.wait()
        meta = load_dataset(out).meta  # a complete dataset, old or new, never a partial one
        assert meta == before or meta.splits["train"].tokens > before.splits["train"].tokens
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    assert load_dataset(out).meta.splits["train"].tokens > before.splits["train"].tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data"]  # temporary folders cleaned up
    shutil.rmtree(out)
