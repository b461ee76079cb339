"""The checkpoint folder format: plain data, verifiable, tied to no code.

A checkpoint is one folder (handed to Ray with `Checkpoint.from_directory`):

    model.safetensors     the unwrapped model's weights
    optimizer.pt          optimizer state  } loadable with
    scheduler.pt          scheduler state  } torch.load(weights_only=True)
    state.json            counters (epoch, batch_in_epoch, global_step), the
                          run's config, metrics, every worker's RNG state and
                          a sha256 per file -- written last, so a folder without
                          it is an interrupted save, never a checkpoint

Nothing is pickled: a checkpoint written today loads after the code changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

STATE_FILE = "state.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or corrupted."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STATE_FILE)


def finalize_checkpoint(directory: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Write state.json (with a checksum of every other file) into `directory`."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in _payload_files(directory)
    }
    full = {"format": FORMAT_VERSION, **state, "files": files}
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, directory / STATE_FILE)
    return full


def read_checkpoint_state(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """state.json of a checkpoint folder; with `verify`, every file's checksum is checked."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{directory} has no {STATE_FILE}: not a raylab checkpoint, or its save was interrupted.")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_path} is not valid JSON ({exc}); the checkpoint is corrupted.") from None
    if verify:
        for name, info in state.get("files", {}).items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing.")
            if file_sha256(path) != info["sha256"]:
                raise CheckpointError(f"checkpoint file {path} does not match its checksum in {STATE_FILE}; it is corrupted.")
    return state


def save_torch_state(directory: str | Path, model, optimizer=None, scheduler=None) -> None:
    """Write model.safetensors, optimizer.pt and scheduler.pt into `directory`."""
    import safetensors.torch
    import torch

    directory = Path(directory)
    # save_model de-duplicates tied weights (e.g. T5's shared embedding), which save_file refuses.
    safetensors.torch.save_model(model, str(directory / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")


def load_torch_state(directory: str | Path, model, optimizer=None, scheduler=None, device: str = "cpu") -> None:
    """Load what `save_torch_state` wrote; tensors are read without unpickling code."""
    import safetensors.torch
    import torch

    directory = Path(directory)
    missing, unexpected = safetensors.torch.load_model(model, str(directory / "model.safetensors"), strict=False, device=device)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / 'model.safetensors'} does not fit the model: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}."
        )
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
    if scheduler is not None and (directory / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))


def capture_rng() -> dict[str, Any]:
    """This process's RNG state (python, numpy's global, torch CPU and CUDA) as JSON-able data."""
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )
