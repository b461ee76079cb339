"""The health checks that need PyTorch tensors: gradients, parameters, modes, the optimizer, outputs.

`TorchStepper.health_probe()` builds a `TorchProbe` over the task's model and
optimizer; `raylab.health.HealthMonitor` calls it at the loop's named points
and applies each check's policy. What it looks at, and when:

- at start: optimizer groups against the model's parameters (an optimizer
  built for another model; trainable parameters in no group), and a
  fingerprint of every frozen parameter;
- every micro-batch: the model's mode at its forward (a forward pre-hook);
  at a step's end, the gradients: one fused norm per step finds NaN/inf and the
  first parameter holding it; at the first step, trainable parameters without
  a gradient; over the first `zero_grad_steps`, those with only zeros;
- on chosen steps, the model's output (a forward hook): its last dimension for
  the num_classes check and its spread across the batch relative to its
  magnitude -- seed 003's deep plain CNN gives ~2e-7, healthy models 1e-2+;
- after evaluation/sampling: the mode inside and after;
- at each window's end: whether a frozen parameter changed.

Under DDP the gradients checked at a step's end are already all-reduced, so
every worker reaches the same verdict. A parameter DDP sees unused makes DDP
itself fail at the next step (find_unused_parameters is off); this check runs
first and names it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raylab.health import ArrayProbe, leaves, output_spread
from raylab.health import name_list as _names
from raylab.health_config import HealthConfig


def first_tensor(output: Any) -> torch.Tensor | None:
    """The model's main output: the tensor itself, the first of a tuple/list/dict, or `.logits`."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def input_dependence(output: torch.Tensor) -> float | None:
    """raylab.health.output_spread of a model output tensor."""
    if not output.is_floating_point():
        return None
    return output_spread(output.detach().float().cpu().numpy())


def fingerprint(t: torch.Tensor) -> tuple[float, float]:
    d = t.detach().double()
    return float(d.sum()), float((d * d).sum())


class TorchProbe(ArrayProbe):
    """Hooks and tensor checks over one model and its optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = dict(model.named_parameters())
        self.modes: list[bool] = []  # model.training at each forward since watch()
        self.measure = False
        self.suspects: dict[str, torch.nn.Parameter] | None = None  # trainable, no non-zero gradient yet
        self.zero_steps = 0
        self.frozen: dict[str, tuple[float, float]] = {}
        self.handles = [model.register_forward_pre_hook(self._pre_forward), model.register_forward_hook(self._post_forward)]

    def not_checked(self, check: str) -> str:
        return ""  # every model check

    # -- hooks ----------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        self.modes.append(module.training)

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self.measure:
            return
        self.measure = False
        out = first_tensor(output)
        if out is None or self.on_output is None:
            return
        with torch.no_grad():
            width = int(out.shape[-1]) if out.dim() >= 2 else None
            self.on_output(width, input_dependence(out))

    # -- batches ----------------------------------------------------------------------
    def to_numpy(self, value: Any) -> np.ndarray | None:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return super().to_numpy(value)

    def nonfinite_rows(self, batch: Any) -> list[tuple[str, list[int]]]:
        out = []
        for path, value in leaves(batch):
            if isinstance(value, torch.Tensor):
                # A sum is NaN/inf when any element is (or when it overflows): one cheap pass, then the rows.
                if value.is_floating_point() and value.dim() and not bool(torch.isfinite(value.detach().sum())):
                    bad = ~torch.isfinite(value.detach().reshape(value.shape[0], -1)).all(dim=1)
                    if bool(bad.any()):
                        out.append((path, torch.nonzero(bad).flatten().tolist()))
            elif isinstance(value, np.ndarray):
                out += [(path, rows) for _, rows in super().nonfinite_rows(value)]
        return out

    # -- the loop's points ---------------------------------------------------------------
    def start(self, cfg: HealthConfig) -> list[tuple[str, str]]:
        found = []
        mine = {id(p) for p in self.params.values()}
        held = [p for group in self.optimizer.param_groups for p in group["params"]]
        held_ids = {id(p) for p in held}
        foreign = [p for p in held if id(p) not in mine]
        missing = [n for n, p in self.params.items() if p.requires_grad and id(p) not in held_ids]
        if foreign and missing and cfg.active("optimizer_foreign"):
            shapes = _names([str(tuple(p.shape)) for p in foreign], 3)
            found.append(("optimizer_foreign", f"the optimizer updates {len(foreign)} tensor(s) that are not this model's parameters "
                                               f"(shapes {shapes}) while {len(missing)} of the model's trainable parameters are in "
                                               "no group: it was built for another model"))
        elif missing and cfg.active("optimizer_missing"):
            found.append(("optimizer_missing", f"{len(missing)} trainable parameter(s) are in no optimizer group and will never "
                                               f"change: {_names(missing)}"))
        self.frozen = {n: fingerprint(p) for n, p in self.params.items() if not p.requires_grad} if cfg.active("frozen_changed") else {}
        return found

    def watch(self, training: bool, measure_output: bool, batch: Any = None) -> None:
        self.modes = []
        self.measure = measure_output

    def after_micro_batch(self, cfg: HealthConfig, step_ends: bool, step: int) -> list[tuple[str, str]]:
        found = []
        if cfg.active("train_mode"):
            was_training = self.modes[0] if self.modes else self.model.training
            if not was_training or not self.model.training:
                found.append(("train_mode", f"the model was in eval mode during the train step at step {step} (dropout and "
                                            "batch-norm statistics off): something called model.eval() and not model.train()"))
        self.measure = False
        self.modes = []  # what evaluation or sampling runs next is judged on its own forwards
        if step_ends:
            if cfg.active("nonfinite_grads"):
                found += self._nonfinite_grads(step)
            if cfg.active("no_grad"):
                found += self._no_grad(step, cfg.zero_grad_steps)
        return found

    def after_inference(self, cfg: HealthConfig, what: str) -> list[tuple[str, str]]:
        found = []
        if cfg.active("train_mode"):
            if any(self.modes):
                found.append(("train_mode", f"{what} ran the model in training mode (dropout on, batch-norm statistics updated)"))
            if not self.model.training:
                found.append(("train_mode", f"{what} left the model in eval mode for the training steps that follow"))
        self.modes = []
        return found

    def window_end(self, cfg: HealthConfig) -> list[tuple[str, str]]:
        changed = [n for n, fp in self.frozen.items() if fingerprint(self.params[n]) != fp]
        if changed and cfg.active("frozen_changed"):
            self.frozen = {n: fp for n, fp in self.frozen.items() if n not in changed}
            return [("frozen_changed", f"{len(changed)} frozen parameter(s) (requires_grad off) changed: {_names(changed)}")]
        return []

    # -- gradients ----------------------------------------------------------------------
    def _nonfinite_grads(self, step: int) -> list[tuple[str, str]]:
        named = [(n, p.grad) for n, p in self.params.items() if p.grad is not None and not p.grad.is_sparse]
        if not named:
            return []
        norms = torch._foreach_norm([g for _, g in named])  # one fused pass over every gradient
        device = norms[0].device
        if bool(torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()):  # one sync with the device
            return []
        bad = [n for (n, _), norm in zip(named, norms) if not bool(torch.isfinite(norm))]
        return [("nonfinite_grads", f"non-finite gradient at step {step} in {bad[0]}"
                                    + (f" (and {len(bad) - 1} more parameter(s))" if len(bad) > 1 else "") + " while the loss was finite")]

    def _no_grad(self, step: int, zero_steps: int) -> list[tuple[str, str]]:
        found = []
        if self.suspects is None:  # the first step: None means the backward never reached it
            trainable = {n: p for n, p in self.params.items() if p.requires_grad}
            none = [n for n, p in trainable.items() if p.grad is None]
            if none:
                found.append(("no_grad", f"{len(none)} trainable parameter(s) got no gradient at step {step}: {_names(none)} "
                                          "(computed under no_grad/detach, or not used by the loss)"))
            self.suspects = {n: p for n, p in trainable.items() if p.grad is not None}
        if self.zero_steps >= zero_steps or not self.suspects:
            return found
        self.zero_steps += 1
        self.suspects = {n: p for n, p in self.suspects.items() if p.grad is None or not bool(p.grad.any())}
        if self.zero_steps == zero_steps and self.suspects:
            found.append(("no_grad", f"{len(self.suspects)} trainable parameter(s) got only zero gradients over the first "
                                      f"{zero_steps} steps: {_names(list(self.suspects))}"))
        return found

    def frozen_summary(self) -> str:
        """'t5.encoder 98.6K' for each module holding frozen parameters ('' when every parameter trains)."""
        groups: dict[str, int] = {}
        for name, p in self.params.items():
            if not p.requires_grad:
                group = ".".join(name.split(".")[:2]) if name.count(".") > 1 else name
                groups[group] = groups.get(group, 0) + p.numel()
        return ", ".join(f"{g} {n / 1e3:.1f}K" if n >= 1000 else f"{g} {n}" for g, n in groups.items())

    def trainable_count(self) -> tuple[int, int]:
        return sum(p.numel() for p in self.params.values() if p.requires_grad), sum(p.numel() for p in self.params.values())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
