"""curves.png: one panel per metric family, the task's headline metrics included."""

from __future__ import annotations

import io

import pandas as pd
from PIL import Image

from raylab.plots import _panels, plot_curves


def craft_like_metrics() -> pd.DataFrame:
    return pd.DataFrame({
        "step": [10, 20, 30], "train_loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.7, None], "train_cls_loss": [0.6, 0.3, 0.2],
        "val_hmean": [0.0, 0.5, None], "sample_hmean": [0.1, None, 0.6], "val_top5_accuracy": [0.2, 0.4, None],
        "lr": [1e-3, 1e-3, 5e-4], "samples_per_s": [30.0, 31.0, 29.0], "empty": [None, None, None],
    })


def test_headline_metrics_get_their_own_panels():
    panels = dict(_panels(craft_like_metrics(), ("loss", "cls_loss", "geo_loss", "hmean")))
    assert panels["loss"] == ["train_loss", "val_loss"]
    assert panels["cls loss"] == ["train_cls_loss"]  # claimed by its headline panel, not drawn twice
    assert panels["hmean"] == ["val_hmean", "sample_hmean"]
    assert panels["accuracy"] == ["val_top5_accuracy"]
    assert "geo loss" not in panels  # no such column: no empty panel
    assert list(panels)[-2:] == ["samples/s", "learning rate"]


def test_without_headline_every_loss_column_shares_the_loss_panel():
    panels = dict(_panels(craft_like_metrics()))
    assert panels["loss"] == ["train_loss", "val_loss", "train_cls_loss"]
    assert "hmean" not in panels


def test_plot_is_a_png_with_one_panel_per_family():
    png = plot_curves(craft_like_metrics(), "craft quick", ("loss", "cls_loss", "hmean"))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.size[0] > 5 * 400  # six panels side by side
