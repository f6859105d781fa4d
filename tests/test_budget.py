"""train.max_minutes: the rule that turns measured costs into max_iters, and budgeted runs
(decided under a fake clock, so that the number is the same on every host) resumed exactly."""

import shutil

import pytest
import yaml
from conftest import load_script, tiny_config

from gpt.checkpoint import read_checkpoint
from gpt.config import apply_overrides, build_config, to_dict
from gpt.data.formats import RunFolder
from gpt.training import budget
from gpt.training.budget import Costs, cost_of, iters_within
from gpt.training.loop import lr_at, train
from gpt.training.metrics import read_metrics

LOGGED = ("iter", "tokens", "loss", "lr", "grad_norm", "eval_train_loss", "val_loss")


def with_changes(config, *overrides):
    return build_config(apply_overrides(to_dict(config), list(overrides)))


@pytest.mark.parametrize("start, end, expected", [
    (10, 20, 10 * 1.0 + 1 * 5.0 + 2 * 3.0),   # evals at 20; checkpoints at 15, 20
    (10, 23, 13 * 1.0 + 2 * 5.0 + 3 * 3.0),   # evals at 20 and the final 23; checkpoints at 15, 20, 23
    (20, 21, 1 * 1.0 + 1 * 5.0 + 1 * 3.0),    # one step, then the final eval and checkpoint
])
def test_cost_counts_steps_periodic_and_final_events(start, end, expected):
    assert cost_of(start, end, Costs(step=1.0, eval=5.0, ckpt=3.0), eval_interval=10, ckpt_interval=5) == expected


@pytest.mark.parametrize("seconds, limit, expected", [
    (29.0, 1000, 20),   # cost(10, 20) = 21 <= 29 < cost(10, 21) = 11 + 2 * 5 + 3 * 3 = 30
    (1e9, 500, 500),    # train.max_iters is reached first
    (0.0, 1000, 11),    # no time left: one more step, so the run still ends with an eval and a checkpoint
])
def test_iters_within_is_the_largest_run_that_fits(seconds, limit, expected):
    costs = Costs(step=1.0, eval=5.0, ckpt=3.0)
    chosen = iters_within(seconds, 10, limit, costs, eval_interval=10, ckpt_interval=5)
    assert chosen == expected
    if expected < limit and seconds > 0:
        assert cost_of(10, chosen, costs, 10, 5) <= seconds < cost_of(10, chosen + 1, costs, 10, 5)


def test_a_window_too_short_to_trust_is_replaced_by_a_longer_one_of_warmed_up_steps(monkeypatch):
    now = 0.0
    monkeypatch.setattr(budget, "clock", lambda: now)
    timer = budget.Budget(minutes=1.0, start_iter=0)  # windows must last 2% of 60 s = 1.2 s
    decided_at = None
    for it in range(1, 1000):
        now += 0.1 if it <= 10 else 0.02  # slow first steps, then the steady state
        if timer.due(it):
            decided_at = it
            break
    # Windows 3-10 (0.8 s), 10-20, 20-40, 40-80 (0.2, 0.4, 0.8 s) are too short; 80-160 lasts 1.6 s.
    assert decided_at == 160
    costs = timer.measure(decided_at, lambda: None, eval_batches=1, checkpoint={})
    assert costs.step == pytest.approx(0.02)  # the warmed-up steps only


class FakeClock:
    """A clock that advances one second each time it is read: the costs a run measures then
    depend only on how often the budget reads it, never on the host."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def budget_config(char_data, out, **train):
    settings = dict(max_iters=1000, max_minutes=0.25, eval_interval=10, ckpt_interval=10, keep_last=100)
    return tiny_config(char_data, out, **{**settings, **train})


def expected_iters(minutes: float, limit: int) -> int:
    """What the fake clock makes the rule choose: readings at start (1), after step 2 (2), after
    step 10 (3: 8 steps in 1 s), around an eval batch (4, 5: 1 s, times 2 splits x eval_iters 2),
    around the checkpoint (6, 7: 1 s), then 7 s spent at the decision (8)."""
    costs = Costs(step=1 / 8, eval=4.0, ckpt=1.0)
    return iters_within(0.95 * 60 * minutes - 7, 10, limit, costs, eval_interval=10, ckpt_interval=10)


def test_budget_fixes_max_iters_records_it_and_prints_it(char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "clock", FakeClock())
    assert train(budget_config(char_data, tmp_path / "run")) == 0
    chosen = expected_iters(0.25, 1000)
    assert chosen == 20  # 10 steps, an eval and a checkpoint: 6.25 s of the 7.25 s left; 21 would need 10.1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("budget ")] == [
        "budget 0.25 min: max_iters=20; measured 125.0 ms/step, 4.0 s/eval, 1.00 s/checkpoint"]
    latest = read_checkpoint(tmp_path / "run")
    assert latest.state["iter"] == 20 and latest.state["budget_iters"] == 20
    saved = yaml.safe_load((latest.path / RunFolder.CONFIG).read_text())["train"]
    assert saved["max_iters"] == 20 and saved["max_minutes"] == 0.25
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    # The cosine schedule follows the chosen length: its last step is one short of min_lr.
    assert int(rows[-1]["iter"]) == 20 and float(rows[-1]["lr"]) == pytest.approx(lr_at(19, 3e-3, 3e-4, 5, 20))


def test_max_iters_reached_first_ends_a_budgeted_run(char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "clock", FakeClock())
    assert train(budget_config(char_data, tmp_path / "run", max_iters=15)) == 0
    assert "budget 0.25 min: max_iters=15 (train.max_iters=15 was the smaller)" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "run").state["iter"] == 15


def test_a_budgeted_run_resumed_past_its_budget_says_how_to_train_on(char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "clock", FakeClock())
    config = budget_config(char_data, tmp_path / "run")
    assert train(config) == 0
    assert train(with_changes(config, "train.max_iters=30"), resume=True) == 0
    assert ("nothing to train: the run is at iteration 20, the number of steps its time budget "
            "(train.max_minutes=0.25) chose; add train.max_minutes=null and a higher train.max_iters to train on"
            ) in capsys.readouterr().out.splitlines()
    assert train(with_changes(config, "train.max_iters=22", "train.max_minutes=null"), resume=True) == 0
    assert read_checkpoint(tmp_path / "run").state["iter"] == 22


@pytest.mark.slow
def test_budgeted_run_resumes_bitwise_without_measuring_again(char_data, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "clock", FakeClock())
    straight = budget_config(char_data, tmp_path / "straight")
    assert train(straight) == 0
    monkeypatch.setattr(budget, "clock", FakeClock())
    split = with_changes(straight, f"train.out_dir={tmp_path / 'split'}")
    assert train(split) == 0
    # As if the run had died after its checkpoint at iter 10, the one the budget decided at.
    shutil.rmtree(RunFolder(tmp_path / "split").checkpoint(20))

    def no_clock() -> float:
        raise AssertionError("a resumed budgeted run must not measure again")

    monkeypatch.setattr(budget, "clock", no_clock)
    assert train(split, resume=True) == 0
    rows = [[{k: r[k] for k in LOGGED} for r in read_metrics(tmp_path / name / "metrics.csv")]
            for name in ("straight", "split")]
    assert len(rows[0]) == 20 and rows[0] == rows[1]


def test_bench_quality_reference_is_nanogpts_cpu_recipe():
    module = load_script("bench_quality")
    config = build_config(module.NANOGPT_CPU)
    m, t = config.model, config.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (4, 4, 128, 64, 0.0, False)
    assert (m.pos_encoding, m.activation, m.norm, m.qk_norm, m.logit_softcap) == ("learned", "gelu", "layernorm",
                                                                                  False, None)
    assert (t.batch_size, t.lr, t.min_lr, t.optimizer, t.dtype) == (12, 1e-3, 1e-4, "adamw", "float32")
