"""Typed configuration: the fields every run shares, and experiment files.

An experiment file (`experiments/<model>.yaml`) names a model and holds its
stages `quick`, `medium` and `full` as plain data:

    model: tinyimagenet
    defaults: {seed: 0, lr: 3.0e-4}        # shared by every stage
    stages:
      quick: {max_epochs: 4, family: residual, width: 16}

`resolve_config` merges defaults, the stage and `--set key=value` overrides,
and validates the result with the model's pydantic config class (a subclass of
`TrainConfig`). Every mistake a user can make ends in a `ConfigError` whose
message is one sentence naming the file, stage and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raylab.health_config import HealthConfig

STAGES = ("quick", "medium", "full")
Stage = Literal["quick", "medium", "full"]


class ConfigError(ValueError):
    """A configuration mistake a user can fix; the message names what is wrong."""


class TrainConfig(BaseModel):
    """Fields the training loop reads; each model's config extends this class."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    seed: int = Field(0, description="Seeds model init, data order, augmentation and dropout; same seed + same worker count = same weights.")
    max_epochs: int = Field(1, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (None: run all epochs).")
    per_worker_batch_size: int = Field(32, gt=0, description="Samples per micro-batch on each worker; the global batch is this x workers x grad_accum_steps.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    grad_clip_norm: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value (None: no clipping).")
    log_every_steps: int = Field(10, gt=0, description="Optimizer steps between progress updates and TensorBoard train scalars.")
    eval_every_steps: int = Field(0, ge=0, description="Optimizer steps between evaluations (0: at the end of every epoch).")
    checkpoint_every_batches: int = Field(0, ge=0, description="Micro-batches between mid-epoch checkpoints (0: only at the end of every epoch); a multiple of grad_accum_steps.")
    keep_checkpoints: int | None = Field(3, gt=0, description="How many of the newest checkpoints to keep in storage, besides the best ones kept by keep_best_checkpoints; the newest valid one is never deleted (None: keep all).")
    keep_best_checkpoints: int = Field(0, ge=0, description="Also keep this many best checkpoints by checkpoint_metric, however old (0: none).")
    checkpoint_metric: str | None = Field(None, description="Metric that ranks checkpoints for keep_best_checkpoints, as named in metrics.parquet (e.g. val_loss); only checkpoints whose report carries it are ranked.")
    checkpoint_mode: Literal["min", "max"] | None = Field(None, description="Whether lower (min) or higher (max) checkpoint_metric is better (None: min for losses and errors, max otherwise).")
    data_loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker (0: load in the training process).")
    eval_batch_size: int = Field(256, gt=0, description="Samples per batch during evaluation.")
    num_samples: int = Field(2, ge=0, description="Inference outputs written per sampling round to <run>/samples/ (0: never sample).")
    sample_every_steps: int = Field(0, ge=0, description="Optimizer steps between sampling rounds (0: with every evaluation). One round also runs before the first step, so a broken sampler fails in seconds, not hours.")
    init_from: str | None = Field(None, description="Warm start: a checkpoint folder (or a run folder: its newest valid checkpoint), local or s3://, whose tensors with matching names and shapes initialise a fresh run; the rest stay at init and warm_start.json says which. Ignored when the run resumes from its own checkpoints.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an exponential moving average of the weights with this decay (e.g. 0.9999 for DiT), saved as ema.safetensors and used for evaluation and sampling (None: off).")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Training health checks, each warn | stop | off, and their warm-up and window sizes (raylab.health_config; --set health.<check>=stop).")

    @model_validator(mode="after")
    def _checkpoint_on_step_boundary(self) -> "TrainConfig":
        if self.checkpoint_every_batches % self.grad_accum_steps:
            raise ValueError(
                f"checkpoint_every_batches ({self.checkpoint_every_batches}) must be a multiple of "
                f"grad_accum_steps ({self.grad_accum_steps}) so checkpoints fall between optimizer steps"
            )
        if self.keep_best_checkpoints and not self.checkpoint_metric:
            raise ValueError(
                f"keep_best_checkpoints ({self.keep_best_checkpoints}) needs checkpoint_metric, the metric that ranks "
                "checkpoints (e.g. val_loss or val_accuracy)"
            )
        return self


class LaunchConfig(BaseModel):
    """Where and how big a run is: everything that is not the model's config."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, ge=0, description="Training workers (0: run in this process, no Ray).")
    use_gpu: bool = Field(False, description="Give each worker one GPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    storage_path: str = Field("raylab_results", description="Local folder or s3:// URI that holds every run.")
    name: str | None = Field(None, description="Run name; a run with an existing name resumes from its latest checkpoint.")
    address: str | None = Field(None, description="Ray cluster address (None: RAY_ADDRESS or an embedded local Ray).")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the latest checkpoint before giving up (-1: forever).")


_FLAGS = {"num_workers": "--workers", "use_gpu": "--gpus", "cpus_per_worker": "--cpus-per-worker", "storage_path": "--storage",
          "name": "--name", "address": "--address", "max_failures": "--max-failures"}


_LOWER_IS_BETTER = ("loss", "mae", "mse", "rmse", "mape", "error", "perplexity", "vb")


def metric_mode(name: str) -> Literal["min", "max"]:
    """Whether lower ("min") or higher ("max") values of a metric are better, from its name."""
    return "min" if any(part in name.lower() for part in _LOWER_IS_BETTER) else "max"


_METRIC_KINDS = ("val", "sample", "train")


def missing_metric(metric: str, reported: dict[str, Any]) -> str | None:
    """A sweep's metric that a report shows will never come: the report carries metrics of its
    kind (val_, sample_, train_) but not it -- e.g. val_acuracy at the first evaluation. Returns
    the sentence to stop the trial with (seconds in, not a whole stage later), else None."""
    import difflib

    kind = metric.split("_", 1)[0]
    same_kind = sorted(k for k in reported if k.startswith(f"{kind}_"))
    if kind not in _METRIC_KINDS or metric in reported or not same_kind:
        return None
    close = difflib.get_close_matches(metric, same_kind, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (f"the sweep's metric '{metric}' is not among the {kind}_ metrics this run reports ({', '.join(same_kind)}){hint}; "
            "choose one with --metric, or ladder.metric in the experiment file.")


def make_launch_config(**values: Any) -> LaunchConfig:
    """LaunchConfig from command-line values; a bad one is a ConfigError naming the flag."""
    try:
        return LaunchConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"option {_FLAGS.get(str(e['loc'][0]), e['loc'][0])} {e['msg'][0].lower() + e['msg'][1:]} (got {e.get('input')!r})"
            for e in exc.errors()
        )
        raise ConfigError(f"{problems}.") from None


def _describe_error(err: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown field '{field}'"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if field == "config" or isinstance(got, dict):
        return msg[0].lower() + msg[1:]
    return f"field '{field}' {msg[0].lower() + msg[1:]} (got {got!r})"


def validate_config(config_cls: type[TrainConfig], values: dict[str, Any], where: str) -> TrainConfig:
    """Build `config_cls` from `values`; a failure becomes one ConfigError sentence."""
    try:
        return config_cls.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(_describe_error(e) for e in exc.errors())
        raise ConfigError(f"{where}: {problems}.") from None


def merge_values(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `extra`; nested sections (e.g. `health`) are merged key by key, not replaced."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_values(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `["lr=1e-3", "health.labels=off"]` into a dict; values are parsed as YAML scalars and
    a dotted key sets a field of a nested section (`{"health": {"labels": "off"}}`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            raise ConfigError(f"--set '{pair}' is not of the form key=value.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        *sections, name = key.split(".")
        for section in reversed(sections):
            value = {name: value}
            name = section
        out = merge_values(out, {name: value})
    return out


def read_experiment(path: Path) -> dict[str, Any]:
    """Read and shape-check an experiment YAML file."""
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"experiment file {path} is not valid YAML: {exc}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise ConfigError(f"experiment file {path} must be a mapping with a 'stages' mapping.")
    unknown = set(data) - {"model", "description", "defaults", "stages", "search", "ladder"}  # search: raylab.sweep, ladder: raylab.ladder
    if unknown:
        raise ConfigError(f"experiment file {path} has unknown top-level key(s) {sorted(unknown)}.")
    for stage, body in data["stages"].items():
        if stage not in STAGES:
            raise ConfigError(f"experiment file {path}: stage '{stage}' is not one of {', '.join(STAGES)}.")
        if not isinstance(body, dict):
            raise ConfigError(f"experiment file {path}: stage '{stage}' must be a mapping of fields.")
    return data


def stage_values(experiment: dict[str, Any], stage: str, path: Path) -> dict[str, Any]:
    """The raw field values of one stage: defaults, then the stage's own."""
    if stage not in experiment["stages"]:
        raise ConfigError(
            f"experiment file {path} has no stage '{stage}' (it has: {', '.join(experiment['stages'])})."
        )
    return merge_values(experiment.get("defaults") or {}, experiment["stages"][stage])


def resolve_config(
    config_cls: type[TrainConfig], path: Path, stage: str, overrides: dict[str, Any]
) -> TrainConfig:
    """Validated config for `stage` of the experiment at `path`, with overrides applied."""
    experiment = read_experiment(path)
    values = merge_values(stage_values(experiment, stage, path), overrides)
    return validate_config(config_cls, values, f"{path} stage '{stage}'")
