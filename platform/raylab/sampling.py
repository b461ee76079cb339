"""Sample from a trained checkpoint: the Python API behind `raylab sample`.

    from raylab.sampling import load_checkpoint, sample_checkpoint
    loaded = load_checkpoint("s3://bucket/prefix/run-name")     # task, config and model (EMA weights)
    result = sample_checkpoint("raylab_results/dit-quick/checkpoint_...", n=16, label="class_3",
                               guidance=4.0, steps=50, seed=0, out="samples.json")

Works for every registered task that can sample (DiT generates images or token
sequences; tinyimagenet gives its predictions; GMAN, a TensorFlow task, its
forecasts). The checkpoint folder (or a run folder: its newest checkpoint) may
be local or on any pyarrow filesystem
(`s3://bucket/run/checkpoint_...`); a remote one is copied to a temporary
folder, and every file's checksum is verified first. The task is rebuilt from the config stored in state.json, with the EMA weights
(`ema.safetensors`) when the run kept them, else `model.safetensors`.

A task may offer `build_for_sampling(cfg, ctx, task_metadata) -> model` to
build its model from the checkpoint alone (DiT does: no dataset needed);
otherwise its ordinary `build` runs, which may read its data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from raylab.checkpoint import CheckpointError, load_torch_state, read_checkpoint_state
from raylab.config import ConfigError, validate_config
from raylab.task import TASKS, SampleOptions, SampleOutput, TaskContext, framework_of, get_task

EMA_WEIGHTS = "ema.safetensors"  # written by the loop when ema_decay is set; same keys as model.safetensors


@dataclass
class SamplingResult:
    """What `sample_checkpoint` produced: the JSON payload and where it went."""

    payload: dict[str, Any]
    json_path: Path | None = None
    png_path: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _checkpoint_in(fs, path: str, shown: str) -> str:
    """`path` itself when it is a checkpoint folder; for a run folder, its newest checkpoint
    (names are zero-padded epoch / batch / step, so the last name is the newest)."""
    import pyarrow.fs as pafs

    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.Directory:
            raise CheckpointError(f"checkpoint folder {shown} does not exist." if info.type == pafs.FileType.NotFound
                                  else f"{shown} is a file, not a checkpoint folder.")
        entries = fs.get_file_info(pafs.FileSelector(path))
    except OSError as exc:
        raise CheckpointError(f"cannot open checkpoint {shown} ({exc}).") from None
    if any(e.base_name == "state.json" for e in entries):
        return path
    checkpoints = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_"))
    return f"{path.rstrip('/')}/{checkpoints[-1]}" if checkpoints else path


@contextlib.contextmanager
def local_checkpoint(checkpoint: str) -> Iterator[tuple[Path, str]]:
    """(the checkpoint folder on local disk: itself or a temporary copy, its name); a run
    folder stands for its newest checkpoint."""
    import pyarrow.fs as pafs

    if "://" not in checkpoint:
        found = _checkpoint_in(pafs.LocalFileSystem(), str(Path(checkpoint).expanduser().absolute()), checkpoint)
        yield Path(found), Path(found).name
        return
    try:
        fs, remote = pafs.FileSystem.from_uri(checkpoint)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot open checkpoint {checkpoint} ({exc}).") from None
    remote = _checkpoint_in(fs, remote, checkpoint)
    tmp = Path(tempfile.mkdtemp(prefix="raylab-sample-"))
    try:
        pafs.copy_files(remote, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp, remote.rstrip("/").rsplit("/", 1)[-1]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def registry_name(recorded: str) -> str:
    """The TASKS name of a checkpoint's task: state.json holds the name, or (older
    checkpoints) the task's module path."""
    if recorded in TASKS:
        return recorded
    for name, spec in TASKS.items():
        if spec.partition(":")[0] == recorded:
            return name
    raise ConfigError(f"the checkpoint was written by task '{recorded}', which is not registered; registered: {', '.join(sorted(TASKS))}.")


def _load_weights(directory: Path, model) -> str:
    """Load EMA weights when present, else the trained weights; returns which file was used."""
    ema = directory / EMA_WEIGHTS
    if not ema.is_file():
        load_torch_state(directory, model)
        return "model.safetensors"
    import safetensors.torch

    try:
        model.load_state_dict(safetensors.torch.load_file(str(ema)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ema} does not fit the model ({str(exc).splitlines()[0]}).") from None
    return EMA_WEIGHTS


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class LoadedCheckpoint:
    """A trained model rebuilt from a checkpoint folder, ready for `task.sample`."""

    task_name: str
    task: Any
    cfg: Any  # the task's TrainConfig subclass, from state.json
    model: Any  # torch.nn.Module in eval mode, on `ctx.device`; a keras.Model for TensorFlow tasks
    ctx: TaskContext
    state: dict[str, Any]
    weights: str  # "ema.safetensors" or "model.safetensors"
    folder: str  # the checkpoint folder's name (a run folder resolves to its newest)


def load_checkpoint(checkpoint: str | Path, device: str = "cpu") -> LoadedCheckpoint:
    """Rebuild the task and model a checkpoint was written by and load its weights
    (EMA when present). User mistakes raise ConfigError or CheckpointError."""
    import torch

    checkpoint = str(checkpoint)
    with local_checkpoint(checkpoint) as (directory, folder_name):
        state = read_checkpoint_state(directory, verify=True)
        name = registry_name(str(state.get("task", "")))
        task = get_task(name)
        cfg = validate_config(task.config_cls, state.get("config", {}), f"checkpoint {checkpoint} config")
        ctx = TaskContext(device=device)
        if framework_of(task) == "tensorflow":
            from raylab.tf_loop import MODEL_FILE, build_for_inference

            model = build_for_inference(task, cfg, ctx, directory)
            weights = EMA_WEIGHTS if (directory / EMA_WEIGHTS).is_file() else MODEL_FILE
            return LoadedCheckpoint(name, task, cfg, model, ctx, state, weights, folder_name)
        torch.manual_seed(cfg.seed)
        builder = getattr(task, "build_for_sampling", None)
        if builder is not None:
            model = builder(cfg, ctx, state.get("task_metadata") or {})
        else:
            model = task.build(cfg, ctx).model
        model = model.to(device)
        weights = _load_weights(directory, model)
    return LoadedCheckpoint(name, task, cfg, model.eval(), ctx, state, weights, folder_name)


def sample_checkpoint(
    checkpoint: str | Path, n: int = 16, label: int | str | None = None, guidance: float | None = None,
    steps: int | None = None, seed: int | None = None, out: str | Path | None = None, device: str = "cpu",
) -> SamplingResult:
    """Generate `n` samples from a checkpoint folder; with `out`, write them as JSON (and a PNG
    beside it when the task draws one). User mistakes raise ConfigError or CheckpointError."""
    import torch

    if n < 1:
        raise ConfigError(f"--n must be at least 1 (got {n}).")
    loaded = load_checkpoint(checkpoint, device)
    options = SampleOptions(label=label, guidance=guidance, steps=steps, seed=seed)
    with torch.no_grad():
        output = loaded.task.sample(loaded.model, n, loaded.ctx, options)
    if not isinstance(output, SampleOutput):
        output = SampleOutput(samples=list(output))
    payload = {
        "checkpoint": str(checkpoint), "checkpoint_folder": loaded.folder, "model": loaded.task_name,
        "step": loaded.state.get("position", {}).get("global_step"), "weights": loaded.weights,
        "options": {"n": n, "label": label, "guidance": guidance, "steps": steps, "seed": seed},
        "metrics": output.metrics, "samples": output.samples,
    }
    result = SamplingResult(payload, metrics=dict(output.metrics))
    if out is not None:
        result.json_path = Path(out)
        _write_atomic(result.json_path, json.dumps(payload, indent=1, default=str).encode())
        if output.png:
            result.png_path = result.json_path.with_suffix(".png")
            _write_atomic(result.png_path, output.png)
    return result
