"""Configuration of the TinyImageNet classifiers (seed 003), validated by pydantic.

Every field has a description; `raylab train tinyimagenet --set key=value`
overrides any of them and `experiments/tinyimagenet.yaml` holds the stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from raylab.config import TrainConfig


class TinyImageNetConfig(TrainConfig):
    family: Literal["baseline", "residual", "deeper_wider", "se"] = Field(
        "residual", description="Model family: plain CNN, ResNet-18 (64-px stem), VGG-style deeper/wider, or ResNet-18 with squeeze-excitation."
    )
    width: int = Field(64, gt=0, description="Channels of the first stage (64 = the published ResNet-18 size).")
    num_classes: int | None = Field(
        None, gt=1, description="Expected number of classes; checked against wnids.txt (None: take it from wnids.txt)."
    )
    data_dir: Path | None = Field(
        None, description="A TinyImageNet-200 folder (wnids.txt, train/, val/); None: generate a synthetic dataset in that layout."
    )
    synthetic_dir: Path | None = Field(
        None, description="Where the synthetic dataset is written (None: <raylab cache>/tinyimagenet-synthetic/<its parameters>; the cache is $RAYLAB_CACHE_DIR, else ~/.cache/raylab)."
    )
    synthetic_classes: int = Field(10, ge=2, description="Classes of the synthetic dataset.")
    synthetic_train_per_class: int = Field(100, gt=0, description="Training images per synthetic class (500 in the real set).")
    synthetic_val_per_class: int = Field(20, gt=0, description="Validation images per synthetic class (50 in the real set).")
    synthetic_seed: int = Field(0, ge=0, description="Seed of the synthetic images (separate from `seed`, so a new training seed reuses the data).")
    image_size: int = Field(64, ge=16, description="Images are resized to this many pixels square (64 = native).")
    augment: bool = Field(True, description="Random crop (4-px padding) and horizontal flip on training images.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer, created fresh for every run.")
    weight_decay: float = Field(1e-6, ge=0, description="Weight decay (the seed's 1e-6 with Adam).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by Adam/AdamW).")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="Learning-rate schedule over the run's optimizer steps.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the schedule.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")

    @property
    def expected_classes(self) -> int:
        """Classes the model is built for, known without reading the data."""
        if self.num_classes is not None:
            return self.num_classes
        return self.synthetic_classes if self.data_dir is None else 200
