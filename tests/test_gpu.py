"""CUDA-only paths that the CPU suite cannot reach. Marked `gpu` and skipped without CUDA;
scripts/gpu_check.sh runs them (`pytest -m gpu`) and prints one line per check."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, shakespeare_data, tiny_config, tiny_yaml

from gpt.checkpoint import load_training_state, read_checkpoint
from gpt.config import apply_overrides, build_config, load_config, to_dict
from gpt.model import GPT, KVCache
from gpt.training.loop import train
from gpt.training.metrics import read_metrics
from gpt.training.optim import make_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _losses(run) -> list[float]:
    return [float(row["loss"]) for row in read_metrics(run / "metrics.csv") if row.get("loss")]


def _cuda_config(char_data, out_dir, *overrides: str, **train_settings):
    config = tiny_config(char_data, out_dir, device="cuda", **train_settings)
    return build_config(apply_overrides(to_dict(config), list(overrides)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_training_learns_and_saves_its_scaler(char_data, tmp_path, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert train(_cuda_config(char_data, tmp_path / "run", dtype=dtype, max_iters=40)) == 0
    losses = _losses(tmp_path / "run")
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 0.3
    training = load_training_state(read_checkpoint(tmp_path / "run").path)
    assert ("scaler" in training) == (dtype == "float16")  # fp16 needs the GradScaler, bf16 does not


def test_compiled_training_matches_eager(char_data, tmp_path):
    runs = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        assert train(_cuda_config(char_data, out, "model.dropout=0.0", dtype="float32", compile=compiled,
                                  max_iters=10)) == 0
        runs[compiled] = _losses(out)
    assert len(runs[True]) == 10
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=2e-3, atol=2e-3)


def test_adamw_is_fused_on_cuda():
    model = GPT(load_config(None, ["model.preset=tiny", "model.vocab_size=64"]).model).cuda()
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cuda"))
    assert optimizer.defaults["fused"] is True
    idx = torch.randint(0, 64, (2, 16), device="cuda")
    before = model.wte.weight.detach().clone()
    model(idx, idx)[1].backward()
    optimizer.step()
    assert torch.isfinite(model.wte.weight).all() and not torch.equal(before, model.wte.weight)


def test_out_of_gpu_memory_is_one_line_and_exit_2(char_data, tmp_path):
    # About 50 GB per activation: more than any single GPU holds.
    config = tiny_yaml(tmp_path, char_data, device="cuda", batch_size=200_000, max_iters=1)
    result = subprocess.run([sys.executable, "-m", "gpt.cli", "train", config, "model.n_embd=2048",
                             "model.n_head=16"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of GPU memory at train.batch_size=200000" in errors[0]


def test_kv_cache_decoding_under_autocast_matches_the_full_forward():
    config = load_config(None, ["model.preset=tiny", "model.vocab_size=64"]).model
    model = GPT(config).cuda().eval()
    idx = torch.randint(0, 64, (2, 12), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cache = KVCache(config, 2, torch.device("cuda"), torch.float32)
        model.forward_step(idx[:, :8], cache)
        stepped = [model.forward_step(idx[:, t:t + 1], cache) for t in range(8, 12)]
        full = model(idx)[0]
    for i, logits in enumerate(stepped):
        torch.testing.assert_close(logits.float(), full[:, 8 + i].float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_one_process_with_nccl_trains_and_resumes(char_data, tmp_path, parallel):
    config = tiny_yaml(tmp_path, char_data, device="cuda", max_iters=6, eval_interval=3, ckpt_interval=3,
                       parallel=parallel)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "gpt.cli", "train"]
    result = subprocess.run([*command, config], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"parallel: {parallel} over 1 processes" in result.stdout
    result = subprocess.run([*command, "--resume", config, "train.max_iters=8"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_checkpoint(tmp_path / "run").state.iter == 8


def test_gpt2_124m_throughput(tmp_path, capsys):
    """30 steps of GPT-2 124M (16 x 1024 tokens, compiled, bf16/fp16 autocast): prints the
    tokens/s and MFU of the last 10 steps (after compilation)."""
    data = shakespeare_data(tmp_path, 10**7, "gpt2")
    out = tmp_path / "run"
    config = load_config(None, ["model.preset=gpt2", f"data.dir={data}", f"train.out_dir={out}", "train.device=cuda",
                                "train.batch_size=16", "train.max_iters=30", "train.log_interval=10",
                                "train.eval_interval=1000", "train.eval_iters=1", "train.ckpt_interval=1000",
                                "train.save_best=false", "train.warmup_iters=10"])
    assert train(config) == 0
    last = read_metrics(out / "metrics.csv")[-1]
    tok_s, mfu = float(last["tok_per_s"]), last.get("mfu")
    with capsys.disabled():
        mfu_text = f"{100 * float(mfu):.1f}%" if mfu else "unknown (set train.peak_flops for this GPU)"
        print(f"\nGPT-2 124M on {torch.cuda.get_device_name()}: {tok_s:,.0f} tok/s, MFU {mfu_text}")
    assert tok_s > 0 and (not mfu or 0 < float(mfu) < 1)
