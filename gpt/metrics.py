"""Training metrics: metrics.csv (exact floats, safe across resumes), loss.png, TensorBoard."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

COLUMNS = ["iter", "tokens", "loss", "lr", "grad_norm", "tok_per_s", "ms_per_iter", "mfu",
           "eval_train_loss", "val_loss"]


class MetricsLog:
    """Appends rows to out_dir/metrics.csv. Floats are written with repr(), which round-trips
    exactly, so losses of two runs can be compared with ==."""

    def __init__(self, out_dir: Path, resume_iter: int | None, tensorboard: bool):
        self.path = out_dir / "metrics.csv"
        self.plot_path = out_dir / "loss.png"
        if resume_iter is None or not self.path.exists():
            self._rewrite([])
        else:
            # Rows logged after the checkpoint we resume from will be produced again: drop them.
            self._rewrite([r for r in read_metrics(self.path) if int(r["iter"]) <= resume_iter])
        self.tb = _tensorboard_writer(out_dir) if tensorboard else None

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: _cell(v) for k, v in row.items()})
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("iter", "tokens") and value is not None:
                    self.tb.add_scalar(key, value, row["iter"])

    def plot(self) -> None:
        plot_losses(self.path, self.plot_path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: train.tensorboard is on but tensorboard is not installed "
              "(pip install tensorboard); logging to metrics.csv only", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def plot_losses(csv_path: Path, png_path: Path) -> bool:
    """Draw train and val loss against iterations; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = read_metrics(csv_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for column, label in (("loss", "train (step)"), ("eval_train_loss", "train (eval)"), ("val_loss", "val")):
        points = [(int(r["iter"]), float(r[column])) for r in rows if r.get(column)]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if column != "loss" else None,
                    alpha=0.4 if column == "loss" else 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True
