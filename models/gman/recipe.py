"""The reference's training recipe: masked MAE loss, staircase learning-rate decay
with a floor, Adam, and early stopping on validation MAE (zhengchuanpan/GMAN `train.py`).

The schedule is a Keras `LearningRateSchedule` of the optimizer's own
`iteration` variable, so restoring the optimizer's variables restores the
learning rate exactly (nothing else to save). Early stopping is a pure function
of the validation-MAE history, so the loop can decide it from its metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from models.gman.config import GmanConfig


def masked_abs_error_sums(pred, label):
    """(sum of |pred - label| over non-zero labels, number of non-zero labels), as float32 scalars.

    Kept as two sums so a distributed step can divide by the count over the
    global batch: then N workers x batch B give the same loss as 1 x N*B."""
    mask = ops.cast(ops.not_equal(label, 0), "float32")
    error = ops.abs(ops.cast(pred, "float32") - ops.cast(label, "float32")) * mask
    # A NaN/inf prediction on a missing label must not poison the sum (0 * inf = NaN).
    error = ops.where(mask > 0, error, 0.0)
    return ops.sum(error), ops.sum(mask)


def masked_mae(pred, label):
    """The reference's `mae_loss`: mean absolute error over non-zero labels; 0 when there is none."""
    total, count = masked_abs_error_sums(pred, label)
    return ops.where(count > 0, total / ops.maximum(count, 1.0), 0.0)


@keras.saving.register_keras_serializable(package="gman")
class StaircaseDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = max(initial * rate ** floor(step / decay_steps), floor)."""

    def __init__(self, initial: float, decay_steps: int, rate: float, floor: float):
        self.initial, self.decay_steps, self.rate, self.floor = float(initial), int(decay_steps), float(rate), float(floor)
        if self.decay_steps < 1:
            raise ValueError(f"decay_steps must be at least 1, got {decay_steps}")

    def __call__(self, step):
        decays = ops.floor(ops.cast(step, "float32") / float(self.decay_steps))
        return ops.maximum(self.initial * ops.power(self.rate, decays), self.floor)

    def value(self, step: int) -> float:
        """The same in plain Python, for reports and tests."""
        return max(self.initial * self.rate ** (step // self.decay_steps), self.floor)

    def get_config(self) -> dict:
        return {"initial": self.initial, "decay_steps": self.decay_steps, "rate": self.rate, "floor": self.floor}


def make_optimizer(cfg: GmanConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam with the staircase schedule; decays every `decay_epoch` epochs of `steps_per_epoch` optimizer steps."""
    schedule = StaircaseDecay(cfg.lr, max(1, cfg.decay_epoch * steps_per_epoch), cfg.lr_decay_rate, cfg.min_lr)
    # An explicit name keeps slot-variable paths the same in every process (adam/..., not adam_2/...).
    return keras.optimizers.Adam(learning_rate=schedule, name="adam")


def evaluations_since_best(history: Sequence[float]) -> int:
    """How many evaluations ago the validation MAE last matched or beat its running minimum
    (the reference's `wait` counter; NaN never counts as an improvement)."""
    best, wait = math.inf, 0
    for value in history:
        if value <= best:  # False for NaN
            best, wait = value, 0
        else:
            wait += 1
    return wait


def should_stop(history: Sequence[float], patience: int) -> bool:
    """Early stopping as the reference's train.py: stop once `patience` evaluations in a row
    brought no validation MAE at or below the best so far."""
    return evaluations_since_best(history) >= patience
