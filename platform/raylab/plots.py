"""Training curves as a picture: `<run>/curves.png`, drawn from metrics.parquet.

One panel per metric family (loss, accuracy, throughput), train and val on the
same axes, x = optimizer step. People read a curve faster than a table: a flat
loss, a val loss turning up, an accuracy pinned at chance are visible at once.
"""

from __future__ import annotations

import io

import pandas as pd
import pyarrow.fs as pafs

from raylab.run_storage import write_file

CURVES_FILE = "curves.png"


def _panels(metrics: pd.DataFrame) -> list[tuple[str, list[str]]]:
    numeric = [c for c in metrics.columns if c != "step" and pd.api.types.is_numeric_dtype(metrics[c])]
    panels = []
    for title, keys in (("loss", ["loss"]), ("accuracy", ["accuracy"]), ("samples/s", ["samples_per_s"]), ("learning rate", ["lr"])):
        cols = [c for c in numeric if any(c == k or c.endswith("_" + k) for k in keys)]
        if cols:
            panels.append((title, cols))
    return panels


def plot_curves(metrics: pd.DataFrame, title: str) -> bytes:
    """PNG bytes of the run's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(metrics)
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


def write_curves(fs: pafs.FileSystem, run_path: str, metrics: pd.DataFrame, title: str) -> str | None:
    """Write `<run>/curves.png`; None when there is nothing to draw yet."""
    if metrics.empty or "step" not in metrics:
        return None
    path = f"{run_path}/{CURVES_FILE}"
    write_file(fs, path, plot_curves(metrics, title))
    return path
