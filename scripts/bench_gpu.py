"""The GPU numbers of issue 14, measured in one run on one CUDA device: markdown tables and JSON.

    python scripts/bench_gpu.py [--only train,sample] [--batch 16,32] [--nanogpt DIR] [--json PATH]
                                [--compile-mode max-autotune] [--profile]

- train: GPT-2 124M (block 1024) through the step `gpt train` runs on this GPU (bf16 autocast,
  torch.compile, fused AdamW): ms/iter, tokens/s and MFU against the GPU's datasheet bf16 peak
  (`gpt.device.GPU_PEAK_FLOPS`), with GPT-2's vocabulary (50,257) and padded to 50,304 as nanoGPT
  does. With --nanogpt DIR (a checkout of karpathy/nanoGPT), its own train.py runs on the same
  GPU, batch and block on random tokens; its MFU is rescaled to this GPU's peak (it divides by an
  A100's 312 TFLOP/s). Both count 6 N + 12 n_layer n_embd block_size FLOPs per token.
- sample: greedy decoding tokens/s of GPT-2 124M (random weights) at batch 1 and 8 after a
  one-token prompt: as `gpt sample` runs it (weights in bf16, static cache, compiled one-token
  step replayed as a CUDA graph), the same with fp32 weights under bf16 autocast, fp32 eager with
  the growing cache, and transformers' `generate` (bf16 weights, its KV cache) when it is
  installed; beside the bound that reading every weight once per step at the measured copy
  bandwidth allows.
- --compile-mode: train with that torch.compile mode instead of the default `gpt train` uses.
- --profile: torch.profiler's top GPU kernels of a training step and of a sampling token, with
  how busy the GPU was (kernel time over wall time: far below 100% means the host is the limit).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from bench import hf_twin, our_step, weight_bytes_per_step

from gpt.config import build_config
from gpt.device import autocast_for, peak_flops
from gpt.inference.sample import decode
from gpt.inference.weights import prepare_weights
from gpt.model import GPT

NANOGPT_FILES = ("train.py", "model.py", "configurator.py")
NANOGPT_A100_PEAK = 312e12  # what nanoGPT's estimate_mfu divides by


def gpu_seconds(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of fn, the GPU's queue drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def first_call_seconds(fn: Callable[[], Any]) -> float:
    """Seconds of the first two calls (compilation, autotuning, allocator warm-up)."""
    return 2 * gpu_seconds(fn, 2)


# ----------------------------------------------------------------------------- train

def training_run(batch: int, vocab_size: int, compile_mode: str | None) -> tuple[GPT, Callable[[], None]]:
    """GPT-2 124M and one call of `gpt train`'s step on a fixed random batch, compiled afresh."""
    torch._dynamo.reset()  # each shape compiles from scratch, as in a fresh `gpt train`
    config = build_config({"model": {"preset": "gpt2", "vocab_size": vocab_size}}).model
    model, step = our_step(config, torch.device("cuda"), compile_mode)
    data = torch.randint(0, 50257, (batch, config.block_size + 1), device="cuda")
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    return model, lambda: step([(x, y)])


def bench_train(batch: int, vocab_size: int, steps: int, compile_mode: str | None) -> dict[str, Any]:
    torch.cuda.reset_peak_memory_stats()
    model, run = training_run(batch, vocab_size, compile_mode)
    compile_s = first_call_seconds(run)
    seconds = statistics.median(gpu_seconds(run, steps) for _ in range(3))
    tok_s = batch * model.config.block_size / seconds
    peak = peak_flops(None, torch.device("cuda"))
    impl = "gpt train" if compile_mode is None else f"gpt train, compile mode {compile_mode}"
    return {"impl": impl, "batch": batch, "vocab_size": vocab_size, "ms_per_iter": 1000 * seconds,
            "tok_per_s": tok_s, "mfu": model.flops_per_token() * tok_s / peak if peak else None,
            "compile_s": compile_s, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def bench_nanogpt(checkout: Path, batch: int, steps: int) -> dict[str, Any]:
    """nanoGPT's train.py, unchanged, on random tokens: the median of its own per-iteration
    times after the first 10 iterations (compilation)."""
    work = Path(tempfile.mkdtemp(prefix="nanogpt_"))
    try:
        for name in NANOGPT_FILES:
            shutil.copy(checkout / name, work / name)
        data = work / "data" / "random"
        data.mkdir(parents=True)
        tokens = np.random.default_rng(0).integers(0, 50257, 4_000_000, dtype=np.uint16)
        for split in ("train", "val"):
            tokens.tofile(data / f"{split}.bin")
        command = [sys.executable, "train.py", "--dataset=random", f"--batch_size={batch}", "--block_size=1024",
                   "--gradient_accumulation_steps=1", f"--max_iters={10 + steps}", "--eval_interval=100000",
                   "--eval_iters=1", "--log_interval=1", "--compile=True", "--dropout=0.0", "--bias=True",
                   "--always_save_checkpoint=False", "--wandb_log=False", "--warmup_iters=10"]
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py failed:\n{done.stderr[-3000:]}")
    times = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", done.stdout)
             if int(it) >= 10]
    seconds = statistics.median(times) / 1000
    peak = peak_flops(None, torch.device("cuda"))
    mfu = [float(m) / 100 for m in re.findall(r"mfu (-?[\d.]+)%", done.stdout)][-1]
    return {"impl": "nanoGPT train.py", "batch": batch, "vocab_size": 50304, "ms_per_iter": 1000 * seconds,
            "tok_per_s": batch * 1024 / seconds, "mfu": mfu * NANOGPT_A100_PEAK / peak if peak else None,
            "compile_s": None, "peak_memory_gb": None}


def train_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| GPT-2 124M training | batch x block | vocab | ms/iter | tokens/s | MFU | compile s | peak GB |",
             "|" + "---|" * 8]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "?"
        compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        lines.append(f"| {r['impl']} | {r['batch']} x 1024 | {r['vocab_size']:,} | {r['ms_per_iter']:.1f} "
                     f"| {r['tok_per_s']:,.0f} | {mfu} | {compile_s} | {memory} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- sample

def gpu_copy_bandwidth(megabytes: int = 1024) -> float:
    """Bytes per second of a device-to-device copy, counting the bytes read and written."""
    src = torch.ones(megabytes * (1 << 20) // 4, device="cuda")
    dst = torch.empty_like(src)
    seconds = min(gpu_seconds(lambda: dst.copy_(src), 10) for _ in range(3))
    return 2 * src.numel() * 4 / seconds


def bench_sample(steps: int, bandwidth: float) -> list[dict[str, Any]]:
    config = build_config({"model": {"preset": "gpt2"}}).model
    torch.manual_seed(0)
    model = GPT(config).cuda().eval()
    fp32_bytes = weight_bytes_per_step(model)
    hf = hf_twin(model.cpu())
    model.cuda()
    if hf is not None:
        hf = hf.to("cuda", torch.bfloat16)
    bf16_model = GPT(config).cuda().eval()
    bf16_model.load_state_dict(model.state_dict())
    bf16_model, _ = prepare_weights(bf16_model, "auto")  # as `gpt sample` runs it: bf16 weights
    autocast = autocast_for(torch.device("cuda"), torch.bfloat16)
    prompt = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    greedy = lambda logits: logits.argmax(-1)  # noqa: E731

    def ours(net: GPT, batch: int, static: bool, under_autocast: bool) -> Callable[[], None]:
        def run() -> None:
            with autocast() if under_autocast else torch.no_grad():
                for _ in decode(net, prompt, steps, greedy, copies=batch, static_cache=static):
                    pass
        return run

    def theirs(batch: int) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                hf.generate(prompt.repeat(batch, 1), attention_mask=torch.ones_like(prompt).repeat(batch, 1),
                            max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True,
                            pad_token_id=0)
        return run

    rows = []
    for batch in (1, 8):
        contenders = {"fp32 weights, autocast, eager, growing cache": (ours(model, batch, False, True), fp32_bytes),
                      "fp32 weights, autocast, compiled step as a CUDA graph":
                      (ours(model, batch, True, True), fp32_bytes),
                      "gpt sample: bf16 weights, compiled step as a CUDA graph":
                      (ours(bf16_model, batch, True, True), fp32_bytes // 2)}
        if hf is not None:
            contenders["transformers generate (bf16 weights)"] = (theirs(batch), fp32_bytes // 2)
        for name, (run, weight_bytes) in contenders.items():
            warm_s = first_call_seconds(run)
            seconds = statistics.median(gpu_seconds(run, 1) for _ in range(3))
            tok_s = batch * steps / seconds
            bound = batch * bandwidth / weight_bytes
            rows.append({"impl": name, "batch": batch, "new_tokens": steps, "tok_per_s": tok_s,
                         "bound_tok_per_s": bound, "fraction_of_bound": tok_s / bound, "first_calls_s": warm_s})
            print(sample_table(rows[-1:]), flush=True)
    return rows


def sample_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| GPT-2 124M sampling | batch | tokens/s | bound tokens/s | of bound | first 2 calls s |",
             "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['batch']} | {r['tok_per_s']:,.0f} | {r['bound_tok_per_s']:,.0f} "
                     f"| {100 * r['fraction_of_bound']:.1f}% | {r['first_calls_s']:.1f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- profile

def kernel_table(prof: Any, units: int, unit: str, wall_s: float, rows: int = 15) -> str:
    """The GPU kernels of a profile, by their total time: share of all kernel time, calls and
    microseconds per `unit`; above it, how busy the GPU was over the profiled wall time."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels) or 1.0
    calls = sum(e.count for e in kernels)
    lines = [f"GPU busy {total_us / 1e6 / wall_s:.0%} of the wall time; per {unit}: {calls / units:.0f} kernels, "
             f"{total_us / units / 1000:.3f} ms of kernel time, {1000 * wall_s / units:.3f} ms of wall time", "",
             f"| kernel | share of kernel time | calls per {unit} | us per {unit} |", "|---|---|---|---|"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        lines.append(f"| `{e.key[:90]}` | {e.self_device_time_total / total_us:.1%} | {e.count / units:.1f} "
                     f"| {e.self_device_time_total / units:,.0f} |")
    return "\n".join(lines) + "\n"


def profiled(fn: Callable[[], Any], calls: int) -> tuple[Any, float]:
    """torch.profiler (CPU and CUDA) around `calls` calls of fn, and their wall seconds."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    return prof, wall_s


def profile_train(batch: int, vocab_size: int, compile_mode: str | None, steps: int = 5) -> str:
    _, run = training_run(batch, vocab_size, compile_mode)
    for _ in range(3):  # compile, autotune, allocate
        run()
    prof, wall_s = profiled(run, steps)
    return f"GPT-2 124M training step, batch {batch} x 1024, vocab {vocab_size:,}:\n" + kernel_table(
        prof, steps, "step", wall_s)


def profile_sample(tokens: int = 64) -> str:
    """Kernels of `gpt sample`'s decoding at batch 1 (bf16 weights, CUDA graph replays), per token."""
    torch.manual_seed(0)
    model, _ = prepare_weights(GPT(build_config({"model": {"preset": "gpt2"}}).model).cuda().eval(), "auto")
    prompt = torch.zeros(1, 1, dtype=torch.long, device="cuda")

    def run() -> None:
        with autocast_for(torch.device("cuda"), torch.bfloat16)():
            for _ in decode(model, prompt, tokens, lambda logits: logits.argmax(-1)):
                pass
    run()  # compile and record
    prof, wall_s = profiled(run, 1)
    return f"GPT-2 124M sampling, batch 1, bf16 weights, {tokens} tokens (one prefill among them):\n" + kernel_table(
        prof, tokens, "token", wall_s)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="train,sample", help="comma-separated parts: train, sample")
    parser.add_argument("--batch", default="16", help="comma-separated training batch sizes (sequences of 1024)")
    parser.add_argument("--vocab", default="50257,50304", help="comma-separated vocabulary sizes to train")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per repeat")
    parser.add_argument("--sample-tokens", type=int, default=256, help="new tokens per sampling run")
    parser.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout, to run its train.py too")
    parser.add_argument("--compile-mode", help="torch.compile mode for training, e.g. max-autotune")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of training and sampling")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device; scripts/bench.py measures the CPU", file=sys.stderr)
        sys.exit(2)
    parts = set(args.only.split(","))
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d")}
    print(f"{results['gpu']} | torch {results['torch']} | CUDA {results['cuda']} | {results['date']}", flush=True)
    if "train" in parts:
        results["train"] = []
        for batch in (int(b) for b in args.batch.split(",")):
            for vocab_size in (int(v) for v in args.vocab.split(",")):
                results["train"].append(bench_train(batch, vocab_size, args.steps, args.compile_mode))
                print(train_table(results["train"][-1:]), flush=True)
            if args.nanogpt:
                results["train"].append(bench_nanogpt(args.nanogpt, batch, args.steps))
                print(train_table(results["train"][-1:]), flush=True)
        print("all training rows:\n" + train_table(results["train"]), flush=True)
    if "sample" in parts:
        bandwidth = results["copy_bandwidth"] = gpu_copy_bandwidth()
        print(f"Copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write).", flush=True)
        results["sample"] = bench_sample(args.sample_tokens, bandwidth)
        print("all sampling rows:\n" + sample_table(results["sample"]), flush=True)
    if args.profile:
        batch, vocab_size = int(args.batch.split(",")[0]), int(args.vocab.split(",")[-1])
        results["profile"] = [profile_train(batch, vocab_size, args.compile_mode), profile_sample()]
        print("\n".join(results["profile"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
