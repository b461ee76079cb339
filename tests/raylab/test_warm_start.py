"""Warm start across sizes (`init_from`, `raylab train --init-from`): tensors whose name
and shape match are copied, the rest stay at init, and warm_start.json says which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from raylab.checkpoint import CheckpointError
from raylab.cli import app
from raylab.config import LaunchConfig
from raylab.launch import train
from raylab.session import LocalSession
from raylab.task import get_task
from raylab.torch_loop import TorchStepper
from raylab.warm_start import match_tensors, source_checkpoint


def run_local(tmp_path: Path, name: str, overrides: dict):
    return train("tinyimagenet", "quick", overrides, LaunchConfig(num_workers=0, storage_path=str(tmp_path), name=name))


def test_match_tensors_sorts_every_tensor_into_one_bucket():
    report = match_tensors("src", {"a": (2, 3), "b": (4,), "gone": (1,)}, {"a": (2, 3), "b": (8,), "extra": (5,)})
    assert report.loaded == ["a"] and report.new == ["extra"] and report.unused == ["gone"]
    assert report.skipped_shape == [{"name": "b", "saved": [4], "model": [8]}]
    assert report.summary() == "warm start from src: 1 tensors loaded, 1 skipped (shape differs), 1 new, 1 unused"


def test_residual_to_se_loads_shared_tensors_and_leaves_new_ones_at_init(tmp_path, tiny):
    source = run_local(tmp_path, "residual", tiny(family="residual", max_epochs=1))
    saved = safetensors.torch.load_file(str(Path(source.latest_checkpoint) / "model.safetensors"))
    task = get_task("tinyimagenet")
    cfg = task.config_cls.model_validate(tiny(family="se", init_from=source.latest_checkpoint))
    fresh = TorchStepper(task, cfg, LocalSession(tmp_path / "probe", keep_checkpoints=1)).model.state_dict()
    stepper = TorchStepper(task, cfg, LocalSession(tmp_path / "probe2", keep_checkpoints=1))
    with source_checkpoint(source.latest_checkpoint) as folder:
        report = stepper.warm_start(folder, source.latest_checkpoint)
    warmed = stepper.model.state_dict()
    assert report.loaded and not report.unused and not report.skipped_shape
    assert report.new and all(".se." in name for name in report.new)  # squeeze-excitation layers: only in the SE family
    for name in report.loaded:
        assert torch.equal(warmed[name], saved[name]), name
    for name in report.new:
        assert torch.equal(warmed[name], fresh[name]), name


def test_init_from_a_run_folder_through_the_cli_writes_the_report(tmp_path, tiny):
    run_local(tmp_path, "small", tiny(family="baseline", width=4, max_epochs=1))
    sets = [f"--set={k}={v}" for k, v in tiny(family="baseline", width=8, max_epochs=1).items()]
    result = CliRunner().invoke(app, ["train", "tinyimagenet", "--workers", "0", "--storage", str(tmp_path), "--name", "wide",
                                      "--init-from", str(tmp_path / "small"), *sets])
    assert result.exit_code == 0, result.output
    assert "warm start from" in result.output
    report = json.loads((tmp_path / "wide" / "warm_start.json").read_text())
    # Doubling the width changes every conv and the head: everything is skipped for shape,
    # nothing is new or unused (same layer names).
    assert report["counts"]["skipped_shape"] > 0 and report["counts"]["new"] == 0 and report["counts"]["unused"] == 0
    assert report["summary"].startswith(f"warm start from {tmp_path / 'small'}")


def test_resumed_run_ignores_init_from(tmp_path, tiny):
    run_local(tmp_path, "src", tiny(max_epochs=1))
    run_local(tmp_path, "run", tiny(max_epochs=1, init_from=str(tmp_path / "src")))
    (tmp_path / "run" / "warm_start.json").unlink()
    run_local(tmp_path, "run", tiny(max_epochs=2, init_from=str(tmp_path / "src")))  # resumes its own checkpoint
    assert not (tmp_path / "run" / "warm_start.json").exists()


def test_init_from_nothing_useful_is_a_clear_error(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no valid checkpoint"):
        run_local(tmp_path, "run", tiny(init_from=str(tmp_path / "empty")))
    with pytest.raises(CheckpointError, match="is not a checkpoint or run folder"):
        run_local(tmp_path, "run2", tiny(init_from=str(tmp_path / "missing")))
