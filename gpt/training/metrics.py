"""Training metrics: metrics.csv (exact floats, safe across resumes), loss.png, TensorBoard,
and the progress shown on the terminal."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from gpt.data.formats import RunFolder
from gpt.durable import replace_atomically, save_png
from gpt.errors import GptError

COLUMNS = ["iter", "tokens", "loss", "lr", "grad_norm", "tok_per_s", "ms_per_iter", "mfu",
           "eval_train_loss", "val_loss", "val_bpb", "train_acc", "val_acc", "exact_match"]


@dataclass
class Evaluation:
    """One evaluation during training: the mean loss per split and, for task runs, the accuracy
    per split and per class (keys "val/LABEL"); for chat runs with task.eval, "exact_match"."""

    losses: dict[str, float]
    accuracy: dict[str, float] = field(default_factory=dict)
    val_bpb: float | None = None  # bits per byte of the val text, where the data records its bytes

    def row(self) -> dict[str, float | None]:
        """The metrics.csv columns it fills."""
        return {"eval_train_loss": self.losses.get("train"), "val_loss": self.losses.get("val"),
                "val_bpb": self.val_bpb, "train_acc": self.accuracy.get("train"), "val_acc": self.accuracy.get("val"),
                "exact_match": self.accuracy.get("exact_match")}


class MetricsLog:
    """Appends rows to out_dir/metrics.csv. Floats are written with repr(), which round-trips
    exactly, so losses of two runs can be compared with ==."""

    def __init__(self, run: RunFolder, resume_iter: int | None, tensorboard: bool):
        self.path = run.metrics
        self.plot_path = run.plot
        if resume_iter is None or not self.path.exists():
            self._rewrite([])
        else:
            # Rows logged after the checkpoint we resume from will be produced again: drop them.
            self._rewrite([r for r in read_metrics(self.path) if int(r["iter"]) <= resume_iter])
        self.tb = _tensorboard_writer(run.tensorboard) if tensorboard else None

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        replace_atomically(self.path, text.getvalue())

    def write(self, row: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, COLUMNS).writerow({k: _cell(v) for k, v in row.items()})
        except OSError as exc:
            raise GptError(f"cannot write {self.path} ({exc.strerror}); free disk space or choose another "
                           "train.out_dir, then resume") from None
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


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: train.tensorboard is on but tensorboard is not installed "
              "(pip install tensorboard); logging to metrics.csv only", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(folder))


def plot_losses(csv_path: Path, png_path: Path) -> None:
    """Draw the training loss of each logged step and the evaluations' train and val losses
    against iterations (before the first evaluation, the training loss alone). Nothing when
    no loss is logged yet or matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = read_metrics(csv_path)
    curves = {label: [(int(r["iter"]), float(r[column])) for r in rows if r.get(column)]
              for column, label in (("loss", "train (step)"), ("eval_train_loss", "train (eval)"), ("val_loss", "val"))}
    if not any(curves.values()):
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            step = label == "train (step)"
            ax.plot(*zip(*points), label=label, marker=None if step else "o", alpha=0.4 if step else 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, png_path)


class Mfu:
    """Model FLOPs utilisation: the FLOP/s the model's arithmetic takes at the measured speed,
    over the peak. Over 100% is impossible, so such a figure is never shown: a CPU's peak,
    measured at start while other processes held the cores, is measured once more; when that
    does not help, or the peak was given, one line says why and MFU is left out of the run."""

    def __init__(self, flops_per_token: float, peak: float | None, configured: bool,
                 remeasure: Callable[[], float | None] | None = None, enabled: bool = True):
        self.flops_per_token, self.peak, self.configured = flops_per_token, peak, configured
        self.remeasure, self.enabled = remeasure, enabled

    def __call__(self, tok_per_s: float) -> float | None:
        if self.peak is None:
            return None
        mfu = self.flops_per_token * tok_per_s / self.peak
        if mfu <= 1:
            return mfu
        if self.remeasure is not None:
            low, self.peak, self.remeasure = self.peak, self.remeasure(), None
            self._say(f"note: MFU came out at {100 * mfu:.0f}% against the CPU peak measured at start "
                      f"({low:.3g} FLOP/s; other processes were probably using the cores); measured again: "
                      f"{self.peak:.3g} FLOP/s")
            return self(tok_per_s)
        why = ("train.peak_flops is below what this device reaches; raise it or set it to null"
               if self.configured else "other processes are probably sharing the cores, or the device's peak is "
               "not known right; give it as train.peak_flops")
        self._say(f"warning: MFU came out at {100 * mfu:.0f}%, over 100%, against a peak of {self.peak:.3g} "
                  f"FLOP/s: {why}; MFU is not reported for the rest of this run")
        self.peak = None
        return None

    def _say(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar on a terminal; compact log lines otherwise (CI, files, pipes)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled, self.total = enabled, total
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True) if self.tty else None
        self.last_ms: float | None = None

    def report(self, it: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"loss {row['loss']:.4f}" if row.get("loss") is not None else None,
                 f"val {row['val_loss']:.4f}" if row.get("val_loss") is not None else None,
                 f"train eval {row['eval_train_loss']:.4f}" if row.get("val_loss") is None
                 and row.get("eval_train_loss") is not None else None,
                 f"val acc {row['val_acc']:.3f}" if row.get("val_acc") is not None else None,
                 f"exact match {row['exact_match']:.3f}" if row.get("exact_match") is not None else None,
                 f"lr {row['lr']:.2e}" if row.get("lr") is not None else None,
                 f"{row['tok_per_s']:,.0f} tok/s" if row.get("tok_per_s") else None,
                 f"{row['ms_per_iter']:.1f} ms/iter" if row.get("ms_per_iter") else None,
                 f"mfu {100 * row['mfu']:.1f}%" if row.get("mfu") else None]
        if row.get("ms_per_iter"):
            self.last_ms = row["ms_per_iter"]
        if self.last_ms:
            parts.append(f"eta {_duration((self.total - it) * self.last_ms / 1000)}")
        text = " | ".join(p for p in parts if p)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(f"iter {it}/{self.total} | {text}", flush=True)

    def set_total(self, total: int) -> None:
        """The run's length changed (a time budget fixed max_iters)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def advance(self, it: int) -> None:
        if self.bar is not None:
            self.bar.n = it
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
