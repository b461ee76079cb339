"""The `health` section of every run's config: one policy per training health check.

    health:                       # in an experiment file's defaults or a stage
      chance_accuracy: stop       # warn (default for most) | stop | off
      warmup_steps: 200

    raylab train tinyimagenet --set health.loss_flat=off

Each check is a small named piece of `raylab.health` (framework-neutral) or
`raylab.torch_health` (PyTorch tensors); the policy says what a finding does:
`warn` notes it (display, metrics.parquet's `health` column, health.json),
`stop` ends the run with it as the error, `off` skips the check. This module
holds the settings and the registry of checks (name, what "ok" means, advice),
so `raylab.config` can import it without the checks' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Policy = Literal["warn", "stop", "off"]


@dataclass(frozen=True)
class Check:
    name: str
    what: str  # what an "ok" means, for the doctor's table
    advice: str
    needs: tuple[str, ...] = ()  # "classes", "labels" (task declarations), "model" (a framework probe), "trend" (a window past warm-up)
    rank_local: bool = False  # its inputs differ per worker: a stop needs a collective verdict


CHECKS: dict[str, Check] = {c.name: c for c in (
    Check("nonfinite_grads", "gradients finite at every step",
          "lower lr or set grad_clip_norm; look for log, sqrt or a division of a value that can reach 0 in that layer", ("model",)),
    Check("nonfinite_batch", "no NaN/inf in any training batch",
          "fix those files or the normalisation that produced NaN (seed 002: crop_scale divides by a range that is 0 when all "
          "keypoints are 0)", (), True),
    Check("labels", "every label in [0, num_classes)",
          "fix the labels, or build the model and num_classes for the dataset's real class count", ("classes", "labels"), True),
    Check("num_classes", "the model's output width equals num_classes",
          "build the model's output for the dataset's class count (seed 003: num_classes 10 on 200 classes)", ("classes", "model")),
    Check("train_mode", "training mode in train steps, eval mode in evaluation and sampling",
          "let the loop switch modes: do not call model.eval()/model.train() in loss, evaluate or sample", ("model",)),
    Check("no_grad", "every trainable parameter gets a gradient",
          "remove torch.no_grad()/detach() on that path, or set requires_grad=False on purpose (and leave it out of the optimizer)",
          ("model",)),
    Check("frozen_changed", "frozen parameters unchanged",
          "something writes to frozen weights (weight decay on a frozen tensor, an in-place update); freeze them in the optimizer "
          "too", ("model",)),
    Check("optimizer_foreign", "the optimizer holds this model's parameters",
          "create the optimizer in build() from this model's parameters, fresh for every model (seed 003)", ("model",)),
    Check("optimizer_missing", "every trainable parameter is in an optimizer group",
          "pass every trainable parameter to the optimizer, or set requires_grad=False on those you mean to freeze", ("model",)),
    Check("input_dependence", "the output depends on the input",
          "use an initialisation or normalisation that carries the signal (He init, batch norm, residual connections) or a "
          "shallower model (seed 003)", ("model", "trend")),
    Check("chance_accuracy", "training accuracy above chance",
          "check labels match inputs, the model's init (input_dependence) and the lr; seed 003's plain deep CNN sat at 0.5% on "
          "200 classes", ("classes", "trend")),
    Check("chance_loss", "training loss away from ln(num_classes)",
          "the model predicts a uniform distribution: check the init, that the loss sees the model's output, and raise lr",
          ("classes", "trend")),
    Check("loss_flat", "training loss not pinned", "raise lr or shrink the model (seed 001's reading of a flat curve)", ("trend",)),
    Check("loss_diverging", "training loss not rising", "lower lr, or add warm-up / grad_clip_norm", ("trend",)),
    Check("loss_oscillating", "training loss not swinging without progress",
          "lower lr or raise the batch size (seed 001's reading of an oscillating curve)", ("trend",)),
    Check("lr_floor", "lr not stuck at a floor while the loss falls",
          "decay later or slower (seed 001: decay_epoch too small), or lower the floor; the loss was still improving", ("trend",)),
)}


class HealthConfig(BaseModel):
    """Policies of the training health checks and the sizes their verdicts rest on."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    nonfinite_grads: Policy = Field("stop", description="A gradient holds NaN or inf at an optimizer step (names the first parameter).")
    nonfinite_batch: Policy = Field("warn", description="A training batch holds NaN or inf (names the samples, e.g. keypoints that were all zero before normalisation).")
    labels: Policy = Field("stop", description="A class label lies outside [0, num_classes) (tasks that declare num_classes and class_labels).")
    num_classes: Policy = Field("stop", description="The model's output has a last dimension other than the task's num_classes (seed 003: a model built for 10 classes on 200).")
    train_mode: Policy = Field("warn", description="The model is not in training mode during a train step, or evaluation/sampling runs in training mode or leaves the model in eval mode.")
    no_grad: Policy = Field("warn", description="Parameters meant to train (requires_grad) get no gradient at the first step, or only zeros over the first steps (a frozen or detached block).")
    frozen_changed: Policy = Field("warn", description="Parameters with requires_grad off changed during training.")
    optimizer_foreign: Policy = Field("stop", description="The optimizer holds tensors that are not this model's parameters (an optimizer built for, or reused from, another model).")
    optimizer_missing: Policy = Field("warn", description="Parameters meant to train (requires_grad) are in none of the optimizer's parameter groups.")
    input_dependence: Policy = Field("warn", description="The model's output hardly depends on its input (spread across the batch / magnitude below min_input_dependence), after warm-up.")
    chance_accuracy: Policy = Field("warn", description="Training accuracy within chance_sigmas of chance (1/num_classes) for two windows after warm-up.")
    chance_loss: Policy = Field("warn", description="Training loss pinned at ln(num_classes), a uniform prediction, after warm-up.")
    loss_flat: Policy = Field("warn", description="Training loss pinned (spread within flat_tolerance of its level) over a window after warm-up.")
    loss_diverging: Policy = Field("warn", description="A window's median training loss above diverge_factor x the best window's after warm-up.")
    loss_oscillating: Policy = Field("warn", description="Training loss swinging (10-90% spread above oscillation_ratio x its median) without progress, after warm-up.")
    lr_floor: Policy = Field("warn", description="The learning rate sits at a floor (unchanged over a window, below lr_floor_fraction x its peak) while the loss still falls.")

    warmup_steps: int = Field(100, ge=0, description="Optimizer steps before the metric-trend checks (chance, flat, diverging, oscillating, lr floor, input dependence) give verdicts.")
    window_steps: int = Field(50, ge=2, description="Optimizer steps per window of the metric-trend checks; windows end at multiples of this step count.")
    zero_grad_steps: int = Field(10, ge=1, description="Steps over which a parameter with only all-zero gradients is reported by no_grad (zero-initialised gates, e.g. DiT's adaLN-Zero, give zeros at first).")
    min_input_dependence: float = Field(1e-4, ge=0, description="Below this spread-to-magnitude ratio the output counts as input-independent (a 16-layer plain CNN at PyTorch's default init gives ~2e-7; healthy models 1e-2 and more).")
    chance_sigmas: float = Field(3.0, gt=0, description="Accuracy counts as chance when below 1/num_classes + this many binomial standard deviations of the window's samples.")
    chance_loss_tolerance: float = Field(0.01, gt=0, lt=1, description="Loss counts as pinned at ln(num_classes) when within this fraction of it.")
    flat_tolerance: float = Field(0.01, gt=0, description="loss_flat: the window's 10-90% loss spread is below this fraction of its median.")
    diverge_factor: float = Field(1.5, gt=1, description="loss_diverging: a window's median loss above this multiple of the best window's.")
    oscillation_ratio: float = Field(1.0, gt=0, description="loss_oscillating: the window's 10-90% loss spread is above this multiple of its median.")
    lr_floor_fraction: float = Field(0.02, gt=0, lt=1, description="lr_floor: the learning rate is below this fraction of the run's peak learning rate.")
    lr_floor_min_drop: float = Field(0.03, gt=0, lt=1, description="lr_floor: the loss still falls when a window's median is this fraction below the previous window's.")

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_switches(cls, value, info):
        # YAML reads a bare `off` / `on` as false / true (`--set health.labels=off` included).
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is Policy:
            return "warn" if value else "off"
        return value

    def policy(self, check: str) -> Policy:
        return getattr(self, check)

    def active(self, check: str) -> bool:
        return getattr(self, check) != "off"
