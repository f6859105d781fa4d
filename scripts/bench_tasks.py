"""Does pretraining help? Speaker attribution (scripts/speaker_task.py) on one val set:

- the pretrained CPU model fine-tuned with configs/finetune_speaker.yaml, lm_weight 0.5 and 0;
- the same model trained from scratch on the task only (no init_from);
- a bag-of-words logistic regression and the majority class.

    python scripts/bench_tasks.py --pretrained RUN --data DATA_DIR [--out DIR] [section.key=value ...]

RUN is a language model trained with configs/shakespeare_char.yaml; DATA_DIR the dataset it
was trained on (from-scratch training takes its tokenizer from there). Extra overrides go to
every fine-tuning run. Prints one markdown row per system: val accuracy at the end of
training and at the best evaluation (which best/ keeps; picked on the same val set, so it
flatters), and the wall time."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from speaker_task import speaker_task  # scripts/ is on the path when this file runs

from gpt.checkpoint import read_checkpoint
from gpt.data.sources import recipe_path

CONFIG = "configs/finetune_speaker.yaml"
WORD = re.compile(r"[a-z']+")


def fine_tune(name: str, folder: str, out: Path, overrides: list[str]) -> str:
    """Run `gpt train` on the speaker config into out/folder; a markdown row with final and best val accuracy."""
    run = out / folder
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gpt.cli", "train", CONFIG, "--overwrite", f"train.out_dir={run}",
                    f"task.train={out / 'train.jsonl'}", f"task.val={out / 'val.jsonl'}", *overrides],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    final, best = read_checkpoint(run).state, read_checkpoint(run / "best").state
    return (f"| {name} | {final.accuracy['val']:.3f} | {best.accuracy['val']:.3f} (iter {best.iter}) "
            f"| {wall / 60:.1f} min |")


def words(items: list[dict], vocab: dict[str, int]) -> torch.Tensor:
    """Binary bag-of-words features: 1 where a word of the vocabulary occurs in the text."""
    x = torch.zeros(len(items), len(vocab))
    for row, item in enumerate(items):
        for word in WORD.findall(item["text"].lower()):
            if word in vocab:
                x[row, vocab[word]] = 1.0
    return x


def bag_of_words(train: list[dict], val: list[dict], names: list[str]) -> float:
    """Val accuracy of a multinomial logistic regression on the words of the train texts
    (full batch, AdamW lr 0.05, weight decay 0.01, 300 steps; no tuning on val)."""
    vocab = {w: i for i, w in enumerate(sorted({w for item in train for w in WORD.findall(item["text"].lower())}))}
    x, x_val = words(train, vocab), words(val, vocab)
    y, y_val = (torch.tensor([names.index(item["label"]) for item in items]) for items in (train, val))
    torch.manual_seed(0)
    model = torch.nn.Linear(len(vocab), len(names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(300):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (model(x_val).argmax(-1) == y_val).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="language model run to fine-tune")
    parser.add_argument("--data", required=True, help="its dataset folder (tokenizer for training from scratch)")
    parser.add_argument("--out", default="runs/bench_tasks", help="where the task files and runs go")
    parser.add_argument("--speakers", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every fine-tuning run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = speaker_task(recipe_path("shakespeare").read_text(encoding="utf-8"), args.speakers, 0.2)
    for name, items in (("train", train), ("val", val)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    names = sorted({item["label"] for item in train})
    majority = max(names, key=lambda n: sum(item["label"] == n for item in train))
    rows = [
        fine_tune("fine-tuned, lm_weight 0.5", "tuned", out, [f"train.init_from={args.pretrained}", *args.overrides]),
        fine_tune("fine-tuned, lm_weight 0", "tuned_lm0", out, [f"train.init_from={args.pretrained}",
                                                                "task.lm_weight=0", *args.overrides]),
        fine_tune("from scratch, lm_weight 0.5", "scratch", out, ["train.init_from=null", f"data.dir={args.data}",
                                                                  *args.overrides]),
        f"| bag-of-words logistic regression | {bag_of_words(train, val, names):.3f} | - | - |",
        f"| majority class ({majority}) | {sum(item['label'] == majority for item in val) / len(val):.3f} | - | - |",
    ]
    print(f"\n{len(train)} train and {len(val)} val speeches, {len(names)} speakers\n")
    print("| system | val acc (end) | val acc (best eval) | wall |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
