"""The model interface every seed model implements, and the registry of models.

A task is one model folder's `task.py`. It knows its model and data and nothing
about Ray. The loop (`raylab.torch_loop`) owns step counting, gradient
accumulation, the data order, checkpoints and reporting; a PyTorch task only
answers these questions:

    config_cls                      its pydantic config (a TrainConfig subclass)
    build(cfg, ctx) -> TorchParts   model, optimizer, scheduler, training dataset
    loss(model, batch)              (loss tensor, {metric: tensor}) for one micro-batch
    evaluate(model, ctx)            {metric: float} over the validation split
    sample(model, n, ctx, options)  n JSON-able inference outputs (periodic samples,
                                    `raylab sample`): a list of dicts, or a
                                    SampleOutput adding metrics and a PNG
    describe(cfg)                   one line for `raylab models`
    num_parameters(cfg)             parameter count of the model `cfg` builds
    headline_metrics                metric names (no train_/val_ prefix) the live
                                    line shows, e.g. ("loss", "cls_loss", "geo_loss")

Optional: `build_for_sampling(cfg, ctx, task_metadata) -> model` builds the model
from a checkpoint's config and stored metadata without reading the data, for
`raylab sample` (DiT has it; tasks without it are built with `build`).

Optional declarations for the training health checks (`raylab.health`); a
check whose declaration is missing does not apply, so nothing false is reported:

    num_classes                     int, after build: the classes of the data; the
                                    model's output must end in this many scores,
                                    chance accuracy is 1/num_classes, a uniform
                                    prediction's loss ln(num_classes)
    class_labels(batch)             the integer class labels of a micro-batch, checked
                                    against [0, num_classes) (-100, PyTorch's
                                    ignore_index, is skipped)
    describe_sample(index)          a training sample's name (file, id) for messages
                                    such as "NaN in batch[0] of clip_05.npy"
    accuracy_metric                 the loss()'s metric that is a classification
                                    accuracy (default "accuracy")
    model_inputs(batch)             TensorFlow tasks: what `model(..., training=False)`
                                    takes from a micro-batch; the loop's step hides the
                                    model's output inside `loss`, so the input-dependence
                                    and output-width checks call the model on it
                                    themselves (PyTorch tasks are hooked instead)

The loss/step split (rather than a `train_step` that steps the optimizer) is
what lets the loop own accumulation, DDP's no_sync and gradient clipping once
for every model. A TensorFlow loop will pair with the same registry and config
classes; only the parts a task builds differ.

`TASKS` maps names to "module:Class" strings so importing raylab imports no
model code (torch, TensorFlow) until a model is asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from raylab.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    import torch

TASKS: dict[str, str] = {
    "tinyimagenet": "models.tinyimagenet.task:TinyImageNetTask",
    "translator": "models.translator.task:TranslatorTask",
    "craft": "models.craft.task:CraftTask",
    "dit": "models.dit.task:DiTTask",
    "gman": "models.gman.task:GmanTask",
}


@dataclass
class TaskContext:
    """What a task may know about where it runs. Reductions are no-ops on one worker."""

    world_rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    all_reduce_sum: Callable[[dict[str, float]], dict[str, float]] = lambda d: dict(d)
    all_gather_object: Callable[[Any], list[Any]] = lambda obj: [obj]

    @property
    def is_main(self) -> bool:
        return self.world_rank == 0


@dataclass
class TorchParts:
    """What a PyTorch task builds for the loop."""

    model: "torch.nn.Module"
    optimizer: "torch.optim.Optimizer"
    train_data: Any  # a map-style dataset: __len__, __getitem__, optional set_epoch(epoch)
    # (optimizer, total optimizer steps) -> LR scheduler stepped once per optimizer step
    make_scheduler: Callable[[Any, int], Any] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    # JSON-able facts stored in every checkpoint's state.json under "task_metadata"
    # (e.g. class names, tokenizer kind) so a checkpoint can be used without the data.
    # metadata["notices"], a list of sentences, is shown as notes when the run starts.
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleOptions:
    """What `raylab sample` may ask of a task's sampler; a task ignores what does not apply to it."""

    label: int | str | None = None  # a class index or name to condition on (None: cycle through classes)
    guidance: float | None = None  # classifier-free guidance scale (None: the config's default)
    steps: int | None = None  # sampler steps, e.g. DDIM steps (None: the config's default)
    seed: int | None = None  # sampling noise seed (None: derived from the run's seed and step)


@dataclass
class SampleOutput:
    """A sampling round: the JSON-able samples, optional scalar metrics of the round
    (recorded in metrics.parquet, e.g. sample_label_accuracy) and an optional PNG
    (an image grid, written next to the round's JSON)."""

    samples: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    png: bytes | None = None


@dataclass
class TfParts:
    """What a TensorFlow task builds for the loop (`raylab.tf_loop`); `build` runs inside the
    distribution strategy's scope, so variables are mirrored across workers."""

    model: Any  # a built keras.Model whose layers all have explicit names (checkpoints key variables by path)
    # (optimizer steps per epoch, scheduled steps of the run) -> a keras optimizer with an explicit name;
    # an LR schedule should be a function of the optimizer's `iterations`, so it resumes exactly.
    make_optimizer: Callable[[int, int], Any]
    train_data: Any  # __len__, and batch(indices) -> tuple of numpy arrays (one micro-batch)
    metadata: dict[str, Any] = field(default_factory=dict)
    jit_compile: bool = False  # compile the forward/backward pass with XLA
    # Variable names (a path's last part) holding values computed from this run's data
    # (normalisation constants, a spatial embedding): a warm start keeps them, never copies them.
    data_variables: tuple[str, ...] = ()


@runtime_checkable
class TfTask(Protocol):
    """A TensorFlow task. Like TorchTask, but `loss` returns the micro-batch's loss as a sum
    and its weight (e.g. the number of valid labels): the loop divides by the weight summed
    over all workers, so N workers x batch B train exactly like 1 worker x batch N*B."""

    config_cls: type[TrainConfig]
    framework: str  # "tensorflow"

    def build(self, cfg: TrainConfig, ctx: TaskContext) -> TfParts: ...

    def loss(self, model: Any, batch: Any) -> tuple[Any, Any, dict[str, Any]]: ...  # (loss sum, weight, {metric: mean})

    def evaluate(self, model: Any, ctx: TaskContext) -> dict[str, float]: ...

    def sample(self, model: Any, n: int, ctx: TaskContext, options: SampleOptions | None = None) -> "list[dict[str, Any]] | SampleOutput": ...

    def describe(self, cfg: TrainConfig) -> str: ...

    def num_parameters(self, cfg: TrainConfig) -> int: ...


def check_workers(task: Any, cfg: TrainConfig, num_workers: int) -> None:
    """Before Ray starts: a task may refuse a config at a worker count (`check_workers(cfg,
    world_size)` raising ConfigError; optional), so the mistake costs no cluster start."""
    check = getattr(task, "check_workers", None)
    if check is not None:
        check(cfg, max(1, num_workers))


def framework_of(task: Any) -> str:
    """Which loop trains a task: "torch" unless it says otherwise (`framework = "tensorflow"`)."""
    return getattr(task, "framework", "torch")


@runtime_checkable
class TorchTask(Protocol):
    config_cls: type[TrainConfig]

    def build(self, cfg: TrainConfig, ctx: TaskContext) -> TorchParts: ...

    def loss(self, model: "torch.nn.Module", batch: Any) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]: ...

    def evaluate(self, model: "torch.nn.Module", ctx: TaskContext) -> dict[str, float]: ...

    def sample(self, model: "torch.nn.Module", n: int, ctx: TaskContext, options: SampleOptions | None = None) -> "list[dict[str, Any]] | SampleOutput": ...

    def describe(self, cfg: TrainConfig) -> str: ...

    def num_parameters(self, cfg: TrainConfig) -> int: ...


def task_name_of(task: Any) -> str:
    """The registry name of a task instance (its module path when it is not registered)."""
    target = f"{type(task).__module__}:{type(task).__name__}"
    return next((name for name, spec in TASKS.items() if spec == target), type(task).__module__)


def get_task(name: str) -> TorchTask:
    """A fresh task instance for a registered model name."""
    if name not in TASKS:
        raise ConfigError(f"unknown model '{name}'; registered models: {', '.join(sorted(TASKS))}.")
    module_name, _, class_name = TASKS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls()
