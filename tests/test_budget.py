"""train.max_minutes: the plan that turns measured costs into a run's length, re-planned as the step time
drifts (simulated clocks, never real time, so that every number is the same on every host), and budgeted
runs resumed exactly."""

import random
import shutil

import pytest
import yaml
from conftest import load_script, tiny_config

from gpt.checkpoint import read_checkpoint
from gpt.config import TrainConfig, apply_overrides, build_config, to_dict
from gpt.data.formats import RunFolder
from gpt.training import budget, loop
from gpt.training.budget import Costs, cost_of, iters_within
from gpt.training.loop import decay_progress, lr_at, train
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


@pytest.mark.parametrize("seconds, expected", [
    (29.0, 20),   # cost(10, 20) = 21 <= 29 < cost(10, 21) = 11 + 2 * 5 + 3 * 3 = 30
    (1000.0, 485),  # 21 s per 10 steps (10 of steps, an eval, two checkpoints): 47 x 21 = 987, then 5 steps
    (0.0, 11),    # no time left: one more step, so the run still ends with an eval and a checkpoint
])
def test_iters_within_is_the_longest_run_that_fits(seconds, expected):
    costs = Costs(step=1.0, eval=5.0, ckpt=3.0)
    chosen = iters_within(seconds, 10, costs, eval_interval=10, ckpt_interval=5)
    assert chosen == expected
    if seconds > 0:
        assert cost_of(10, chosen, costs, 10, 5) <= seconds < cost_of(10, chosen + 1, costs, 10, 5)


class SimClock:
    """Simulated seconds: each optimizer step advances them by `step_seconds(step)` (0-based), and
    nothing else does unless a test says so."""

    def __init__(self, step_seconds, steps: int = 0) -> None:
        self.now, self.steps, self.step_seconds = 0.0, steps, step_seconds

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.now += self.step_seconds(self.steps)
        self.steps += 1


def budget_settings(minutes, warmup_iters=100, eval_interval=250, ckpt_interval=500):
    return TrainConfig(max_minutes=minutes, warmup_iters=warmup_iters, eval_interval=eval_interval,
                       ckpt_interval=ckpt_interval)


def test_a_window_too_short_to_trust_is_replaced_by_a_longer_one_of_warmed_up_steps(monkeypatch):
    clock = SimClock(lambda it: 0.1 if it < 10 else 0.02)  # slow first steps, then the steady state
    monkeypatch.setattr(budget, "clock", clock)
    plan = budget.Budget(budget_settings(1.0), start_iter=0)  # windows must last 2% of 60 s = 1.2 s
    decided_at = None
    for it in range(1, 1000):
        clock.step()
        if plan.after_step(it, lambda: (0.0, 0.0)):
            decided_at = it
            break
    # Windows 3-10 (0.8 s), 10-20, 20-40, 40-80 (0.2, 0.4, 0.8 s) are too short; 80-160 lasts 1.6 s.
    assert decided_at == 160
    assert plan.costs.step == pytest.approx(0.02)  # the warmed-up steps only


def simulate(monkeypatch, minutes, step_seconds, eval_s=2.0, ckpt_s=0.5, warmup_iters=100):
    """A budgeted run as gpt.training.loop drives its budget, in simulated time: evaluations every
    250 steps and checkpoints every 500 (and both at the end), first estimated 50% too dear and too
    cheap. Returns the simulated seconds at its end and every step's LR (lr 1.0, min_lr 0.1)."""
    clock = SimClock(step_seconds)
    monkeypatch.setattr(budget, "clock", clock)
    settings = budget_settings(minutes, warmup_iters)
    plan = budget.Budget(settings, start_iter=0)

    def measure():
        clock.now += 0.5
        return 1.5 * eval_s, 0.5 * ckpt_s

    lrs, it = [], 0
    while it < plan.end:
        lrs.append(lr_at(it, 1.0, 0.1, warmup_iters, plan.progress(it)))
        clock.step()
        it += 1
        last = it == plan.end
        plan.after_step(it, measure)
        for kind, interval, seconds in (("eval", settings.eval_interval, eval_s), ("ckpt", settings.ckpt_interval,
                                                                                   ckpt_s)):
            if it % interval == 0 or last:
                with plan.pausing(kind):
                    clock.now += seconds
    return clock.now, lrs


noise = random.Random(0)
DRIFTS = {
    "steady": lambda it: 0.12,
    "a host 20% faster": lambda it: 0.096,
    "a host 20% slower": lambda it: 0.144,
    # A native-bf16 CPU: 126 ms/step at first, ~97 once warm, over the first minutes.
    "bf16 warm-up": lambda it: 0.097 + 0.029 * 0.999 ** it,
    "slow warm-up": lambda it: 0.6 if it < 100 else 0.12,
    "20% slower from the middle": lambda it: 0.12 * (1 + 0.2 * min(1.0, max(0.0, (it - 1500) / 1500))),
    "20% faster near the end": lambda it: 0.12 if it < 3500 else 0.096,
    "GPU: compiles 40 s, then 10 ms": lambda it: 40.0 if it == 0 else 0.01,
    "noisy": lambda it: 0.12 * noise.uniform(0.7, 1.3),
}


@pytest.mark.parametrize("minutes", [2, 10])
@pytest.mark.parametrize("drift", DRIFTS)
def test_a_budgeted_run_ends_within_its_budget_at_min_lr_however_the_step_time_drifts(monkeypatch, drift, minutes):
    seconds, lrs = simulate(monkeypatch, minutes, DRIFTS[drift])
    assert 0.95 * 60 * minutes <= seconds <= 1.02 * 60 * minutes
    assert lrs[-1] == 0.1  # min_lr exactly, on the last step
    decay = lrs[100:]
    assert all(later <= earlier for earlier, later in zip(decay, decay[1:]))  # re-planning never raises the LR
    assert max(earlier - later for earlier, later in zip(decay, decay[1:])) < 0.01  # nor makes it jump


def test_a_first_plan_from_a_disturbed_window_gives_back_the_lr_once_the_steps_speed_up(monkeypatch):
    # Measured on a shared host: a neighbour held the cores for ~550 steps (900 ms/step), then 25 ms.
    seconds, lrs = simulate(monkeypatch, 10, lambda it: 0.9 if it < 550 else 0.025)
    assert 0.95 * 600 <= seconds <= 1.02 * 600 and lrs[-1] == 0.1
    rises = [it for it in range(101, len(lrs)) if lrs[it] > lrs[it - 1]]
    assert lrs[550] < 0.2  # the first plans, made at 900 ms/step, had decayed it nearly to min_lr...
    assert rises and all(550 < it < 650 for it in rises)  # ...until re-plans saw the fast steps
    after = lrs[rises[-1]:]
    assert after[0] > 0.8 and after[len(after) // 2] > 0.3  # the rest of the run gets a whole decay (0.12 without)
    assert all(later <= earlier for earlier, later in zip(after, after[1:]))


def test_a_fixed_length_decay_ends_one_step_after_the_last():
    schedule = [lr_at(it, 1.0, 0.1, 10, decay_progress(it, 10, 110)) for it in (9, 10, 109, 110, 500)]
    assert schedule[0] == schedule[1] == 1.0 and schedule[2] > 0.1 and schedule[3] == schedule[4] == 0.1


@pytest.fixture
def sim_clock(monkeypatch):
    """Make training runs read a SimClock that each optimizer step advances."""
    real_step = loop.optimizer_step

    def make(step_seconds, steps: int = 0) -> SimClock:
        clock = SimClock(step_seconds, steps)
        monkeypatch.setattr(budget, "clock", clock)

        def stepping(*args, **kwargs):
            clock.step()
            return real_step(*args, **kwargs)

        monkeypatch.setattr(loop, "optimizer_step", stepping)
        return clock

    return make


def budget_config(char_data, out, **train):
    settings = dict(max_iters=1000, max_minutes=0.05, eval_interval=10, ckpt_interval=10, keep_last=100)
    return tiny_config(char_data, out, **{**settings, **train})


def test_budget_plans_the_run_records_the_plan_and_ends_at_min_lr(char_data, tmp_path, sim_clock, capsys):
    sim_clock(lambda it: 0.125)
    # train.max_iters does not cap a budget: a budget says how long.
    assert train(budget_config(char_data, tmp_path / "run", max_iters=15)) == 0
    # Steps 3-10 take 1 s: 125 ms/step; the run is at 1.25 s of its 3 and plans to end by 2.94 s (98%):
    # 13 more steps (evaluations and checkpoints take no simulated time).
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("budget ")]
    assert out == [
        "budget 0.05 min: max_iters=23 for now (planned again as the step time changes; train.max_iters does "
        "not apply); measured 125.0 ms/step, 0.0 s/eval, 0.00 s/checkpoint",
        "budget 0.05 min: the last step (iter 23) ended at 0.05 min, 95.8% of the budget; last measured "
        "125.0 ms/step"]
    latest = read_checkpoint(tmp_path / "run")
    assert latest.state.iter == 23 and latest.state.budget["plan"] == 23
    assert latest.state.budget["spent"] == 23 * 0.125
    saved = yaml.safe_load((latest.path / RunFolder.CONFIG).read_text())["train"]
    assert saved["max_iters"] == 23 and saved["max_minutes"] == 0.05
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert int(rows[-1]["iter"]) == 23 and float(rows[-1]["lr"]) == 3e-4  # min_lr exactly, on the last step


def test_a_budgeted_run_resumed_past_its_plan_says_how_to_train_on(char_data, tmp_path, sim_clock, capsys):
    sim_clock(lambda it: 0.125)
    config = budget_config(char_data, tmp_path / "run")
    assert train(config) == 0
    assert train(config, resume=True) == 0
    assert ("nothing to train: the run is at iteration 23, the last step its time budget "
            "(train.max_minutes=0.05) planned; add train.max_minutes=null and a higher train.max_iters to train on"
            ) in capsys.readouterr().out.splitlines()
    assert train(with_changes(config, "train.max_iters=25", "train.max_minutes=null"), resume=True) == 0
    assert read_checkpoint(tmp_path / "run").state.iter == 25


@pytest.mark.slow
def test_budgeted_run_resumes_bitwise_with_what_is_left_of_its_budget(char_data, tmp_path, sim_clock, monkeypatch):
    def drift(it):  # steps get twice as fast after step 30, after the checkpoint the run resumes from
        return 0.125 if it < 30 else 0.0625

    sim_clock(drift)
    straight = budget_config(char_data, tmp_path / "straight", max_minutes=0.1)
    assert train(straight) == 0
    sim_clock(drift)
    split = with_changes(straight, f"train.out_dir={tmp_path / 'split'}")
    assert train(split) == 0
    # As if the run had died after its checkpoint at iter 20 (and restarted on another clock).
    for folder in RunFolder(tmp_path / "split").checkpoints()[2:]:
        shutil.rmtree(folder)

    def no_measuring(*args):
        raise AssertionError("a resumed budgeted run must not measure its evaluations and checkpoints again")

    monkeypatch.setattr(budget, "measure_events", no_measuring)
    clock = sim_clock(drift, steps=20)
    clock.now = 1000.0
    assert train(split, resume=True) == 0
    states = [read_checkpoint(tmp_path / name).state for name in ("straight", "split")]
    assert states[0].budget == states[1].budget
    plan = states[0].budget["plan"]
    assert plan > 47  # re-planned after the resume, when the steps got faster: 10 + 37 was the first plan
    rows = [[{k: r[k] for k in LOGGED} for r in read_metrics(tmp_path / name / "metrics.csv")]
            for name in ("straight", "split")]
    assert len(rows[0]) == plan and rows[0] == rows[1]
    assert float(rows[0][-1]["lr"]) == 3e-4


def test_bench_quality_reference_is_nanogpts_cpu_recipe():
    module = load_script("bench_quality")
    config = build_config(module.NANOGPT_CPU)
    m, t = config.model, config.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (4, 4, 128, 64, 0.0, False)
    assert (m.pos_encoding, m.activation, m.norm, m.qk_norm, m.logit_softcap) == ("learned", "gelu", "layernorm",
                                                                                  False, None)
    assert (t.batch_size, t.lr, t.min_lr, t.optimizer, t.dtype) == (12, 1e-3, 1e-4, "adamw", "float32")
