"""scripts/bench.py runs end to end and reports what it promises. No timing thresholds here:
speed targets live in BENCHMARKS.md, measured on an idle machine."""

import json
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, load_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--tiny", "--profile",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text(encoding="utf-8")), done.stdout


def test_training_rows_compare_with_the_reference_and_the_matmul_peak(report):
    results, _ = report
    assert [r["model"] for r in results["train"]] == ["baby", "6-layer"]
    for row in results["train"]:
        for key in ("ms_per_iter", "ref_ms_per_iter", "tok_per_s", "ref_tok_per_s", "speedup",
                    "achieved_flops", "matmul_flops", "fraction_of_matmul", "loader_ms_per_batch"):
            assert row[key] > 0, key
        assert row["tok_per_s"] == pytest.approx(row["batch"] * row["block_size"] * 1000 / row["ms_per_iter"])
        assert row["achieved_flops"] == pytest.approx(row["flops_per_token"] * row["tok_per_s"])


def test_sampling_rows_have_the_bandwidth_bound_and_transformers_beside_them(report):
    results, _ = report
    assert results["copy_bandwidth"] > 0
    assert [(r["model"], r["batch"]) for r in results["sample"]] == [
        ("cpu-config", 1), ("cpu-config", 8), ("gpt2-124M", 1), ("gpt2-124M", 8)]
    for row in results["sample"]:
        assert row["tok_per_s"] > 0 and row["bandwidth_bound_tok_per_s"] > 0
    # The rotary CPU config has no Hugging Face twin; the GPT-2-shaped model has.
    assert all(r["hf_tok_per_s"] is None for r in results["sample"] if r["model"] == "cpu-config")
    assert all(r["hf_tok_per_s"] > 0 and r["speedup_vs_hf"] > 0 for r in results["sample"] if r["model"] == "gpt2-124M")


def test_prepare_row_and_markdown_table(report):
    results, stdout = report
    prepare = results["prepare"]
    for key in ("raw_mb_per_s", "prepare_mb_per_s", "speedup", "peak_rss_mb", "small_peak_rss_mb"):
        assert prepare[key] > 0, key
    assert prepare["small_corpus_mb"] < prepare["corpus_mb"]
    assert results["machine"]["torch"] and results["machine"]["cores"] >= 1
    for header in ("| train |", "| sample |", "| prepare |"):
        assert header in stdout


def test_profile_prints_the_top_ops_of_a_training_and_a_sampling_step(report):
    _, stdout = report
    training, sampling = stdout.split("training step")[1].split("sampling,")
    assert "aten::mm" in training and "aten::" in sampling and "Self CPU time total" in sampling


def test_unknown_part_is_refused_in_one_line():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--only", "trian"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "unknown part 'trian'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_bench_without_a_gpu_says_so_in_one_line_and_exits_2():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py")], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip() == "bench_gpu.py needs a CUDA device; scripts/bench.py measures the CPU"


def test_gpu_kernel_table_ranks_kernels_and_says_how_busy_the_gpu_was():
    module = load_script("bench_gpu")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(key="gemm", device_type=cuda, self_device_time_total=3000.0, count=40),
              SimpleNamespace(key="aten::mm", device_type=cpu, self_device_time_total=0.0, count=40),
              SimpleNamespace(key="triton_fused", device_type=cuda, self_device_time_total=1000.0, count=120)]
    prof = SimpleNamespace(key_averages=lambda: events)
    table = module.kernel_table(prof, units=4, unit="step", wall_s=0.008)
    # 4 ms of kernels in 8 ms of wall time; 160 kernels over 4 steps; the CPU op is not a kernel.
    assert table.splitlines()[0] == ("GPU busy 50% of the wall time; per step: 40 kernels, 1.000 ms of kernel time, "
                                     "2.000 ms of wall time")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows == ["| `gemm` | 75.0% | 10.0 | 750 |", "| `triton_fused` | 25.0% | 30.0 | 250 |"]


def test_weights_bench_reports_every_choice_against_fp32_and_the_bound(tmp_path):
    """scripts/bench_weights.py: a speed row for each choice and for transformers, at batch 1 and 8."""
    out = tmp_path / "weights.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_weights.py"), "--quick", "--tiny",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text(encoding="utf-8"))["speed"]["rows"]
    assert [(r["batch"], r["weights"]) for r in rows] == [
        (batch, name) for batch in (1, 8) for name in ("fp32 unpacked", "fp32", "bf16", "int8", "transformers fp32")]
    assert all(r["tok_per_s"] > 0 and r["fp32_bound_tok_per_s"] > 0 for r in rows)
    assert all(r["vs_fp32"] == 1.0 for r in rows if r["weights"] == "fp32")


def test_plot_runs_reads_the_evaluations_of_a_run_folder_and_of_a_commented_csv(tmp_path):
    plot_runs = load_script("plot_runs")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("iter,loss,eval_train_loss,val_loss\n250,2.0,,\n500,1.8,1.7,1.9\n")
    assert plot_runs.evaluations(run) == [{"iter": 500.0, "eval_train_loss": 1.7, "val_loss": 1.9}]
    shipped = plot_runs.evaluations(REPO / "docs" / "data" / "shakespeare_char_avx2_2026-11-25.csv")
    assert [row["iter"] for row in shipped] == [1000, 2000, 3000, 4000, 4096]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 is an x86 instruction set")
def test_as_avx2_runs_a_command_and_its_subprocesses_as_on_a_cpu_without_native_bf16():
    """scripts/as_avx2.py: torch's kernels capped at AVX2 and gpt taking the fp32 path (the AVX2
    recipe of the shipped char config, fp32 autocast, Muon's fp32 iteration), in a grandchild too."""
    probe = ("import torch; from gpt.config import load_config; from gpt.device import host_kind, pick_dtype; "
             "from gpt.training.optim import Fp32Muon, muon_class; cpu = torch.device('cpu'); "
             "c = load_config('configs/shakespeare_char.yaml'); "
             "print(torch.backends.cpu.get_cpu_capability(), host_kind(cpu), pick_dtype('auto', cpu), "
             "muon_class(cpu) is Fp32Muon or not hasattr(torch.optim, 'Muon'), c.model.block_size, c.train.batch_size)")
    nested = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {probe!r}], check=True)"
    done = subprocess.run([sys.executable, "scripts/as_avx2.py", sys.executable, "-c", nested],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    capability, *rest = done.stdout.split()
    assert capability in ("AVX2", "DEFAULT") and rest == ["cpu", "torch.float32", "True", "128", "16"]
    usage = subprocess.run([sys.executable, "scripts/as_avx2.py"], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "COMMAND" in usage.stderr
    missing = subprocess.run([sys.executable, "scripts/as_avx2.py", "no-such-program"], capture_output=True, text=True,
                             cwd=REPO)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "'no-such-program'" in missing.stderr
