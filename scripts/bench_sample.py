"""Generation speed with and without the KV cache.

    python scripts/bench_sample.py [configs/shakespeare_char.yaml] [--checkpoint RUN_DIR] [--tokens 500]

Uses the checkpoint's model when given, else the config's model with random weights (speed
does not depend on the weights). Greedy decoding of --tokens new tokens from a one-token
prompt, batch 1, on the CPU."""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import torch

from gpt.checkpoint import load_model, read_checkpoint
from gpt.config import load_config
from gpt.inference.sample import decode
from gpt.model import GPT


def tokens_per_second(model: GPT, tokens: int, use_cache: bool, repeats: int = 3) -> float:
    prompt = torch.zeros(1, 1, dtype=torch.long)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in decode(model, prompt, tokens, lambda logits: logits.argmax(-1), use_cache=use_cache):
            pass
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="configs/shakespeare_char.yaml")
    parser.add_argument("--checkpoint")
    parser.add_argument("--tokens", type=int, default=500)
    args = parser.parse_args()
    if args.checkpoint:
        model = load_model(read_checkpoint(args.checkpoint))
    else:
        config = load_config(args.config, ["model.vocab_size=65"]).model
        torch.manual_seed(0)
        model = GPT(config)
    model.eval()
    cached = tokens_per_second(model, args.tokens, use_cache=True)
    full = tokens_per_second(model, args.tokens, use_cache=False)
    c = model.config
    print(f"model: {c.n_layer} layers, {c.n_embd} wide, context {c.block_size}, {model.num_params():,} params")
    print(f"{args.tokens} new tokens: with KV cache {cached:,.0f} tok/s, without {full:,.0f} tok/s, "
          f"speed-up {cached / full:.1f}x")
    print(f"| {date.today()} | {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads "
          f"| context {c.block_size} | {args.tokens} | {cached:,.0f} | {full:,.0f} | {cached / full:.1f}x |")


if __name__ == "__main__":
    main()
