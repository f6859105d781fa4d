"""Every speed number of issue 14, measured in one run on this machine: a markdown table and JSON.

    python scripts/bench.py [--only train,sample,prepare,compile] [--quick] [--json PATH] [--profile]

- train: ms/iter and tokens/s of `gpt train`'s step (our model, `accumulate_gradients`,
  `optimizer_step`, the optimizer and the dtype/compile policy it uses on this device) against
  a plain nanoGPT-style reference kept in this file (unfused AdamW, exact GELU, eager),
  interleaved and repeated on the same random batches, median ratio. Achieved FLOP/s counts
  6 N + 12 n_layer n_embd block_size per token (N: weights without position embeddings,
  the PaLM formula of `GPT.flops_per_token`) and is divided by torch.mm's FLOP/s measured here
  at the model's own matmul shapes, in the dtype the step computes in
  (`gpt.device.measured_matmul_flops`).
- sample: greedy decoding tokens/s at batch 1 and 8 (one shared prefill), beside the
  memory-bandwidth bound (bytes of the weights read per step / measured copy bandwidth) and,
  when transformers is installed, its `generate` with its KV cache on the same weights.
- prepare: `gpt prepare` MB/s against raw tiktoken `encode_ordinary_batch` on the same text
  with the same threads, and the peak RSS of a prepare process at two corpus sizes.
- compile: torch.compile per region (MLP, norms, whole model) against eager, with compile time.
- --profile: torch.profiler's top ops of a training step and of a sampling step.

Timings of two things are taken alternately (ours, reference, ours, ...), so a machine that
gets slower during the run slows both alike; the ratio is the median over repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig, build_config
from gpt.data.shards import BatchSampler, DeviceBatches
from gpt.data.sources import BUNDLED_DATA
from gpt.data.tokenizer import gpt2_encoding
from gpt.device import (
    autocast_for,
    maybe_compile,
    measured_matmul_flops,
    pick_device,
    pick_dtype,
    training_matmul_shapes,
)
from gpt.inference.sample import decode
from gpt.inference.weights import pack_for_cpu_decoding
from gpt.model import GPT
from gpt.training.loop import accumulate_gradients, optimizer_step
from gpt.training.optim import make_optimizer

# The two training shapes. The 6-layer one runs batch 8 (not nanoGPT's 64) to keep an
# iteration near a second on a 2-core CPU; tokens/s hardly depends on it at this size.
TRAIN_MODELS = {
    "baby": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65), 12),
    "6-layer": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65), 8),
}
SAMPLE_MODELS = {
    "cpu-config": dict(n_layer=4, n_head=4, n_embd=192, block_size=512, vocab_size=65, pos_encoding="rope"),
    "gpt2-124M": dict(preset="gpt2"),
}
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)  # --tiny: every model at this size (tests)


# ----------------------------------------------------------------------------- the reference

class RefBlock(nn.Module):
    """nanoGPT's block, written the plain way: LayerNorm, fused-QKV causal SDPA, exact GELU."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd, bias=False), nn.LayerNorm(c.n_embd, bias=False)
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=False)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(RefBlock(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=False)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def reference_step(model: RefGPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """nanoGPT's train.py step without grad accumulation: forward, backward, clip, AdamW, zero."""
    model(x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- timing helpers

def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved(ours: Callable[[], Any], theirs: Callable[[], Any] | None, budget_s: float, repeats: int
                ) -> dict[str, float | None]:
    """Median seconds per call of each, and the median of the per-repeat speed-ups theirs/ours
    (only ours when there is nothing to compare with). Each timing repeats the call for about
    `budget_s` seconds, as many calls as the warm-up call says fit."""
    contenders = [ours] if theirs is None else [ours, theirs]
    warm_up = min(seconds_per_call(fn, 1) for fn in contenders)  # allocations, kernel selection, lazy init
    calls = max(1, round(budget_s / warm_up))
    runs = [[seconds_per_call(fn, calls) for fn in contenders] for _ in range(repeats)]
    if theirs is None:
        return {"ours_s": statistics.median(r[0] for r in runs), "theirs_s": None, "speedup": None}
    return {"ours_s": statistics.median(r[0] for r in runs), "theirs_s": statistics.median(r[1] for r in runs),
            "speedup": statistics.median(r[1] / r[0] for r in runs)}


def model_config(fields: dict[str, Any], tiny: bool) -> ModelConfig:
    return build_config({"model": {**fields, **(TINY if tiny else {})}}).model


# ----------------------------------------------------------------------------- train

def our_step(config: ModelConfig, device: torch.device, compile_mode: str | None = None
             ) -> tuple[GPT, Callable[[list], None]]:
    """The step `gpt train` runs on this device, with its defaults (weight decay 0.1, clip 1);
    `compile_mode` compiles with that torch.compile mode instead (an experiment on GPUs)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), device)
    forward = maybe_compile(model, "auto", device) if compile_mode is None else torch.compile(model, mode=compile_mode)
    autocast = autocast_for(device, pick_dtype("auto", device))

    def step(batches: list) -> None:
        accumulate_gradients(forward, batches, autocast)
        optimizer_step(model, optimizer, None, 1.0)
    return model, step


def bench_train(name: str, args: argparse.Namespace) -> dict[str, Any]:
    fields, batch = TRAIN_MODELS[name]
    config = model_config(fields, args.tiny)
    device = torch.device("cpu")
    model, step = our_step(config, device)
    torch.manual_seed(0)
    reference = RefGPT(config)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    data = torch.randint(0, config.vocab_size, (batch, config.block_size + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    timing = interleaved(lambda: step([(x, y)]), lambda: reference_step(reference, ref_optimizer, x, y),
                         args.budget_s, args.repeats)
    tokens = batch * config.block_size
    tok_s = tokens / timing["ours_s"]
    loader_s = loader_seconds(config.block_size, batch, args.budget_s)
    flops = model.flops_per_token() * tok_s
    matmul = measured_matmul_flops(training_matmul_shapes(model, tokens), pick_dtype("auto", device))
    return {"model": name, "params": model.num_params(), "batch": batch, "block_size": config.block_size,
            "ms_per_iter": 1000 * timing["ours_s"], "ref_ms_per_iter": 1000 * timing["theirs_s"],
            "tok_per_s": tok_s, "ref_tok_per_s": tokens / timing["theirs_s"], "speedup": timing["speedup"],
            "flops_per_token": model.flops_per_token(), "achieved_flops": flops, "matmul_flops": matmul,
            "fraction_of_matmul": flops / matmul, "loader_ms_per_batch": 1000 * loader_s,
            "loader_fraction_of_step": loader_s / timing["ours_s"]}


def loader_seconds(block_size: int, batch: int, budget_s: float) -> float:
    """Seconds `gpt train`'s data loader takes to draw one step's batch from a 10M-token shard
    (on a CPU it draws in the training thread, so this time adds to the step)."""
    shard = np.random.default_rng(0).integers(0, 65, 10_000_000, dtype=np.uint16)
    batches = DeviceBatches(BatchSampler([shard], block_size, batch, seed=0), 1, torch.device("cpu"))
    return interleaved(batches.next, None, budget_s, repeats=3)["ours_s"]


# ----------------------------------------------------------------------------- sample

def copy_bandwidth(megabytes: int) -> float:
    """Bytes per second of a large tensor copy, counting the bytes read and the bytes written."""
    src = torch.ones(megabytes * (1 << 20) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(seconds_per_call(lambda: dst.copy_(src), 1) for _ in range(5))
    return 2 * src.numel() * 4 / best


def weight_bytes_per_step(model: GPT) -> int:
    """Bytes of the weights one decoding step reads: all of them once, except the position
    table, of which it reads one row (the KV cache read is left out of the bound)."""
    skipped = model.wpe.weight.numel() if model.wpe is not None else 0
    return sum(p.numel() * p.element_size() for p in model.parameters()) - skipped * 4


def hf_twin(model: GPT):
    """transformers' GPT2LMHeadModel holding the same weights, through gpt.convert's export
    mapping; None when transformers is missing or the model is not GPT-2-shaped."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    from gpt.convert import _hf_config, _to_gpt2_tensors

    if model.config.pos_encoding != "learned":
        return None
    hf = GPT2LMHeadModel(GPT2Config(**_hf_config(model.config, None))).eval()
    missing, unexpected = hf.load_state_dict(_to_gpt2_tensors(model), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if unexpected or any(not key.endswith("attn.bias") and key not in tied for key in missing):
        raise RuntimeError(f"export mapping mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf


def bench_sample(name: str, args: argparse.Namespace, bandwidth: float) -> list[dict[str, Any]]:
    config = model_config(SAMPLE_MODELS[name], args.tiny)
    torch.manual_seed(0)
    model = GPT(config).eval()
    hf = hf_twin(model)
    params, weight_bytes = model.num_params(), weight_bytes_per_step(model)
    model = pack_for_cpu_decoding(model)  # as `gpt sample` runs it
    steps = min(args.sample_tokens, config.block_size - 1)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    rows = []
    for batch in (1, 8):
        def ours(batch: int = batch) -> None:
            for _ in decode(model, prompt, steps, lambda logits: logits.argmax(-1), copies=batch):
                pass

        def theirs(batch: int = batch) -> None:
            with torch.no_grad():
                hf.generate(prompt.repeat(batch, 1), attention_mask=torch.ones(batch, 1, dtype=torch.long),
                            max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True,
                            pad_token_id=0)
        timing = interleaved(ours, theirs if hf is not None else None, args.budget_s, args.repeats)
        bound = batch * bandwidth / weight_bytes
        tok_s = batch * steps / timing["ours_s"]
        rows.append({"model": name, "params": params, "batch": batch, "new_tokens": steps,
                     "tok_per_s": tok_s, "bandwidth_bound_tok_per_s": bound, "fraction_of_bound": tok_s / bound,
                     "hf_tok_per_s": batch * steps / timing["theirs_s"] if hf is not None else None,
                     "speedup_vs_hf": timing["speedup"]})
    return rows


# ----------------------------------------------------------------------------- prepare

# Peak RSS from /proc's VmHWM, which belongs to the child's own memory map: getrusage's ru_maxrss
# keeps the parent's high-water mark across fork and exec (it read 2 GB, the sampling models').
PREPARE_CHILD = """
import json, resource, sys, time
from pathlib import Path
from gpt.data.prepare import PrepareOptions, prepare
from gpt.data.tokenizer import gpt2_encoding
gpt2_encoding()  # start-up, like the interpreter's: the parent's raw tiktoken has its encoding built too
start = time.perf_counter()
prepare(PrepareOptions(sources=[sys.argv[1]], tokenizer="gpt2", out=sys.argv[2], workers=int(sys.argv[3])))
seconds = time.perf_counter() - start
status = Path("/proc/self/status")
if status.exists():
    hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    peak_mb = int(hwm.split()[1]) / 1024
else:  # not Linux: ru_maxrss (kilobytes on Linux, bytes on macOS)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))
"""


def run_prepare(corpus: Path, out: Path, workers: int) -> dict[str, float]:
    """`gpt prepare` in a fresh process, so that its peak RSS is its own (timed inside it)."""
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", PREPARE_CHILD, str(corpus), str(out), str(workers)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    workers = os.cpu_count() or 1
    base = (BUNDLED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    sizes = {}
    for label, megabytes in (("small", args.prepare_mb / 4), ("large", args.prepare_mb)):
        text = base * max(1, round(megabytes * 1e6 / len(base.encode())))
        sizes[label] = (work / f"{label}.txt", text)
        sizes[label][0].write_text(text, encoding="utf-8")
    corpus, text = sizes["large"]
    encoding = gpt2_encoding()
    pieces = [text[i:i + 1_000_000] for i in range(0, len(text), 1_000_000)]
    runs = []
    for _ in range(args.repeats):  # interleaved: raw tiktoken in this process, prepare in a child
        start = time.perf_counter()
        encoding.encode_ordinary_batch(pieces, num_threads=workers)
        raw_s = time.perf_counter() - start
        runs.append((raw_s, run_prepare(corpus, work / "out", workers)))
    small = run_prepare(sizes["small"][0], work / "out", workers)
    megabytes = corpus.stat().st_size / 1e6
    raw_s = statistics.median(r[0] for r in runs)
    ours_s = statistics.median(r[1]["seconds"] for r in runs)
    return {"corpus_mb": megabytes, "workers": workers, "raw_mb_per_s": megabytes / raw_s,
            "prepare_mb_per_s": megabytes / ours_s, "speedup": statistics.median(r[0] / r[1]["seconds"] for r in runs),
            "peak_rss_mb": max(r[1]["peak_rss_mb"] for r in runs),
            "small_corpus_mb": sizes["small"][0].stat().st_size / 1e6, "small_peak_rss_mb": small["peak_rss_mb"]}


# ----------------------------------------------------------------------------- compile per region

def compiled_regions(model: GPT, region: str) -> None:
    """Compile, in place, the submodules of one region: "mlp", "norms" or "model" (all blocks)."""
    for block in model.blocks:
        if region == "mlp":
            block.mlp.compile()
        elif region == "norms":
            block.norm1.compile()
            block.norm2.compile()
        else:
            block.compile()


def bench_compile(args: argparse.Namespace) -> list[dict[str, Any]]:
    fields, batch = TRAIN_MODELS["baby"]
    config = model_config(fields, args.tiny)
    data = torch.randint(0, config.vocab_size, (batch, config.block_size + 1))
    batches = [(data[:, :-1], data[:, 1:])]
    device = torch.device("cpu")
    _, eager = our_step(config, device)
    rows = []
    for region in ("mlp", "norms", "model"):
        model, step = our_step(config, device)
        compiled_regions(model, region)
        start = time.perf_counter()
        step(batches)  # compiles
        compile_s = time.perf_counter() - start
        timing = interleaved(lambda step=step: step(batches), lambda: eager(batches), args.budget_s, args.repeats)
        rows.append({"region": region, "compile_s": compile_s, "ms_per_iter": 1000 * timing["ours_s"],
                     "eager_ms_per_iter": 1000 * timing["theirs_s"], "speedup": timing["speedup"],
                     "break_even_iters": _break_even(compile_s, timing["theirs_s"] - timing["ours_s"])})
    return rows


def _break_even(compile_s: float, saved_per_iter_s: float) -> float | None:
    return compile_s / saved_per_iter_s if saved_per_iter_s > 0 else None


# ----------------------------------------------------------------------------- profile

def profile_tables(args: argparse.Namespace) -> str:
    """torch.profiler's top ops (by self CPU time) of training steps and of sampling steps."""
    from torch.profiler import ProfilerActivity, profile

    fields, batch = TRAIN_MODELS["6-layer"]
    config = model_config(fields, args.tiny)
    _, step = our_step(config, torch.device("cpu"))
    data = torch.randint(0, config.vocab_size, (batch, config.block_size + 1))
    batches = [(data[:, :-1], data[:, 1:])]
    step(batches)
    with profile(activities=[ProfilerActivity.CPU]) as train_prof:
        for _ in range(3):
            step(batches)
    sampler = pack_for_cpu_decoding(GPT(model_config(SAMPLE_MODELS["gpt2-124M"], args.tiny)).eval())
    prompt = torch.zeros(1, 1, dtype=torch.long)
    with profile(activities=[ProfilerActivity.CPU]) as sample_prof:
        for _ in decode(sampler, prompt, 16, lambda logits: logits.argmax(-1)):
            pass
    table = "self_cpu_time_total"
    return (f"training step, 6-layer model, 3 steps:\n"
            f"{train_prof.key_averages().table(sort_by=table, row_limit=12)}\n"
            f"sampling, GPT-2 124M shape, batch 1, 16 tokens:\n"
            f"{sample_prof.key_averages().table(sort_by=table, row_limit=12)}")


# ----------------------------------------------------------------------------- report

def machine() -> dict[str, Any]:
    flags = set()
    model_name = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    simd = sorted(f for f in flags if f in ("avx", "avx2", "fma") or f.startswith(("avx512", "amx")))
    return {"cpu": model_name, "simd_flags": simd, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv])}


def machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m['cpu']} ({', '.join(m['simd_flags'])}), {m['cores']} cores, {m['torch_threads']} torch "
            f"threads, torch {m['torch']}, Python {m['python']}; {m['date']}; `{m['command']}`\n")


def train_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| train | params | batch x block | ours ms/iter | ref ms/iter | ours tok/s | speed-up "
             "| achieved GFLOP/s | torch.mm GFLOP/s | fraction | loader ms |", "|" + "---|" * 11]
    lines += [f"| {r['model']} | {r['params']:,} | {r['batch']} x {r['block_size']} | {r['ms_per_iter']:.1f} "
              f"| {r['ref_ms_per_iter']:.1f} | {r['tok_per_s']:,.0f} | {r['speedup']:.2f}x "
              f"| {r['achieved_flops'] / 1e9:.1f} | {r['matmul_flops'] / 1e9:.1f} | {r['fraction_of_matmul']:.0%} "
              f"| {r['loader_ms_per_batch']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def sample_table(rows: list[dict[str, Any]], bandwidth: float) -> str:
    lines = ["| sample | batch | new tokens | ours tok/s | bandwidth bound tok/s | fraction "
             "| transformers tok/s | ours / transformers |", "|" + "---|" * 8]
    for r in rows:
        hf = r["hf_tok_per_s"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['tok_per_s']:,.1f} "
                     f"| {r['bandwidth_bound_tok_per_s']:,.1f} | {r['fraction_of_bound']:.0%} "
                     f"| {'-' if hf is None else f'{hf:,.1f}'} "
                     f"| {'-' if hf is None else '{:.2f}x'.format(r['speedup_vs_hf'])} |")
    return "\n".join(lines) + f"\n\nCopy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write).\n"


def prepare_table(p: dict[str, Any]) -> str:
    return ("| prepare | workers | raw tiktoken MB/s | `gpt prepare` MB/s | ratio | peak RSS |\n" + "|" + "---|" * 6
            + f"\n| {p['corpus_mb']:.0f} MB | {p['workers']} | {p['raw_mb_per_s']:.2f} | {p['prepare_mb_per_s']:.2f} "
            f"| {p['speedup']:.2f}x | {p['peak_rss_mb']:.0f} MB ({p['small_peak_rss_mb']:.0f} MB for "
            f"{p['small_corpus_mb']:.0f} MB) |\n")


def compile_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| torch.compile of | compile s | ms/iter | eager ms/iter | speed-up | break-even iters |",
             "|" + "---|" * 6]
    for r in rows:
        even = "never" if r["break_even_iters"] is None else f"{r['break_even_iters']:,.0f}"
        lines.append(f"| {r['region']} | {r['compile_s']:.1f} | {r['ms_per_iter']:.1f} "
                     f"| {r['eager_ms_per_iter']:.1f} | {r['speedup']:.2f}x | {even} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="train,sample,prepare",
                        help="comma-separated parts: train, sample, prepare, compile")
    parser.add_argument("--quick", action="store_true", help="few repeats and short runs: a smoke test")
    parser.add_argument("--tiny", action="store_true", help="every model at a tiny size (for the tests)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops for train and sample")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    unknown = parts - {"train", "sample", "prepare", "compile"}
    if unknown:
        parser.error(f"unknown part {sorted(unknown)[0]!r} in --only; choose from train, sample, prepare, compile")
    args.parts = parts
    args.repeats, args.budget_s = (1, 0.1) if args.quick else (5, 2.0)
    args.sample_tokens = 8 if args.quick else 64
    args.prepare_mb = 2 if args.quick else 40
    return args


def show(text: str) -> None:
    """Print one table as soon as it is measured: a long run cut short keeps what it has."""
    print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if pick_device("auto").type != "cpu":
        print("note: this benchmark measures the CPU; GPUs are not covered yet", file=sys.stderr)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "tiny": args.tiny}
    show(machine_line(results["machine"]))
    if "train" in args.parts:
        results["train"] = [bench_train(name, args) for name in TRAIN_MODELS]
        show(train_table(results["train"]))
    if "sample" in args.parts:
        bandwidth = results["copy_bandwidth"] = copy_bandwidth(64 if args.tiny else 512)
        results["sample"] = [row for name in SAMPLE_MODELS for row in bench_sample(name, args, bandwidth)]
        show(sample_table(results["sample"], bandwidth))
    if "prepare" in args.parts:
        work = Path(tempfile.mkdtemp(prefix="bench_"))
        try:
            results["prepare"] = bench_prepare(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        show(prepare_table(results["prepare"]))
    if "compile" in args.parts:
        results["compile"] = bench_compile(args)
        show(compile_table(results["compile"]))
    if args.profile:
        show(profile_tables(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
