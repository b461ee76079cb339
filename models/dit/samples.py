"""What a DiT sampling round produces besides the tensors: how recognisable the
samples are, their JSON records and an image grid.

`sample_label_accuracy` is the fraction of generated samples that a
nearest-class-template classifier assigns to their conditioning label. The
templates are the per-class means of the training data, computed once at build
time (deterministic, no training). On the synthetic data each class is one
pattern, so the classifier is ~100% on held-out real samples and an
untrained model sits at chance (1 / classes); on real photographs a template
classifier is weak, and `template_val_accuracy` (stored with the run) says how
far to trust the metric.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image


class NearestTemplate:
    """Classifies samples by the nearest (squared L2) per-class mean of the training data."""

    def __init__(self, templates: torch.Tensor):
        self.templates = templates.flatten(1)

    @classmethod
    def fit(cls, dataset: torch.utils.data.Dataset, num_classes: int, batch_size: int = 256) -> "NearestTemplate":
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        sums, counts = None, torch.zeros(num_classes, dtype=torch.float64)
        for x, y in loader:
            if sums is None:
                sums = torch.zeros((num_classes, *x.shape[1:]), dtype=torch.float64)
            sums.index_add_(0, y, x.double())
            counts += torch.bincount(y, minlength=num_classes).double()
        if sums is None:
            raise ValueError("cannot fit class templates on an empty dataset.")
        counts = counts.clamp(min=1).view(-1, *([1] * (sums.dim() - 1)))
        return cls((sums / counts).float())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().cpu().flatten(1)
        return torch.cdist(flat, self.templates).argmin(dim=1)

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        if len(labels) == 0:
            return float("nan")
        return float((self.predict(x) == labels.cpu()).float().mean())

    def dataset_accuracy(self, dataset: torch.utils.data.Dataset, batch_size: int = 256) -> float:
        correct = total = 0
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            correct += int((self.predict(x) == y).sum())
            total += len(y)
        return correct / total if total else float("nan")


def to_data_range(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Model-space samples in [-1, 1] -> the training data's range: images [0, 1], tokens [-1, 1]."""
    if kind == "images":
        return ((x.clamp(-1, 1) + 1) / 2).float().cpu()
    return x.float().cpu()


def sample_records(x: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...], kind: str,
                   predicted: torch.Tensor | None = None, decimals: int = 4) -> list[dict[str, Any]]:
    """One JSON-able dict per sample: its label (index and name) and its data as nested lists."""
    data = np.round(to_data_range(x, kind).numpy().astype(np.float64), decimals)
    records = []
    for i, label in enumerate(labels.tolist()):
        record: dict[str, Any] = {"label": {"index": label, "name": class_names[label]}, "data": data[i].tolist()}
        if predicted is not None:
            guess = int(predicted[i])
            record["classified_as"] = {"index": guess, "name": class_names[guess]}
        records.append(record)
    return records


def png_grid(images: torch.Tensor, columns: int | None = None, min_cell: int = 32) -> bytes:
    """PNG bytes of a grid of (N, C, H, W) images in [0, 1], upscaled (nearest) so tiny images stay visible."""
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid.")
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    pad = 1
    grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.float32)
    pixels = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = pixels[i]
    image = Image.fromarray((grid * 255).round().astype(np.uint8).squeeze(-1) if c == 1 else (grid * 255).round().astype(np.uint8))
    scale = max(1, int(np.ceil(min_cell / max(h, w))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
