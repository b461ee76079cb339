"""Exponential moving average of a Keras model's weights: `ema_decay` for TensorFlow tasks.

The TensorFlow twin of `raylab.ema` (same file, same rules): after every optimizer
step the shadow moves toward the live weights, shadow = decay * shadow + (1 - decay)
* weight, for trainable variables; other float variables (BatchNorm statistics,
constants computed from the data) are copied as they are; integer ones (dropout
seed-generator states) are left out. The shadow lives on the host as float arrays
-- every worker holds the same weights, so every worker's shadow is the same -- and
is saved as `ema.safetensors` keyed by variable path, restored exactly on resume.
`swapped_in` puts it into the model for evaluation and sampling, then the live
weights back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from raylab.ema import EMA_FILE


class KerasEma:
    def __init__(self, variables: dict[str, Any], trainable: list[Any], decay: float):
        trainable_ids = {id(v) for v in trainable}
        self.variables = {k: v for k, v in variables.items() if "float" in str(v.dtype)}
        self.averaged = {k for k, v in self.variables.items() if id(v) in trainable_ids}
        self.decay = np.float32(decay)
        self.reset()

    def reset(self) -> None:
        """Start the average at the current weights (a fresh run, a warm start)."""
        self.shadow = {k: np.array(v.numpy(), copy=True) for k, v in self.variables.items()}

    def update(self) -> None:
        keep = self.decay
        for key, variable in self.variables.items():
            value = np.asarray(variable.numpy())
            if key in self.averaged:
                self.shadow[key] = (self.shadow[key] * keep + value * (np.float32(1) - keep)).astype(value.dtype, copy=False)
            else:
                self.shadow[key] = np.array(value, copy=True)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = {k: np.array(v.numpy(), copy=True) for k, v in self.variables.items()}
        for key, variable in self.variables.items():
            variable.assign(self.shadow[key])
        try:
            yield
        finally:
            for key, variable in self.variables.items():
                variable.assign(live[key])

    def save(self, directory: Path) -> None:
        import safetensors.numpy

        # np.array(order='C'), not np.ascontiguousarray: the latter turns a 0-d scalar (GMAN's input_mean) into shape (1,)
        safetensors.numpy.save_file({k: np.array(v, order="C") for k, v in self.shadow.items()}, str(Path(directory) / EMA_FILE))

    def load(self, directory: Path) -> None:
        import safetensors.numpy

        path = Path(directory) / EMA_FILE
        if not path.is_file():  # a checkpoint from before EMA was switched on
            self.reset()
            return
        saved = safetensors.numpy.load_file(str(path))
        missing = sorted(set(self.shadow) - set(saved))
        if missing:
            from raylab.checkpoint import CheckpointError

            raise CheckpointError(f"{path} lacks {missing[:5]}: it was written for another model.")
        wrong = [k for k in self.shadow if tuple(saved[k].shape) != tuple(self.variables[k].shape)]
        if wrong:
            from raylab.checkpoint import CheckpointError

            raise CheckpointError(f"{path} holds {wrong[:3]} in another shape than the model's: it was written for another model.")
        self.shadow = {k: saved[k] for k in self.shadow}


def load_ema_weights(directory: Path, variables: dict[str, Any]) -> bool:
    """Assign a checkpoint's EMA weights to the variables it holds (for `raylab sample`); False without one."""
    import safetensors.numpy

    path = Path(directory) / EMA_FILE
    if not path.is_file():
        return False
    for key, value in safetensors.numpy.load_file(str(path)).items():
        if key in variables:
            variables[key].assign(value)
    return True
