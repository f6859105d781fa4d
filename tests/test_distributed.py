"""Multi-process training under torchrun on CPU (gloo): DDP and FSDP2 equivalence with one
process, sharded checkpoints, resuming under another world size, signals and failing ranks.
Each test starts real worker processes with a tiny model; they are slow by nature."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from conftest import REPO, tiny_yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from gpt.checkpoint import OPTIMIZER_SHARDS, load_model, load_optimizer, load_training_state, read_checkpoint
from gpt.config import load_config
from gpt.data.shards import BatchSampler
from gpt.errors import GptError
from gpt.model import GPT
from gpt.training import distributed
from gpt.training.metrics import read_metrics
from gpt.training.optim import make_optimizer
from gpt.training.trainer import check_parallel


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


# A worker that dies of a signal (SIGABRT inside gloo, say) prints its Python stacks first.
WORKER_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}


def gpt_train(config: str, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run `gpt train`, under torchrun when nproc > 1. A torchrun job whose worker was killed by
    a signal, or that hung, runs once more from the same run folder, with a warning that carries
    the first attempt's output: in CI a worker of a 3-step FSDP run once died of SIGABRT inside
    native code, and a worker of a finished run once hung in a native thread join after
    `destroy_process_group` (neither in dozens of runs here since); those are not what these
    tests check, a wrong result or a Python error still fails them."""
    command = ["-m", "gpt.cli", "train", config, *overrides]
    argv = torchrun(nproc, *command) if nproc > 1 else [sys.executable, *command]
    run = Path(yaml.safe_load(Path(config).read_text())["train"]["out_dir"])
    before = run.with_name(f"{run.name}.before")
    if nproc > 1 and run.exists():
        shutil.copytree(run, before, symlinks=True)  # `latest` and `best` stay links
    result = _job(argv, timeout=240)
    if nproc > 1 and "(exitcode: -" in result.stderr:
        warnings.warn(f"torchrun job run again after a worker died of a signal or hung:\n{job_errors(result)}",
                      stacklevel=2)
        shutil.rmtree(run, ignore_errors=True)
        if before.exists():
            before.rename(run)
        result = _job(argv, timeout=240)
    shutil.rmtree(before, ignore_errors=True)
    return result


def _job(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command; past `timeout` every process of the job is killed and the result says
    "(exitcode: -9)" as torchrun does for a worker killed by a signal. torchrun starts each
    worker in a session of its own, so a worker that outlives torchrun is found by a mark in its
    environment (a hung worker holds the output pipes open, and reading them would never end)."""
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(argv, cwd=REPO, env={**WORKER_ENV, "GPT_TEST_JOB": mark}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _marked(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\nthe job hung for {timeout:g} s and was killed (exitcode: -9)"
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _marked(mark: str) -> list[int]:
    """The processes whose environment holds GPT_TEST_JOB=mark (Linux's /proc)."""
    wanted, found = f"GPT_TEST_JOB={mark}".encode(), []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def job_errors(result: subprocess.CompletedProcess) -> str:
    """The end of what a failed job's workers printed and torchrun's line naming the rank that
    failed, without the launcher's traceback and exit-code table that would fill the message."""
    report = result.stderr.find("] failed (exitcode")
    if report < 0:
        return result.stderr[-4000:]
    line_start = result.stderr.rfind("\n", 0, report) + 1
    return result.stderr[:line_start][-4000:] + result.stderr[line_start:].split("\n")[0]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_disjoint_rows_that_make_up_the_one_process_batch(char_data, world_size):
    from gpt.data.shards import load_dataset

    shards = load_dataset(char_data).splits["train"]
    whole = BatchSampler(shards, 16, 2 * world_size, seed=[7, 0])
    parts = [BatchSampler(shards, 16, 2, seed=[7, 0], rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(3):
        x, y = whole.next_batch()
        drawn = [p.next_batch() for p in parts]
        assert torch.equal(torch.cat([d[0] for d in drawn]), x) and torch.equal(torch.cat([d[1] for d in drawn]), y)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(read_checkpoint(run).path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_twice_the_batch(char_data, tmp_path, parallel):
    """2 x batch 2 under torchrun == 1 x batch 4 on the same data: losses, weights, optimizer."""
    steps = dict(max_iters=4, eval_interval=2, ckpt_interval=4, grad_accum=2, dtype="float32")
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    one = tiny_yaml(tmp_path / "one", char_data, batch_size=4, **steps)
    two = tiny_yaml(tmp_path / "two", char_data, batch_size=2, parallel=parallel, **steps)
    assert gpt_train(one).returncode == 0
    result = gpt_train(two, nproc=2)
    assert result.returncode == 0, job_errors(result)
    assert f"parallel: {parallel} over 2 processes" in result.stdout and "= 8 |" in result.stdout
    rows = {name: read_metrics(tmp_path / name / "run" / "metrics.csv") for name in ("one", "two")}
    for column in ("loss", "val_loss", "grad_norm"):
        a = [float(r[column]) for r in rows["one"] if r.get(column)]
        b = [float(r[column]) for r in rows["two"] if r.get(column)]
        assert len(a) == len(b) > 0 and np.allclose(a, b, rtol=1e-4, atol=1e-5), column
    assert [r["tokens"] for r in rows["one"]] == [r["tokens"] for r in rows["two"]]
    w1, w2 = _weights(tmp_path / "one" / "run"), _weights(tmp_path / "two" / "run")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-5)
    moments = [_exp_avg(tmp_path / name / "run") for name in ("one", "two")]
    torch.testing.assert_close(moments[0], moments[1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_accumulates_micro_batches_locally_and_reduces_once_to_the_unsharded_gradients():
    result = subprocess.run(torchrun(2, str(REPO / "tests" / "fsdp_accumulation_rank.py")), cwd=REPO,
                            env=WORKER_ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "fsdp accumulation ok" in result.stdout, job_errors(result)


def _exp_avg(run: Path) -> torch.Tensor:
    """The first moment of the token embedding, loaded in this one process from whatever the
    checkpoint holds (optimizer.pt, or FSDP's sharded optimizer/ folder)."""
    checkpoint = read_checkpoint(run)
    model = load_model(checkpoint)
    tc = checkpoint.config.train
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), torch.device("cpu"))
    load_optimizer(model, optimizer, checkpoint.path, load_training_state(checkpoint.path))
    return optimizer.state[model.wte.weight]["exp_avg"].clone()


@pytest.mark.slow
def test_fsdp_checkpoint_is_sharded_samples_in_one_process_and_resumes_under_other_world_sizes(char_data, tmp_path):
    config = tiny_yaml(tmp_path, char_data, max_iters=3, eval_interval=3, ckpt_interval=3, parallel="fsdp",
                       batch_size=2)
    result = gpt_train(config, nproc=2)
    assert result.returncode == 0, job_errors(result)
    checkpoint = read_checkpoint(tmp_path / "run")
    shards = checkpoint.path / OPTIMIZER_SHARDS
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert "optimizer" not in load_training_state(checkpoint.path)
    assert not list((tmp_path / "run").glob(".*optimizer"))  # the staging folder moved into the checkpoint
    sample = subprocess.run([sys.executable, "-m", "gpt.cli", "sample", str(tmp_path / "run"), "--prompt", "To",
                             "--max-new-tokens", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0 and sample.stdout.startswith("To"), sample.stderr[-2000:]
    # FSDP -> one process: weights and optimizer carry over, the data order restarts (said once).
    result = gpt_train(config, "--resume", "train.max_iters=4", "train.parallel=auto")
    assert result.returncode == 0, job_errors(result)
    assert "written by 2 processes" in result.stderr and "restart" in result.stderr
    single = read_checkpoint(tmp_path / "run")
    assert single.state.iter == 4 and (single.path / "optimizer.pt").is_file()
    # one process -> FSDP: the index-keyed optimizer.pt is resharded by name.
    result = gpt_train(config, "--resume", "train.max_iters=5", nproc=2)
    assert result.returncode == 0, job_errors(result)
    assert read_checkpoint(tmp_path / "run").state.iter == 5


@pytest.mark.slow
def test_torchrun_two_processes_train_and_resume(char_data, tmp_path):
    config = tiny_yaml(tmp_path, char_data, max_iters=6, eval_interval=3, ckpt_interval=3)
    result = gpt_train(config, nproc=2)
    assert result.returncode == 0, job_errors(result)
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt.state.iter == 6 and ckpt.state.world_size == 2
    ranks = load_training_state(ckpt.path)["ranks"]
    assert len(ranks) == 2 and ranks[0]["data"] == ranks[1]["data"]  # one seed: each rank keeps its own rows
    assert not torch.equal(ranks[0]["rng"]["cpu"], ranks[1]["rng"]["cpu"])  # but its own dropout
    assert ckpt.state.tokens == 6 * 2 * 4 * 32
    assert result.stdout.count("\nmodel: ") == 1  # only rank 0 prints
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["iter"]) for r in rows] == list(range(1, 7))
    result = gpt_train(config, "--resume", "train.max_iters=8", nproc=2)
    assert result.returncode == 0, job_errors(result)
    assert read_checkpoint(tmp_path / "run").state.iter == 8
def _worker_of_rank(parent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (Linux /proc)."""
    children = Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(char_data, tmp_path):
    config = tiny_yaml(tmp_path, char_data, max_iters=100000, ckpt_interval=100000)
    proc = subprocess.Popen(torchrun(2, "-m", "gpt.cli", "train", config), cwd=REPO, env=WORKER_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            break
    os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM)
    proc.communicate(timeout=120)  # a rank left waiting in a collective would hang here
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt.state.iter >= 3 and len(load_training_state(ckpt.path)["ranks"]) == 2




@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_failing_rank_ends_the_whole_job_in_bounded_time(char_data, tmp_path, fault):
    """A rank that dies is noticed by torchrun, which stops the others; a rank that hangs
    leaves the others waiting in a collective until train.dist_timeout, then they fail."""
    config = tiny_yaml(tmp_path, char_data, max_iters=100000, ckpt_interval=100000, dist_timeout=10)
    env = {**WORKER_ENV, "GPT_TEST_FAULT_RANK": "1", "GPT_TEST_FAULT": fault}
    result = subprocess.run(torchrun(2, str(REPO / "tests" / "failing_rank.py"), "train", config), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode != 0
    if fault == "raise":
        assert "injected fault in rank 1" in result.stderr
    else:
        assert "error: rank 0 lost contact with the other processes" in result.stderr
        assert "train.dist_timeout=10 s" in result.stderr


@pytest.mark.slow
def test_ranks_whose_clocks_disagree_take_rank_0s_budget_decisions(char_data, tmp_path):
    """Rank 1's clock runs 1000 times too fast: it finds its first timing window long enough when rank 0
    may not, and would plan to stop at once. Every rank must take rank 0's decisions, or one would enter
    a collective while another trains on or stops, and the job would hang."""
    config = tiny_yaml(tmp_path, char_data, max_minutes=0.1, ckpt_interval=100, dist_timeout=20)
    env = {**WORKER_ENV, "GPT_TEST_FAST_CLOCK_RANK": "1"}
    result = subprocess.run(torchrun(2, str(REPO / "tests" / "budget_rank.py"), "train", config), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, job_errors(result)
    assert len([line for line in result.stdout.splitlines() if "max_iters=" in line and "for now" in line]) == 1
    state = read_checkpoint(tmp_path / "run").state
    assert state.iter == state.budget["plan"] > 20  # rank 1's plans would end right after the first


@pytest.mark.parametrize(("setting", "world_size", "expected"), [
    ("auto", 2, "ddp"), ("auto", 1, "none"), ("ddp", 1, "ddp"), ("fsdp", 2, "fsdp"), ("none", 1, "none")])
def test_train_parallel_resolves_under_torchrun(monkeypatch, setting, world_size, expected):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert distributed.resolve_parallel(setting, distributed.Dist(world_size=world_size)) == expected


@pytest.mark.parametrize("setting", ["ddp", "fsdp", "auto"])
def test_without_torchrun_every_setting_trains_in_one_process(setting):
    assert distributed.resolve_parallel(setting, distributed.Dist()) == "none"


def test_parallel_none_with_several_processes_is_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(GptError, match="train.parallel=none but torchrun started 2 processes"):
        distributed.resolve_parallel("none", distributed.Dist(world_size=2))


@pytest.mark.parametrize(("overrides", "message"), [
    (["task.kind=classify", "task.train=x.jsonl"], "shards language models only"),
    (["train.dtype=float16"], "float16 is not supported"),
    (["train.optimizer=muon"], "optimizer=muon is not supported")])
def test_fsdp_refuses_what_it_cannot_shard(char_data, tmp_path, overrides, message):
    config = load_config(tiny_yaml(tmp_path, char_data), overrides)
    dtype = torch.float16 if "train.dtype=float16" in overrides else torch.float32
    with pytest.raises(GptError, match=message):
        check_parallel("fsdp", config, dtype)


def _sharded_checkpoint(tmp_path: Path) -> tuple[GPT, torch.optim.Optimizer, Path]:
    """A model, its optimizer after one step, and a checkpoint folder holding the optimizer
    in DCP form, written in this one process."""
    model = GPT(load_config(None, ["model.preset=tiny", "model.vocab_size=50"]).model)
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu"))
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    folder = tmp_path / "ckpt"
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=folder / OPTIMIZER_SHARDS, no_dist=True)
    return model, optimizer, folder


def test_a_dcp_optimizer_loads_in_one_process(tmp_path):
    model, optimizer, folder = _sharded_checkpoint(tmp_path)
    fresh = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu"))
    load_optimizer(model, fresh, folder, {})
    torch.testing.assert_close(fresh.state[model.wte.weight]["exp_avg"], optimizer.state[model.wte.weight]["exp_avg"])


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_tampered_dcp_index_is_refused_without_running_it(tmp_path):
    model, optimizer, folder = _sharded_checkpoint(tmp_path)
    (folder / OPTIMIZER_SHARDS / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(GptError, match=r"\.metadata was refused.*posix.system is not allowed"):
        load_optimizer(model, optimizer, folder, {})


def test_a_one_process_optimizer_resumes_under_fsdp(tmp_path):
    """optimizer.pt keys its state by parameter index; under FSDP it is loaded by name and
    sharded (here FSDP over a one-process gloo group, in this process)."""
    model, optimizer, folder = _sharded_checkpoint(tmp_path)
    saved = {"optimizer": optimizer.state_dict()}
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        sharded = GPT(model.config)
        sharded.load_state_dict(model.state_dict())
        distributed.shard(sharded, sharded.blocks, None)
        fresh = make_optimizer(sharded, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu"))
        load_optimizer(sharded, fresh, tmp_path, saved)
        loaded = fresh.state[sharded.wte.weight]["exp_avg"].full_tensor()
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(loaded, optimizer.state[model.wte.weight]["exp_avg"])

