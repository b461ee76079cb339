"""Learning-rate schedules the PyTorch models share: linear warm-up, then constant,
cosine decay to zero over the run, or step decay.

`TorchParts.make_scheduler(optimizer, total_steps)` receives the run's scheduled
optimizer steps from the loop; `warmup_then(...)` builds the LambdaLR for it. The
schedule is a pure function of the step, so a resumed run (the scheduler's state
is in every checkpoint) continues on the same curve.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "cosine", "step"]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, schedule: Schedule = "constant",
                  step_gamma: float = 0.1, step_every: int = 1) -> float:
    """The factor on the peak lr at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return step_gamma ** (step // max(1, step_every))
    return 1.0


def warmup_then(optimizer, total_steps: int, warmup_steps: int = 0, schedule: Schedule = "constant",
                step_gamma: float = 0.1, step_every: int = 1):
    """A LambdaLR stepping `lr_multiplier` once per optimizer step."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, schedule, step_gamma, step_every)
    )
