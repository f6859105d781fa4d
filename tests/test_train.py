import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import REPO, tiny_config, tiny_yaml
from safetensors.torch import load_file

from gpt.checkpoint import find_checkpoint, load_model, load_training_state, read_checkpoint, save_model_folder
from gpt.config import apply_overrides, build_config, to_dict
from gpt.data.formats import RunFolder, RunState
from gpt.data.shards import BatchSampler, load_dataset
from gpt.data.tokenizer import TokenizerSpec
from gpt.errors import GptError
from gpt.model import GPT, evaluating
from gpt.training import budget, distributed, objectives, optim
from gpt.training.loop import accumulate_gradients, decay_progress, lr_at, train
from gpt.training.metrics import Evaluation, Progress, read_metrics
from gpt.training.optim import Fp32Muon, build_optimizer, make_optimizer, muon_class, orthogonalise_in_fp32, set_lr
from gpt.training.state import TrainState
from gpt.training.trainer import build_trainer


def with_changes(config, *overrides):
    return build_config(apply_overrides(to_dict(config), list(overrides)))


def test_lr_schedule_at_known_iterations():
    schedule = [lr_at(it, 1.0, 0.1, 10, decay_progress(it, 10, 110)) for it in (0, 4, 9, 10, 60, 109, 110, 500)]
    expected = [0.1, 0.5, 1.0, 1.0, 0.55, 0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)), 0.1, 0.1]
    assert schedule == pytest.approx(expected)


def test_a_run_shorter_than_its_warmup_says_what_its_schedule_becomes(char_data, tmp_path, capsys):
    train(tiny_config(char_data, tmp_path / "run", max_iters=2, warmup_iters=8, eval_interval=100))
    out = capsys.readouterr().out
    assert ("train.warmup_iters=8 is not below train.max_iters=2: the learning rate only warms up, to 25% of "
            "train.lr at the last step, and never decays") in out
    train(tiny_config(char_data, tmp_path / "full", max_iters=3, warmup_iters=2, eval_interval=100))
    assert "warms up" not in capsys.readouterr().out


def test_grad_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    config = build_config({"model": {"preset": "tiny", "vocab_size": 40, "block_size": 16}}).model
    model = GPT(config)
    x, y = torch.randint(0, 40, (8, 16)), torch.randint(0, 40, (8, 16))
    loss_big = accumulate_gradients(model, [(x, y)], contextlib.nullcontext)
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_small = accumulate_gradients(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)],
                                      contextlib.nullcontext)
    assert loss_small.item() == pytest.approx(loss_big.item(), rel=1e-5)
    for a, b in zip(big, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_weight_decay_skips_embeddings_norms_and_biases():
    model = GPT(build_config({"model": {"preset": "tiny", "vocab_size": 40, "bias": True}}).model)
    decay, no_decay = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu")).param_groups
    decayed = {id(p) for p in decay["params"]}
    assert id(model.wte.weight) not in decayed and id(model.wpe.weight) not in decayed
    assert id(model.blocks[0].attn.qkv.weight) in decayed and id(model.blocks[0].attn.qkv.bias) not in decayed
    assert id(model.blocks[0].norm1.weight) not in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(build_config({"model": {"preset": "tiny", "vocab_size": 40, "bias": True,
                                        "tie_embeddings": False, "qk_norm": True}}).model)
    tc = build_config({"train": {"optimizer": "muon", "lr": 1e-3, "muon_lr": 0.02, "weight_decay": 0.1}}).train
    optimizer = build_optimizer(model, tc, torch.device("cpu"))
    muon, adamw = optimizer.optimizers["muon"], optimizer.optimizers["adamw"]
    hidden = {id(p) for block in model.blocks for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc,
                                                           block.mlp.proj) for p in [layer.weight]}
    assert {id(p) for p in muon.param_groups[0]["params"]} == hidden
    rest = [id(p) for group in adamw.param_groups for p in group["params"]]
    assert hidden.isdisjoint(rest) and len(rest) + len(hidden) == len(list(model.parameters()))
    assert id(model.lm_head.weight) in rest and id(model.wte.weight) in rest
    set_lr(optimizer, 5e-4)  # half the peak: Muon's lr is halved too
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-4, 0.01])


def test_muon_on_a_torch_without_it_is_a_one_line_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    tc = build_config({"train": {"optimizer": "muon"}}).train
    model = GPT(build_config({"model": {"preset": "tiny", "vocab_size": 40}}).model)
    with pytest.raises(GptError, match=r"train.optimizer=muon needs torch.optim.Muon.*use train.optimizer=adamw"):
        build_optimizer(model, tc, torch.device("cpu"))


needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")


@needs_muon
def test_muon_orthogonalises_in_fp32_only_on_a_cpu_that_would_emulate_bf16(monkeypatch):
    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: False)
    assert muon_class(torch.device("cpu")) is Fp32Muon
    assert muon_class(torch.device("cuda")) is torch.optim.Muon
    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: True)
    assert muon_class(torch.device("cpu")) is torch.optim.Muon


@needs_muon
@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_fp32_newton_schulz_is_torchs_iteration_at_higher_precision(shape):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    coefficients, steps, eps = (3.4445, -4.7750, 2.0315), 5, 1e-7
    ours = orthogonalise_in_fp32(grad, coefficients, steps, eps)
    theirs = torch.optim._muon._zeropower_via_newtonschulz(grad, coefficients, steps, eps)
    assert ours.dtype == torch.float32 and ours.shape == shape
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0.05)  # bf16 rounding apart
    singular = torch.linalg.svdvals(ours)
    assert 0.5 < singular.min() and singular.max() < 1.5  # what the quintic aims for


@needs_muon
def test_fp32_muon_steps_like_torchs_muon():
    torch.manual_seed(0)
    start = torch.randn(32, 16)
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    grad = torch.randn(32, 16)
    for weight, kind in zip(weights, (Fp32Muon, torch.optim.Muon)):
        optimizer = kind([weight], lr=0.02, weight_decay=0.0)
        weight.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0.02 * 0.05)
    assert not torch.equal(weights[0], weights[1])  # it did run the fp32 iteration


def _muon_step(kind: type, start: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    weight = torch.nn.Parameter(start.clone())
    weight.grad = grad.clone()
    kind([weight], lr=0.02, weight_decay=0.0).step()
    return weight.detach()


@needs_muon
def test_torchs_muon_in_another_thread_never_sees_fp32_muons_iteration(monkeypatch):
    """While an Fp32Muon step is in its fp32 iteration (held there), torch's Muon steps in this
    thread exactly as it does alone."""
    start, grad = torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), torch.randn(32, 16)
    alone = _muon_step(torch.optim.Muon, start, grad)
    inside, release = threading.Event(), threading.Event()

    def held(*args):
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            release.wait(10)
        return orthogonalise_in_fp32(*args)

    monkeypatch.setattr(optim, "orthogonalise_in_fp32", held)
    ours = threading.Thread(target=_muon_step, args=(Fp32Muon, start, grad))
    ours.start()
    try:
        assert inside.wait(10)
        assert torch.equal(_muon_step(torch.optim.Muon, start, grad), alone)
    finally:
        release.set()
        ours.join(10)
    assert torch.equal(_muon_step(torch.optim.Muon, start, grad), alone)


def test_resume_with_another_optimizer_is_refused(char_data, tmp_path, cli):
    train(tiny_config(char_data, tmp_path / "run", max_iters=2))
    code, _, err = cli("train", "--resume", tmp_path / "run", "train.max_iters=4", "train.optimizer=muon")
    assert code == 2 and "trained with adamw; resume with the same optimizer" in err
    assert len(err.strip().splitlines()) == 1


LOGGED = ("iter", "tokens", "loss", "lr", "grad_norm", "eval_train_loss", "val_loss")


@pytest.mark.parametrize("options", [[], ["train.optimizer=muon"]])
def test_resume_gives_bitwise_identical_losses(char_data, tmp_path, options):
    straight = with_changes(tiny_config(char_data, tmp_path / "straight", max_iters=20, lr_decay_iters=20,
                                        eval_interval=5), *options)
    assert train(straight) == 0
    first = with_changes(straight, f"train.out_dir={tmp_path / 'split'}", "train.max_iters=10")
    assert train(first) == 0
    assert train(with_changes(first, "train.max_iters=20"), resume=True) == 0
    rows = [[{k: r[k] for k in LOGGED} for r in read_metrics(tmp_path / name / "metrics.csv")]
            for name in ("straight", "split")]
    assert len(rows[0]) == 20 and rows[0] == rows[1]
    assert [float(r["loss"]) for r in rows[0]] == [float(r["loss"]) for r in rows[1]]
    a, b = (load_model(read_checkpoint(tmp_path / name)) for name in ("straight", "split"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_from_run_folder_via_cli(char_data, tmp_path, cli):
    config = tiny_config(char_data, tmp_path / "run", max_iters=10)
    train(config)
    code, out, err = cli("train", "--resume", tmp_path / "run", "train.max_iters=12", "train.lr=1e-3")
    assert code == 0, err
    assert "train.max_iters: 10 -> 12" in out and "train.lr: 0.003 -> 0.001" in out
    assert read_checkpoint(tmp_path / "run").state.iter == 12


def test_resuming_a_finished_run_says_there_is_nothing_to_train(char_data, tmp_path, cli):
    train(tiny_config(char_data, tmp_path / "run", max_iters=10))
    for extra in ([], ["train.max_iters=5"]):
        code, out, err = cli("train", "--resume", tmp_path / "run", *extra)
        assert code == 0, err
        assert f"nothing to train: the run is already at iteration 10 (train.max_iters={extra and 5 or 10}); " \
               "pass a higher train.max_iters to train on" in out.splitlines()
    assert read_checkpoint(tmp_path / "run").state.iter == 10


def test_a_damaged_latest_checkpoint_can_be_moved_aside_to_resume_from_the_one_before(char_data, tmp_path, cli):
    train(tiny_config(char_data, tmp_path / "run", max_iters=4, eval_interval=2, ckpt_interval=2))
    (tmp_path / "run" / "ckpt_000004" / "state.json").write_text("{damaged")
    code, _, err = cli("train", "--resume", tmp_path / "run", "train.max_iters=6")
    assert code == 2 and "move this one out of the run to go on from the one before" in err
    (tmp_path / "run" / "ckpt_000004").rename(tmp_path / "damaged")
    code, out, err = cli("train", "--resume", tmp_path / "run", "train.max_iters=6")
    assert code == 0, err
    assert "starting at iter 2" in out and read_checkpoint(tmp_path / "run").state.iter == 6


def test_an_older_state_json_is_migrated_and_a_newer_one_refused(char_data, tmp_path, cli):
    train(tiny_config(char_data, tmp_path / "run", max_iters=2, eval_interval=2, ckpt_interval=2))
    state_path = tmp_path / "run" / "ckpt_000002" / "state.json"
    saved = json.loads(state_path.read_text())
    assert saved["format_version"] == 2 and saved["world_size"] == 1
    # What state.json held before it had a format_version (a converted model's held even less).
    state_path.write_text(json.dumps({"iter": 2, "tokens": saved["tokens"], "best_val_loss": saved["best_val_loss"],
                                      "losses": saved["losses"], "budget_iters": 7}))
    old = read_checkpoint(tmp_path / "run").state
    assert (old.iter, old.tokens, old.best_loss, old.best_split) == (2, saved["tokens"], saved["best_val_loss"], "val")
    assert (old.world_size, old.budget, old.accuracy) == (1, None, {})  # budget_iters: a plan of before, dropped
    code, out, err = cli("train", "--resume", tmp_path / "run", "train.max_iters=4")
    assert code == 0, err
    assert "starting at iter 2" in out
    assert json.loads((tmp_path / "run" / "ckpt_000004" / "state.json").read_text())["format_version"] == 2
    state_path.write_text(json.dumps({**saved, "format_version": 99}))
    with pytest.raises(GptError, match="format_version 99, newer than this gpt reads .2.; upgrade gpt"):
        read_checkpoint(state_path.parent)
    state_path.write_text(json.dumps({**saved, "iter": "two"}))
    with pytest.raises(GptError, match="state.json is missing fields or has wrong types"):
        read_checkpoint(state_path.parent)


def test_a_run_whose_loss_turns_nan_stops_and_a_nan_loss_is_never_best(char_data, tmp_path):
    config = tiny_config(char_data, tmp_path / "run", max_iters=40, lr=1e9, min_lr=1e8, warmup_iters=0,
                         eval_interval=1, ckpt_interval=100, grad_clip=0.0)
    with pytest.raises(GptError, match=r"the training loss is nan at iter \d+: the run diverged; lower train.lr"):
        train(config)
    state = TrainState()
    assert state.record(Evaluation(losses={"val": 2.0}))
    assert not state.record(Evaluation(losses={"val": math.nan})) and state.best_loss == 2.0
    assert state.record(Evaluation(losses={"val": 1.5})) and state.best_loss == 1.5


def test_without_a_val_split_state_json_names_the_best_loss_for_the_train_split():
    state = TrainState()
    assert state.record(Evaluation(losses={"train": 2.0}))
    saved = state.to_json()
    assert saved["best_train_loss"] == 2.0 and "best_val_loss" not in saved
    again = TrainState.of(RunState.from_json(saved, "state.json"))
    assert (again.best_loss, again.best_split) == (2.0, "train")
    assert not again.record(Evaluation(losses={"train": 2.5})) and again.record(Evaluation(losses={"train": 1.0}))
    with_val = TrainState()
    with_val.record(Evaluation(losses={"train": 2.0, "val": 3.0}))
    assert with_val.to_json()["best_val_loss"] == 3.0 and "best_train_loss" not in with_val.to_json()
    older = RunState.from_json({"iter": 3, "tokens": 96, "best_val_loss": 1.25}, "state.json")  # before the split
    assert (older.best_loss, older.best_split, older.iter) == (1.25, "val", 3)


def test_a_diverging_run_stops_before_it_saves_non_finite_weights(char_data, tmp_path):
    """Saved at every step but logged never: the check before each save stops the run, so the
    checkpoints kept (and `latest`) all hold finite weights."""
    config = tiny_config(char_data, tmp_path / "run", max_iters=40, lr=1e9, min_lr=1e8, warmup_iters=0,
                         eval_interval=100, log_interval=100, ckpt_interval=1, grad_clip=0.0)
    with pytest.raises(GptError, match=r"at iter \d+: the run diverged; lower train.lr"):
        train(config)
    kept = RunFolder(tmp_path / "run").checkpoints()
    assert kept and read_checkpoint(tmp_path / "run").path == kept[-1]
    for folder in kept:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values()), folder.name


def test_checkpoints_refuse_non_finite_weights(tmp_path):
    config = build_config({"model": {"preset": "tiny", "vocab_size": 10, "block_size": 8}})
    model = GPT(config.model)
    with torch.no_grad():
        model.wte.weight[0, 0] = math.inf
    with pytest.raises(GptError, match="refusing to write a checkpoint whose weights hold NaN or inf"):
        save_model_folder(tmp_path / "best", model, config, TokenizerSpec("byte"), RunState(iter=0))
    assert not (tmp_path / "best").exists() and not (tmp_path / "best.tmp").exists()


def test_evaluations_leave_the_model_in_the_mode_they_found_it(char_data):
    dataset = load_dataset(char_data)
    model = GPT(build_config({"model": {"preset": "tiny", "block_size": 16, "vocab_size": dataset.vocab_size}}).model)
    batch = BatchSampler(dataset.splits["train"], 16, 2, seed=0).next_batch()
    for training in (False, True):
        model.train(training)
        objectives.evaluate(model, dataset, 16, 2, 1, 0, torch.device("cpu"), contextlib.nullcontext)
        budget.timed_forward(model, batch, contextlib.nullcontext)()
        assert model.training is training and all(m.training is training for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"), evaluating(model):
        assert not model.training
        raise RuntimeError("inside")
    assert model.training


def test_an_evaluation_without_a_val_split_logs_the_train_loss(capsys):
    progress = Progress(10, 0, enabled=True)
    progress.report(5, Evaluation(losses={"train": 3.25}).row())
    progress.report(10, Evaluation(losses={"train": 3.0, "val": 3.5}).row())
    assert capsys.readouterr().out.splitlines() == ["iter 5/10 | train eval 3.2500", "iter 10/10 | val 3.5000"]


def test_resume_refuses_a_different_model_shape(char_data, tmp_path):
    config = tiny_config(char_data, tmp_path / "run", max_iters=5)
    train(config)
    with pytest.raises(GptError, match="model.n_layer differ"):
        train(with_changes(config, "model.n_layer=3"), resume=True)


def _blocked_out_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return f"train.out_dir={blocker / 'run'}"


@pytest.mark.parametrize("override, message", [
    (lambda tmp: f"data.dir={tmp / 'nope'}", "data folder not found"),
    (lambda tmp: "model.vocab_size=100", "set model.vocab_size=null"),
    (lambda tmp: "model.block_size=1000000", "lower model.block_size"),
    pytest.param(lambda tmp: "train.device=cuda", "CUDA is not available", id="cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: it would train")),
    (lambda tmp: (tmp / "no_meta").mkdir() or f"data.dir={tmp / 'no_meta'}", "has no meta.json"),
    (_blocked_out_dir, "cannot write to train.out_dir"),
], ids=["no-data", "vocab", "block-size", "cuda", "no-meta", "unwritable"])
def test_train_bad_inputs(char_data, tmp_path, override, message):
    config = tiny_config(char_data, tmp_path / "run", max_iters=2)
    with pytest.raises(GptError, match=message):
        train(with_changes(config, override(tmp_path)))


def test_run_folder_rules(char_data, tmp_path):
    config = tiny_config(char_data, tmp_path / "run", max_iters=2)
    with pytest.raises(GptError, match="nothing to resume"):
        train(config, resume=True)
    train(config)
    with pytest.raises(GptError, match="already holds a run; pass --resume .* or --overwrite"):
        train(config)
    assert train(config, overwrite=True) == 0


def test_fine_tuning_starts_from_checkpoint_weights(char_data, tmp_path):
    base = tiny_config(char_data, tmp_path / "base", max_iters=5)
    train(base)
    tuned = with_changes(base, f"train.out_dir={tmp_path / 'tuned'}", f"train.init_from={tmp_path / 'base'}")
    with contextlib.ExitStack() as hold:
        trainer, _ = build_trainer(tuned, resume=False, overwrite=False, dist=distributed.Dist(), hold=hold)
    source = load_model(read_checkpoint(tmp_path / "base"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), trainer.model.state_dict().values()))
    assert trainer.state.iter == 0 and not trainer.optimizer.state
    with pytest.raises(GptError, match="model.n_embd=64 .here 32."):
        train(with_changes(tuned, "model.n_embd=32"))


def test_malicious_pickle_in_checkpoint_is_refused(char_data, tmp_path):
    train(tiny_config(char_data, tmp_path / "run", max_iters=3))
    folder = find_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Payload()}, folder / "optimizer.pt")
    with pytest.raises(GptError, match="refused: not a safe checkpoint file"):
        load_training_state(folder)
    with pytest.raises(GptError, match="refused"):
        train(tiny_config(char_data, tmp_path / "run", max_iters=6), resume=True)
    assert not marker.exists()


KILL_SCRIPT = """
import sys, torch
from pathlib import Path
from gpt.checkpoint import save_checkpoint
from gpt.config import build_config
from gpt.data.formats import RunFolder, RunState
from gpt.model import GPT
from gpt.data.shards import BatchSampler, load_dataset
from gpt.data.tokenizer import TokenizerSpec
config = build_config({"model": {"preset": "mini", "vocab_size": 2000}})
model = GPT(config.model)
out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
for it in range(1, 10000):
    with torch.no_grad():
        model.wte.weight[0, 0] = it
    save_checkpoint(RunFolder(out), model, config, TokenizerSpec("byte"), RunState(iter=it), {"step": torch.tensor(it)},
                    keep_last=2)
    print(it, flush=True)
"""


@pytest.mark.slow
def test_kill_during_checkpoint_writing_never_breaks_latest(tmp_path):
    for trial, delay in enumerate((0.37, 0.71, 1.13)):
        out = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], stdout=subprocess.PIPE, cwd=REPO)
        proc.stdout.readline()  # the first checkpoint is complete
        time.sleep(delay)
        proc.kill()
        proc.wait()
        latest = out / "latest"
        assert latest.is_symlink() and latest.resolve().is_dir()
        ckpt = read_checkpoint(latest)
        model = load_model(ckpt)
        assert model.wte.weight[0, 0].item() == ckpt.state.iter
        assert load_training_state(ckpt.path)["step"].item() == ckpt.state.iter
        assert read_checkpoint(out).state.iter >= ckpt.state.iter


def test_a_run_stopped_before_its_first_evaluation_draws_its_training_loss(char_data, tmp_path, monkeypatch):
    from gpt.training import loop
    step, steps = loop.optimizer_step, []

    def step_then_ctrl_c(*args):
        steps.append(1)
        if len(steps) == 3:
            signal.raise_signal(signal.SIGINT)  # the loop finishes this step, saves and stops
        return step(*args)

    monkeypatch.setattr(loop, "optimizer_step", step_then_ctrl_c)
    assert train(tiny_config(char_data, tmp_path / "run", max_iters=50, eval_interval=40, ckpt_interval=40)) == 130
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 3 and not any(r["val_loss"] for r in rows)  # stopped at iter 3, before evaluating
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_130(char_data, tmp_path):
    config = tiny_yaml(tmp_path, char_data, max_iters=100000, ckpt_interval=100000)
    proc = subprocess.Popen([sys.executable, "-m", "gpt.cli", "train", config], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "gpt train --resume" in err and "Traceback" not in err
    assert read_checkpoint(tmp_path / "run").state.iter >= 3


@pytest.mark.slow
def test_shakespeare_char_val_loss_drops_below_2_5(tmp_path):
    from gpt.config import load_config
    from gpt.data.prepare import PrepareOptions, prepare

    data = prepare(PrepareOptions(sources=["shakespeare_char"], out=str(tmp_path / "data"), workers=1))
    config = load_config(REPO / "configs" / "shakespeare_char.yaml",
                         [f"data.dir={data}", f"train.out_dir={tmp_path / 'run'}", "train.max_iters=150",
                          "train.eval_interval=150", "train.eval_iters=20", "train.device=cpu"])
    assert train(config) == 0
    losses = read_checkpoint(tmp_path / "run").state.losses
    assert losses["val"] < 2.5


def test_saving_an_iteration_again_keeps_the_complete_checkpoint(tmp_path):
    from gpt.checkpoint import save_checkpoint

    config = build_config({"model": {"preset": "tiny", "vocab_size": 40}})
    model = GPT(config.model)
    run = RunFolder(tmp_path)
    save_checkpoint(run, model, config, TokenizerSpec("byte"), RunState(iter=4), {"step": torch.tensor(4)}, keep_last=2)
    before = (tmp_path / "ckpt_000004" / "model.safetensors").stat().st_mtime_ns
    with torch.no_grad():
        model.wte.weight.zero_()
    save_checkpoint(run, model, config, TokenizerSpec("byte"), RunState(iter=4), {"step": torch.tensor(4)}, keep_last=2)
    assert (tmp_path / "ckpt_000004" / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert read_checkpoint(tmp_path / "latest").state.iter == 4
    assert load_model(read_checkpoint(tmp_path)).wte.weight.abs().sum() > 0


def test_readers_follow_latest_and_best_is_a_complete_folder(char_data, tmp_path):
    train(tiny_config(char_data, tmp_path / "run", max_iters=20, eval_interval=5, ckpt_interval=5))
    run = RunFolder(tmp_path / "run")
    assert [p.name for p in run.checkpoints()] == ["ckpt_000010", "ckpt_000015", "ckpt_000020"]
    os.replace(run.root / "latest", run.root / "old")
    os.symlink("ckpt_000015", run.latest)
    assert read_checkpoint(run.root).state.iter == 15
    rows = [r for r in read_metrics(run.metrics) if r["val_loss"]]
    lowest = min(rows, key=lambda r: float(r["val_loss"]))  # the first of equal losses: a tie is no improvement
    assert len(rows) == 4 and run.best.is_symlink()
    assert read_checkpoint(run.best).state.iter == int(lowest["iter"])
    assert read_checkpoint(run.best).state.best_loss == float(lowest["val_loss"])
    assert [p.name for p in run.root.glob("best_*")] == [run.best.resolve().name]


def test_tokens_seen_accumulate_across_a_resume_with_another_batch_size(char_data, tmp_path):
    config = tiny_config(char_data, tmp_path / "run", max_iters=4)
    train(config)
    train(with_changes(config, "train.max_iters=6", "train.batch_size=2"), resume=True)
    assert read_checkpoint(tmp_path / "run").state.tokens == 4 * 4 * 32 + 2 * 2 * 32


def test_val_bits_per_byte_is_logged_from_the_bytes_the_data_records(char_data, tmp_path):
    train(tiny_config(char_data, tmp_path / "run", max_iters=10, eval_interval=5))
    val = load_dataset(char_data).meta.splits["val"]
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["val_loss"]]
    assert len(rows) == 2
    for row in rows:
        expected = float(row["val_loss"]) * val.tokens / math.log(2) / val.bytes
        assert float(row["val_bpb"]) == pytest.approx(expected)


def test_speed_columns_leave_out_evaluation_and_checkpoint_time(char_data, tmp_path, monkeypatch):
    # A clock that jumps an hour during every evaluation and every checkpoint: if either were
    # counted, the window after it would report over a minute per iteration.
    jump = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + jump[0])

    def slow(method):
        def run(*args, **kwargs):
            jump[0] += 3600.0
            return method(*args, **kwargs)
        return run

    from gpt.training.objectives import LanguageModelling
    from gpt.training.trainer import Trainer
    monkeypatch.setattr(LanguageModelling, "evaluate", slow(LanguageModelling.evaluate))
    monkeypatch.setattr(Trainer, "save", slow(Trainer.save))
    train(tiny_config(char_data, tmp_path / "run", max_iters=12, log_interval=2, eval_interval=2, ckpt_interval=3))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["ms_per_iter"]]
    assert jump[0] >= 10 * 3600.0  # the evaluations and checkpoints did happen
    assert len(rows) == 6
    for row in rows:
        assert 0 < float(row["ms_per_iter"]) < 60_000
        assert float(row["tok_per_s"]) == pytest.approx(4 * 32 * 1000 / float(row["ms_per_iter"]))


def test_mfu_is_filled_on_a_cpu_from_the_measured_matmul_peak(char_data, tmp_path):
    train(tiny_config(char_data, tmp_path / "run", max_iters=4, log_interval=2))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["loss"]]
    assert len(rows) == 2
    assert all(0 < float(r["mfu"]) < 1 for r in rows)


def test_the_cpu_peak_is_measured_in_the_dtype_the_run_computes_in(monkeypatch):
    """A native-bf16 CPU multiplies bf16 ~3x faster than fp32: a fp32 peak made a bf16 run's
    MFU read over 100%."""
    from gpt.device import peak_flops
    seen, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: seen.append((a.dtype, b.dtype)) or mm(a, b))
    assert peak_flops(None, torch.device("cpu"), ((8, 16, 24), (24, 8, 16)), torch.bfloat16, fresh=True) > 0
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}


def test_an_impossible_mfu_measures_the_peak_again_then_is_left_out_with_a_reason(capsys):
    from gpt.training.metrics import Mfu
    peaks = iter([1000.0, 10.0])
    mfu = Mfu(flops_per_token=2.0, peak=100.0, configured=False, remeasure=lambda: next(peaks))
    assert mfu(10.0) == pytest.approx(0.2)
    assert mfu(100.0) == pytest.approx(0.2)  # 200% against 100 FLOP/s: measured again, 1000
    assert "measured again: 1e+03 FLOP/s" in capsys.readouterr().err
    assert mfu(1000.0) is None and mfu(1.0) is None  # no third measurement; left out from then on
    err = capsys.readouterr().err
    assert "MFU came out at 200%, over 100%" in err and "not reported" in err and len(err.splitlines()) == 1


def test_a_given_peak_below_the_real_speed_leaves_mfu_out_with_one_line(char_data, tmp_path, capsys):
    train(tiny_config(char_data, tmp_path / "run", max_iters=3, eval_interval=100, peak_flops=1.0))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["loss"]]
    assert len(rows) == 3 and not any(r["mfu"] for r in rows)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "MFU" in line]
    assert len(warnings) == 1 and "train.peak_flops is below what this device reaches" in warnings[0]


def test_measuring_the_matmul_peak_leaves_the_global_random_state_alone():
    from gpt.device import measured_matmul_flops
    before = torch.get_rng_state()
    assert measured_matmul_flops(((8, 16, 24),), repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), before)
