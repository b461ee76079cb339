"""Configuration of the CRAFT text detector (seed 004), validated by pydantic.

Every field has a description; `raylab train craft --set key=value` overrides
any of them and `experiments/craft.yaml` holds the quick / medium / full stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raylab.config import TrainConfig


class CraftConfig(TrainConfig):
    width_divisor: Literal[1, 2, 4, 8, 16] = Field(
        1, description="Divides every channel count of the network (1 = the published CRAFT, 20,770,466 parameters; 8 = quick)."
    )
    image_size: int = Field(768, ge=64, description="Training images are scaled (and, with augment, cropped) into a square of this many pixels; a multiple of 32.")
    eval_image_size: int = Field(768, ge=64, description="Validation images are scaled so their longer side is this many pixels (padded square); a multiple of 32.")
    data_dir: Path | None = Field(
        None, description="An ICDAR-2015 folder (train_images/, train_gts/, test_images/, test_gts/ or the official ch4_* names); None: generate a synthetic dataset in that format."
    )
    synthetic_dir: Path | None = Field(
        None, description="Where the synthetic dataset is written (None: <raylab cache>/craft-synthetic/<its parameters>; the cache is $RAYLAB_CACHE_DIR, else ~/.cache/raylab)."
    )
    synthetic_train_images: int = Field(800, gt=0, description="Training images of the synthetic dataset (ICDAR-2015 has 1000).")
    synthetic_val_images: int = Field(100, gt=0, description="Validation (test-split) images of the synthetic dataset (ICDAR-2015 has 500).")
    synthetic_image_size: int = Field(128, ge=64, description="Side of the square synthetic images in pixels.")
    synthetic_seed: int = Field(0, ge=0, description="Seed of the synthetic images (separate from `seed`, so a new training seed reuses the data).")
    augment: bool = Field(True, description="Random scale, placement (crop or pad) and brightness/contrast of training images.")
    augment_min_scale: float = Field(0.75, gt=0, description="Smallest random scale factor on top of fitting the image into image_size.")
    augment_max_scale: float = Field(1.25, gt=0, description="Largest random scale factor on top of fitting the image into image_size.")
    text_threshold: float = Field(0.7, gt=0, lt=1, description="Post-processing: a word needs a region-score peak at least this high.")
    link_threshold: float = Field(0.4, gt=0, lt=1, description="Post-processing: affinity at or above this links characters into a word.")
    low_text: float = Field(0.4, gt=0, lt=1, description="Post-processing: region score at or above this counts as text.")
    positive_threshold: float = Field(0.1, gt=0, lt=1, description="Loss: a target value above this makes a pixel positive for hard-negative mining.")
    negative_ratio: float = Field(3.0, gt=0, description="Loss: hardest negative pixels kept per positive pixel (CRAFT's 3:1).")
    negatives_without_positives: int = Field(500, gt=0, description="Loss: hardest pixels kept from an image map with no positive pixel.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer, created fresh for every run (CRAFT trains with Adam).")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (the CRAFT re-implementations use 5e-4 with Adam).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by Adam/AdamW).")
    lr_schedule: Literal["constant", "cosine", "step"] = Field("constant", description="Learning-rate schedule over the run's optimizer steps; step multiplies by lr_step_gamma every lr_step_every_steps.")
    lr_step_every_steps: int = Field(10000, gt=0, description="Optimizer steps between learning-rate drops of the step schedule.")
    lr_step_gamma: float = Field(0.8, gt=0, le=1, description="Factor of each learning-rate drop of the step schedule.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the schedule.")

    @model_validator(mode="after")
    def _sizes_fit_the_network(self) -> "CraftConfig":
        # Five 2x poolings: sizes that are not multiples of 32 give misaligned skip connections.
        for name in ("image_size", "eval_image_size"):
            if getattr(self, name) % 32:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of 32")
        if self.augment_min_scale > self.augment_max_scale:
            raise ValueError(f"augment_min_scale ({self.augment_min_scale}) must not exceed augment_max_scale ({self.augment_max_scale})")
        return self
