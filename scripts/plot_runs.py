"""Loss curves of several budgeted runs in one picture, against minutes of their budgets.

    python scripts/plot_runs.py -o docs/shakespeare_char_hosts_loss.png \
        "AVX2, no dropout=docs/data/shakespeare_char_avx2_2026-11-25.csv" \
        "native bf16, dropout 0.1=runs/b29_drop01"

Each argument is LABEL=RUN_DIR_OR_CSV (a run folder's metrics.csv or any CSV with its iter,
eval_train_loss and val_loss columns; lines starting with # are skipped). A run's minutes are
its iterations scaled to `--minutes` (a budgeted run spends its budget evenly enough for a
picture). Val is solid, train (the evaluation's estimate on the train split) dashed.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def evaluations(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics CSV that hold an evaluation, as numbers."""
    path = path / "metrics.csv" if path.is_dir() else path
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    return [{key: float(row[key]) for key in ("iter", "eval_train_loss", "val_loss")}
            for row in csv.DictReader(lines) if row.get("val_loss")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_OR_CSV")
    parser.add_argument("-o", "--out", required=True, help="PNG file to write")
    parser.add_argument("--minutes", type=float, default=10.0, help="the runs' budget")
    parser.add_argument("--title", default="configs/shakespeare_char.yaml, 10 minutes, 2-core CPUs")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, spec in enumerate(args.runs):
        label, _, path = spec.rpartition("=")
        rows = evaluations(Path(path))
        last = rows[-1]["iter"]
        minutes = [args.minutes * row["iter"] / last for row in rows]
        color = f"C{i}"
        ax.plot(minutes, [row["val_loss"] for row in rows], "o-", color=color,
                label=f"{label}: val ({int(last):,} steps)")
        ax.plot(minutes, [row["eval_train_loss"] for row in rows], "--", color=color, alpha=0.6)
    ax.set(xlabel="minutes of the budget (dashed: train)", ylabel="cross-entropy loss (20-batch evaluations)",
           title=args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
