"""Exponential moving average of a model's weights (`ema_decay` in any config).

DiT samples from EMA weights (decay 0.9999); so do most diffusion and many
vision recipes. After every optimizer step the shadow weights move toward the
live ones: shadow = decay * shadow + (1 - decay) * weight. Buffers (BatchNorm
statistics) are copied as they are. The shadow is saved as `ema.safetensors`
(same keys as `model.safetensors`) and restored on resume, so a resumed run's
EMA is bit-identical to an uninterrupted one's. `swapped_in` puts the shadow
into the model for evaluation and sampling and puts the live weights back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

EMA_FILE = "ema.safetensors"


class EmaWeights:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        with torch.no_grad():
            self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._floating = {k for k, v in self.shadow.items() if v.is_floating_point()}
        self._params = {k for k, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        for key, value in self.model.state_dict().items():
            shadow = self.shadow[key]
            if key in self._params and key in self._floating:
                shadow.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                shadow.copy_(value)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            self.model.load_state_dict(live)

    def save(self, directory: Path) -> None:
        import safetensors.torch

        # Tied weights share storage in a state_dict; safetensors refuses shared tensors, so store
        # each key's own contiguous copy (a few KB more for tied embeddings, never ambiguous).
        tensors = {k: v.detach().contiguous().clone() for k, v in self.shadow.items()}
        safetensors.torch.save_file(tensors, str(Path(directory) / EMA_FILE))

    def load(self, directory: Path) -> None:
        import safetensors.torch

        path = Path(directory) / EMA_FILE
        if not path.is_file():
            # A checkpoint from before EMA was switched on: start the average at the restored weights.
            self.shadow = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return
        saved = safetensors.torch.load_file(str(path), device=str(next(iter(self.shadow.values())).device))
        missing = set(self.shadow) - set(saved)
        if missing:
            from raylab.checkpoint import CheckpointError

            raise CheckpointError(f"{path} lacks {sorted(missing)[:5]}: it was written for another model.")
        for key in self.shadow:
            self.shadow[key].copy_(saved[key])
