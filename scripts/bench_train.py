"""Quality-per-wall-clock benchmark: train a config, then score the final weights on the whole val split.

    python scripts/bench_train.py configs/shakespeare_char.yaml [section.key=value ...]

Trains with `gpt train` (wall time includes start-up, periodic evals and checkpoints), then
scores the final weights once over the whole val split (`gpt eval`'s loss: strided windows,
every token scored once), so the number does not depend on the config's own eval settings.
Beside it, the figure this script reported before (mean loss of 200 fixed random batches of
32 windows per split), for comparison with older rows of BENCHMARKS.md.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from gpt.checkpoint import load_model, read_checkpoint
from gpt.config import load_config
from gpt.data.shards import load_dataset
from gpt.data.tokenizer import TokenizerSpec
from gpt.device import autocast_for, cpu_has_native_bf16
from gpt.evaluation.perplexity import LMResult, evaluate_lm
from gpt.model import GPT
from gpt.training.objectives import evaluate

FP32 = autocast_for(torch.device("cpu"), torch.float32)


def train_timed(args: list[str]) -> float:
    """Run `gpt train --overwrite [CONFIG] OVERRIDES` in a fresh process; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gpt.cli", "train", "--overwrite", *args], check=True)
    return time.perf_counter() - start


def whole_val(model: GPT, tokenizer: TokenizerSpec, data_dir: str | Path) -> LMResult:
    """The model's loss over the whole val split of `data_dir`, as `gpt eval --data` measures it."""
    return evaluate_lm(model, tokenizer, data_dir, split="val", batch_size=16, autocast=FP32)


def host() -> str:
    """The CPU, whether it has native bf16, and torch's thread count: what the numbers depend on."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16 (fp32)"
    return f"{name}, {bf16}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    config_path, overrides = sys.argv[1], sys.argv[2:]
    config = load_config(config_path, overrides)
    wall = train_timed([config_path, *overrides])
    ckpt = read_checkpoint(config.train.out_dir)
    model = load_model(ckpt)
    whole = whole_val(model, ckpt.tokenizer_spec, config.data.dir)
    batches = evaluate(model, load_dataset(config.data.dir), model.config.block_size, 32, 200, seed=0,
                       device=torch.device("cpu"), autocast=FP32)
    print(f"\n| {date.today()} | {host()} | `python {' '.join(sys.argv)}` | {ckpt.state.iter} iters "
          f"| {wall / 60:.1f} min | val {whole.loss:.4f} ({whole.bits_per_byte:.3f} bits/byte) "
          f"| 200 batches: train {batches['train']:.4f}, val {batches['val']:.4f} |")
    print(f"loss curve: {Path(config.train.out_dir) / 'loss.png'}")


if __name__ == "__main__":
    main()
