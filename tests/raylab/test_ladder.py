"""The ladder (`raylab ladder`): three stages with forced architecture changes warm-start
from each other's best checkpoints (loaded / skipped counts in warm_start.json); a gate
stops the ladder with advice and exit 1; a driver SIGKILLed mid-ladder continues on
rerun without repeating the finished stage; ladder sections are checked before Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from raylab.cli import app
from raylab.report import load_results

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def write_experiment(folder: Path, data_dir: Path, stages: dict, **sections) -> Path:
    """A tiny TinyImageNet experiment file: 96 training images, batch 8 -> 12 steps per epoch."""
    defaults = {"data_dir": str(data_dir), "family": "residual", "width": 4, "image_size": 16, "per_worker_batch_size": 8,
                "log_every_steps": 2, "num_samples": 0, "eval_batch_size": 32, "lr": 3e-3, "max_epochs": 1}
    body = {"model": "tinyimagenet", "defaults": defaults, "stages": stages, **sections}
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def ladder_args(experiment: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return ["ladder", "tinyimagenet", "--experiment", str(experiment), "--storage", str(storage), "--name", name, *extra]


@pytest.mark.parametrize(
    ("ladder", "extra", "message"),
    [
        ({"metric": "val_accuracy", "quick": {"gate": {"above": 0.5, "below": 0.9}}}, [], "a gate needs exactly one of above or below"),
        ({"metric": "val_accuracy", "quick": {"gate": {}}}, [], "a gate needs exactly one of above or below"),
        ({"metric": "val_accuracy", "huge": {}}, [], "unknown field 'huge'"),
        ({"quick": {"gate": {"abov": 1}}}, [], "unknown field 'quick.gate.abov'"),
        ({"medium": {"carry": ["lrr"]}}, [], "ladder.medium.carry: 'lrr' is not a field of TinyImageNetConfig"),
        ({}, ["--stages", "quick,full"], "the experiment file has no stage 'full'"),
        ({}, ["--stages", "medium,quick"], "must list stages once each, in ladder order"),
        ({}, ["--stages", "tiny"], "--stages: 'tiny' is not one of quick, medium, full"),
    ],
)
def test_bad_ladder_sections_exit_2_before_ray_starts(tmp_path, tiny_data, monkeypatch, ladder, extra, message):
    import raylab.ray_backend

    monkeypatch.setattr(raylab.ray_backend, "ensure_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray was started")))
    experiment = write_experiment(tmp_path, tiny_data, {"quick": {}, "medium": {"width": 8}}, ladder=ladder)
    result = runner.invoke(app, ladder_args(experiment, tmp_path / "runs", "bad", *extra))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_three_stages_warm_start_across_sizes_and_families(tmp_path, tiny_data):
    # quick: residual width 4 (a 2-trial lr search) -> medium: width 8 (every conv changes
    # shape) -> full: squeeze-excitation at width 8 (same shapes, extra SE layers).
    stages = {"quick": {"max_epochs": 2}, "medium": {"width": 8}, "full": {"width": 8, "family": "se"}}
    ladder = {"metric": "val_accuracy", "quick": {"gate": {"above": 0.3}}, "medium": {"carry": ["lr"]}}
    search = {"quick": {"space": {"lr": "grid(1e-7, 3e-3)"}, "samples": 1, "scheduler": "fifo"}}
    experiment = write_experiment(tmp_path, tiny_data, stages, ladder=ladder, search=search)
    storage = tmp_path / "runs"
    result = runner.invoke(app, ladder_args(experiment, storage, "three"))
    assert result.exit_code == 0, result.output
    state = json.loads((storage / "three" / "ladder.json").read_text())
    assert state["status"] == "finished"
    assert [state["stages"][s]["status"] for s in ("quick", "medium", "full")] == ["done"] * 3
    quick, medium, full = (state["stages"][s] for s in ("quick", "medium", "full"))
    assert quick["best_trial"] == "trial_001" and quick["params"] == {"lr": 3e-3}  # the useful lr wins
    assert medium["carried"] == {"lr": 3e-3}
    # each stage started from the previous stage's best checkpoint
    assert medium["init_from"] == quick["best_checkpoint"] and full["init_from"] == medium["best_checkpoint"]
    assert Path(quick["best_checkpoint"]).parent.name == "trial_001"

    medium_ws = json.loads((storage / "three" / "medium" / "trial_000" / "warm_start.json").read_text())["counts"]
    assert medium_ws["skipped_shape"] > 0 and medium_ws["new"] == 0 and medium_ws["unused"] == 0
    full_ws = json.loads((storage / "three" / "full" / "trial_000" / "warm_start.json").read_text())["counts"]
    assert full_ws["loaded"] > 0 and full_ws["skipped_shape"] == 0 and full_ws["new"] > 0 and full_ws["unused"] == 0
    assert full["warm_start"] == full_ws
    text = " ".join(result.output.split())
    assert f"{full_ws['loaded']} tensors loaded, 0 skipped (shape differs), {full_ws['new']} new" in text

    table = load_results("three", storage=str(storage))  # the report's table, from Python
    assert list(table["stage"]) == ["quick", "quick", "medium", "full"]
    assert table.loc[table["chosen"], "trial"].tolist() == ["trial_001", "trial_000", "trial_000"]
    assert table["best_val_accuracy"].notna().all() and list(table["steps"]) == [24, 24, 12, 12]


@pytest.mark.ray
def test_a_missed_gate_stops_the_ladder_with_advice(tmp_path, tiny_data):
    stages = {"quick": {"max_steps": 2}, "medium": {"width": 8}}
    ladder = {"metric": "val_accuracy", "quick": {"gate": {"above": 1.5, "advice": "quick does not converge: fix lr first"}}}
    experiment = write_experiment(tmp_path, tiny_data, stages, ladder=ladder)
    result = runner.invoke(app, ladder_args(experiment, tmp_path / "runs", "gated"))
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "ladder stopped: quick did not reach val_accuracy above 1.5" in text
    assert text.rstrip().endswith("quick does not converge: fix lr first.")
    state = json.loads((tmp_path / "runs" / "gated" / "ladder.json").read_text())
    assert state["status"] == "stopped" and state["stages"]["quick"]["status"] == "gate_failed"
    assert "medium" not in state["stages"]


def raylab_command() -> list[str]:
    exe = shutil.which("raylab")
    return [exe] if exe else [sys.executable, "-m", "raylab.cli"]


def wait_until(condition, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the ladder ended (rc {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the kill point was never reached")
        time.sleep(0.05)


@pytest.mark.ray
def test_killed_driver_continues_without_repeating_the_finished_stage(tmp_path, tiny_data):
    # medium: 10 epochs of 12 steps, so the kill after its first checkpoint (step 12) lands with 108
    # steps and 9 reports still to go -- seconds of work on any machine, polled every 0.05 s.
    stages = {"quick": {}, "medium": {"width": 8, "max_epochs": 10}}
    experiment = write_experiment(tmp_path, tiny_data, stages, ladder={"metric": "val_loss"})
    storage = tmp_path / "runs"
    folder = storage / "killed"
    command = [*raylab_command(), *ladder_args(experiment, storage, "killed")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform") + os.pathsep + str(REPO)}
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def medium_checkpointed() -> bool:
        try:
            state = json.loads((folder / "ladder.json").read_text())
        except (OSError, ValueError):
            return False
        trial = folder / "medium" / "trial_000"
        # a checkpoint folder appears (Ray's upload) before the report writes metrics.parquet: wait for both
        return state["stages"].get("quick", {}).get("status") == "done" and any(trial.glob("checkpoint_*")) \
            and (trial / "metrics.parquet").is_file()

    try:
        wait_until(medium_checkpointed, 400, first)
    finally:
        os.kill(first.pid, signal.SIGKILL)  # the driver only, by its pid
        first.wait()
        log.close()
    quick_metrics = (folder / "quick" / "trial_000" / "metrics.parquet").read_bytes()
    steps_at_kill = pd.read_parquet(folder / "medium" / "trial_000" / "metrics.parquet")["step"].max()
    assert steps_at_kill < 120  # killed mid-stage

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stdout + second.stderr
    text = " ".join((second.stdout + second.stderr).split())
    assert "quick: done earlier" in text
    assert (folder / "quick" / "trial_000" / "metrics.parquet").read_bytes() == quick_metrics  # quick never reran
    medium = pd.read_parquet(folder / "medium" / "trial_000" / "metrics.parquet")
    assert medium["step"].max() == 120 and medium["step"].is_monotonic_increasing  # resumed, whole curve kept
    trial = json.loads((folder / "medium" / "trial_000" / "trial.json").read_text())
    assert trial["attempts"] == 2  # the same trial folder, continued (not a new trial)
    state = json.loads((folder / "ladder.json").read_text())
    assert state["status"] == "finished" and state["stages"]["medium"]["status"] == "done"
    assert not list(folder.glob("medium-*"))  # no new attempt: the settings did not change


@pytest.mark.parametrize(
    ("losses", "advice"),
    [
        ([2.0, 2.0, 1.99, 2.01], "the loss is flat: raise lr or shrink the model"),
        ([2.0, 1.2, 3.5, 2.8], "the loss rises or oscillates: lower lr or raise the batch size"),
        ([2.0, 1.6, 1.3, 1.1], "the loss is still falling: train longer"),
        ([2.0, 1.0, float("inf")], "the loss rises or oscillates"),
    ],
)
def test_gate_advice_reads_the_loss_curve(losses, advice):
    from raylab.ladder import diagnose

    assert diagnose(pd.DataFrame({"train_loss": losses})).startswith(advice)
