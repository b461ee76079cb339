"""The health checks that need a TensorFlow step's gradients: `no_grad` and `nonfinite_grads`.

`TfStepper.health_probe()` builds a `KerasProbe`. Its evidence comes from the
compiled step itself (`raylab.tf_loop`): while the step is traced, the trainable
variables whose gradient is None (not reached by the loss, or behind
`tf.stop_gradient`) are noted once; at every optimizer step the step returns, per
trainable variable, how many workers saw a NaN/inf in its gradient (summed over
the workers, so every worker reaches the same verdict). Keras layers take
`training=` per call, so there is no mode to check. The model's output stays
inside the task's loss in the compiled step: for `input_dependence` and the
output-width check the probe calls the model itself (`training=False`, no
variable or seed changes) on the micro-batch's `task.model_inputs(batch)` at the
steps those checks measure; a task without `model_inputs` skips them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from raylab.health import ArrayProbe, name_list, output_spread
from raylab.health_config import HealthConfig

if TYPE_CHECKING:
    from raylab.tf_loop import TfStepper


_NOT_ON_KERAS = {
    "train_mode": "Keras layers take training= per call: no mode to leave on",
    "frozen_changed": "not checked on TensorFlow (Keras marks frozen kernels and batch-norm statistics alike)",
    "optimizer_foreign": "the TensorFlow loop builds the optimizer on the model's own variables",
    "optimizer_missing": "the TensorFlow loop builds the optimizer on the model's own variables",
}


class KerasProbe(ArrayProbe):
    def __init__(self, stepper: "TfStepper"):
        self.stepper = stepper
        self.gradless_checked = False

    def not_checked(self, check: str) -> str:
        if check in ("input_dependence", "num_classes") and not hasattr(self.stepper.task, "model_inputs"):
            return "the TensorFlow task declares no model_inputs(batch)"
        return _NOT_ON_KERAS.get(check, "")

    def watch(self, training: bool, measure_output: bool, batch: Any = None) -> None:
        inputs_of = getattr(self.stepper.task, "model_inputs", None)
        if not measure_output or batch is None or inputs_of is None or self.on_output is None:
            return
        output = self.stepper.model(inputs_of(batch), training=False)
        if isinstance(output, (list, tuple)):
            output = output[0]
        output = np.asarray(output)
        self.on_output(int(output.shape[-1]) if output.ndim >= 2 else None, output_spread(output))

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
