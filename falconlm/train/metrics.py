"""The metrics log ``metrics.jsonl`` (one JSON object per logged step) and the optional loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON lines; on resume, entries after the resumed step (a lost tail) are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        kept = [m for m in read_metrics(path) if m.get("step", 0) <= resume_step] if resume_step is not None else []
        path.write_text("".join(json.dumps(m) + "\n" for m in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log ([] when absent); a torn last line is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """Draw train and validation loss against step; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_path)
    train = [(m["step"], m["loss"]) for m in records if m.get("loss") is not None]
    val = [(m["step"], m["val_loss"]) for m in records if m.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
