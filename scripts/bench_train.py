"""Quality-per-wall-clock benchmark: train a config, then measure val loss over 200 batches.

    python scripts/bench_train.py configs/shakespeare_char.yaml [section.key=value ...]

Trains with `gpt train` (wall time includes start-up, periodic evals and checkpoints), then
evaluates the final weights on 200 fixed val batches, so the number does not depend on the
config's own eval settings."""

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
from gpt.device import autocast_for
from gpt.objectives import evaluate
from gpt.shards import load_dataset


def main() -> None:
    config_path, overrides = sys.argv[1], sys.argv[2:]
    config = load_config(config_path, overrides)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gpt.cli", "train", config_path, "--overwrite", *overrides], check=True)
    wall = time.perf_counter() - start
    ckpt = read_checkpoint(config.train.out_dir)
    model = load_model(ckpt)
    dataset = load_dataset(config.data.dir)
    losses = evaluate(model, dataset, model.config.block_size, 32, 200, seed=0, device=torch.device("cpu"),
                      autocast=autocast_for(torch.device("cpu"), torch.float32))
    print(f"\n| {date.today()} | {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
          f"| `python {' '.join(sys.argv)}` | {ckpt.state['iter']} iters | {wall / 60:.1f} min "
          f"| train {losses['train']:.4f} | val {losses['val']:.4f} |")
    print(f"loss curve: {Path(config.train.out_dir) / 'loss.png'}")


if __name__ == "__main__":
    main()
