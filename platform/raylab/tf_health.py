"""The health checks that need a TensorFlow step's gradients: `no_grad` and `nonfinite_grads`.

`TfStepper.health_probe()` builds a `KerasProbe`. Its evidence comes from the
compiled step itself (`raylab.tf_loop`): while the step is traced, the trainable
variables whose gradient is None (not reached by the loss, or behind
`tf.stop_gradient`) are noted once; at every optimizer step the step returns, per
trainable variable, how many workers saw a NaN/inf in its gradient (summed over
the workers, so every worker reaches the same verdict). Keras layers take
`training=` per call, so there is no mode to check; the model's output is inside
the task's loss, so `input_dependence` and the output-width check apply to
PyTorch tasks only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raylab.health import ArrayProbe, name_list
from raylab.health_config import HealthConfig

if TYPE_CHECKING:
    from raylab.tf_loop import TfStepper


class KerasProbe(ArrayProbe):
    def __init__(self, stepper: "TfStepper"):
        self.stepper = stepper
        self.gradless_checked = False

    def after_micro_batch(self, cfg: HealthConfig, step_ends: bool, step: int) -> list[tuple[str, str]]:
        if not step_ends:
            return []
        found = []
        if not self.gradless_checked and cfg.active("no_grad"):
            self.gradless_checked = True
            missing = sorted(self.stepper.gradless)
            if missing:
                found.append(("no_grad", f"{len(missing)} trainable variable(s) got no gradient at step {step}: {name_list(missing)} "
                                         "(behind tf.stop_gradient, or not used by the loss)"))
        flags = self.stepper.grad_nonfinite
        if cfg.active("nonfinite_grads") and flags is not None and flags.any():
            bad = [v.path for v, flag in zip(self.stepper.model.trainable_variables, flags) if flag]
            found.append(("nonfinite_grads", f"non-finite gradient at step {step} in {bad[0]}"
                                             + (f" (and {len(bad) - 1} more variable(s))" if len(bad) > 1 else "") + " while the loss was finite"))
        return found
