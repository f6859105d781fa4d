"""Side by side: our CPU config and a plain nanoGPT-style model, trained for the same wall clock.

    python scripts/bench_quality.py [--minutes 10] [--data data/shakespeare_char] [--out runs/bench_quality]

Both runs use `gpt train ... train.max_minutes=M` on this host, one after the other, so each
gets the same budget (evals and checkpoints included; start-up is not). The reference is the CPU
recipe of nanoGPT's README: 4 layers, 4 heads, width 128, context 64, batch 12, AdamW at lr 1e-3
(min 1e-4, 100 warmup steps, beta2 0.99, weight decay 0.1), no dropout, no biases, learned
positions, exact GELU, fp32 (nanoGPT does not autocast on a CPU). Each final model is scored once
on the whole val split (as `gpt eval --data` does); bits per character equal bits per byte on
tiny Shakespeare, which is ASCII. Prints a markdown row per run.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import yaml
from bench_train import host, train_timed, whole_val

from gpt.checkpoint import load_model, read_checkpoint

OURS = "configs/shakespeare_char.yaml"
# Every setting spelled out (the file holds no section we leave to defaults that might change).
NANOGPT_CPU = {
    "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, pos_encoding="learned", activation="gelu",
                  norm="layernorm", norm_position="pre", bias=False, tie_embeddings=True, dropout=0.0,
                  qk_norm=False, zero_init_proj=False, logit_softcap=None),
    "train": dict(batch_size=12, lr=1e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.1, beta1=0.9, beta2=0.99,
                  grad_clip=1.0, optimizer="adamw", dtype="float32", eval_interval=250, eval_iters=20,
                  ckpt_interval=250, log_interval=50),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each run")
    parser.add_argument("--data", default="data/shakespeare_char", help="prepared dataset (gpt prepare)")
    parser.add_argument("--out", default="runs/bench_quality", help="folder for the two runs")
    args = parser.parse_args()
    reference = Path(args.out) / "nanogpt_cpu.yaml"
    reference.parent.mkdir(parents=True, exist_ok=True)
    reference.write_text(yaml.safe_dump(NANOGPT_CPU, sort_keys=False), encoding="utf-8")
    runs = {"ours (configs/shakespeare_char.yaml)": OURS, "nanoGPT CPU recipe": str(reference)}
    rows = []
    for (name, config), folder in zip(runs.items(), ("ours", "nanogpt")):
        out_dir = Path(args.out) / folder
        wall = train_timed([config, f"data.dir={args.data}", f"train.out_dir={out_dir}",
                           f"train.max_minutes={args.minutes}"])
        ckpt = read_checkpoint(out_dir)
        result = whole_val(load_model(ckpt), ckpt.tokenizer_spec, args.data)
        rows.append(f"| {date.today()} | {name} | {args.minutes:g} min budget, {wall / 60:.1f} min wall "
                    f"| {ckpt.state.iter:,} iters | {result.loss:.4f} | {result.bits_per_byte:.3f} |")
    print(f"\nhost: {host()}\n")
    print("| date | run | time | steps | val loss (whole split) | bits/char |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
