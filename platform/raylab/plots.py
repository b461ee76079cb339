"""Training curves as a picture: `<run>/curves.png`, drawn from metrics.parquet.

One panel per metric family (loss, accuracy, each of the task's headline
metrics, throughput, learning rate), train and val on the same axes, x =
optimizer step. People read a curve faster than a table: a flat
loss, a val loss turning up, an accuracy pinned at chance are visible at once.
"""

from __future__ import annotations

import io

import pandas as pd
import pyarrow.fs as pafs

from raylab.run_storage import write_file

CURVES_FILE = "curves.png"


_ALWAYS = ("loss", "accuracy")
_LAST = (("samples/s", "samples_per_s"), ("learning rate", "lr"))


def _panels(metrics: pd.DataFrame, headline: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """One panel per metric family: loss and accuracy (every *_loss / *_accuracy column not
    claimed below), each of the task's other headline metrics (CRAFT's hmean, the
    translator's bleu, DiT's sample_label_accuracy ...) with its train / val / sample
    columns together, then throughput and learning rate."""
    numeric = [c for c in metrics.columns if c != "step" and pd.api.types.is_numeric_dtype(metrics[c]) and metrics[c].notna().any()]
    own = {name: [c for c in numeric if c == name or c in (f"train_{name}", f"val_{name}", f"sample_{name}")]
           for name in headline if name not in _ALWAYS}
    claimed = {c for cols in own.values() for c in cols}
    panels = []
    for name in _ALWAYS:
        cols = [c for c in numeric if c not in claimed and (c == name or c.endswith("_" + name))]
        if cols:
            panels.append((name, cols))
    panels += [(name.replace("_", " "), cols) for name, cols in own.items() if cols]
    for title, key in _LAST:
        if key in numeric:
            panels.append((title, [key]))
    return panels


def plot_curves(metrics: pd.DataFrame, title: str, headline: tuple[str, ...] = ()) -> bytes:
    """PNG bytes of the run's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(metrics, headline)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (name, cols) in zip(axes[0], panels):
        for col in cols:
            series = metrics[["step", col]].dropna()
            ax.plot(series["step"], series[col], marker="o", markersize=3, label=col)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_curves(fs: pafs.FileSystem, run_path: str, metrics: pd.DataFrame, title: str, headline: tuple[str, ...] = ()) -> str | None:
    """Write `<run>/curves.png`; None when there is nothing to draw yet."""
    if metrics.empty or "step" not in metrics:
        return None
    path = f"{run_path}/{CURVES_FILE}"
    write_file(fs, path, plot_curves(metrics, title, headline))
    return path
