"""Speaker attribution from the bundled tiny Shakespeare: which of the N most frequent
characters speaks these lines? A real classification task for `task.kind: classify`.

Writes OUT/train.jsonl and OUT/val.jsonl, one {"text", "label"} a line. Each speaker's
speeches are split by their position in the plays: the first (1 - val_fraction) go to train,
the later ones to val, so the two never share a speech; a val speech whose text also occurs
in train (a short "My lord?") is dropped as well.

    python scripts/speaker_task.py [--speakers 8] [--val-fraction 0.2] [--out data/speaker]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from gpt.data.sources import recipe_path
from gpt.durable import replace_atomically


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, lines) of every speech: a block between blank lines whose first line is "NAME:"."""
    found = []
    for block in text.split("\n\n"):
        name, _, lines = block.strip("\n").partition("\n")
        if name.endswith(":") and lines.strip():
            found.append((name[:-1], lines))
    return found


def speaker_task(text: str, speakers: int, val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Train and val items for the `speakers` characters with the most speeches."""
    by_speaker = collections.defaultdict(list)
    for name, lines in speeches(text):
        by_speaker[name].append(lines)
    top = sorted(by_speaker, key=lambda name: -len(by_speaker[name]))[:speakers]
    train, val = [], []
    for name in top:
        said = by_speaker[name]
        cut = round(len(said) * (1 - val_fraction))
        train += [{"text": lines, "label": name} for lines in said[:cut]]
        val += [{"text": lines, "label": name} for lines in said[cut:]]
    seen = {item["text"] for item in train}
    return train, [item for item in val if item["text"] not in seen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speakers", type=int, default=8, help="how many of the most frequent speakers")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="each speaker's last speeches held out")
    parser.add_argument("--out", default="data/speaker", help="output folder")
    args = parser.parse_args()
    train, val = speaker_task(recipe_path("shakespeare").read_text(encoding="utf-8"), args.speakers, args.val_fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in (("train", train), ("val", val)):
        replace_atomically(out / f"{name}.jsonl", "".join(json.dumps(item) + "\n" for item in items))
        counts = collections.Counter(item["label"] for item in items)
        print(f"{out / name}.jsonl: {len(items)} speeches; " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
