"""The command line: config errors exit 2 with one sentence before Ray starts;
`raylab models` shows the registered models and their real sizes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from raylab.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("lr=-1", "field 'lr' input should be greater than 0 (got -1)"),
        ("lr=0", "field 'lr' input should be greater than 0 (got 0)"),
        ("per_worker_batch_size=0", "field 'per_worker_batch_size' input should be greater than 0"),
        ("family=vgg", "field 'family' input should be 'baseline', 'residual', 'deeper_wider' or 'se' (got 'vgg')"),
        ("famly=se", "unknown field 'famly'"),
        ("checkpoint_every_batches=3", "must be a multiple of grad_accum_steps"),
    ],
)
def test_bad_values_exit_2_naming_the_field(tmp_path, setting, message):
    extra = ["--set", "grad_accum_steps=2"] if "checkpoint_every" in setting else []
    result = runner.invoke(app, ["train", "tinyimagenet", "--storage", str(tmp_path), "--set", setting, *extra])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "tinyimagenet.yaml stage 'quick'" in result.output
    assert not list(tmp_path.iterdir())  # nothing written: it failed before any run started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage", "huge"], "has no stage 'huge'"),
        (["--set", "lr"], "is not of the form key=value"),
        (["--name", "../escape"], "run name '../escape' must be"),
        (["--experiment", "nowhere.yaml"], "experiment file nowhere.yaml does not exist"),
        (["--workers", "-1"], "option --workers input should be greater than or equal to 0 (got -1)"),
        (["--cpus-per-worker", "0"], "option --cpus-per-worker input should be greater than 0 (got 0.0)"),
        (["--max-failures", "-5"], "option --max-failures input should be greater than or equal to -1 (got -5)"),
    ],
)
def test_bad_options_exit_2_in_one_sentence(tmp_path, args, message):
    result = runner.invoke(app, ["train", "tinyimagenet", "--storage", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "pydantic" not in result.output
    assert not list(tmp_path.iterdir())


def test_unknown_model_exit_2(tmp_path):
    result = runner.invoke(app, ["train", "imagenet22k", "--storage", str(tmp_path)])
    assert result.exit_code == 2
    from raylab.task import TASKS

    assert f"unknown model 'imagenet22k'; registered models: {', '.join(sorted(TASKS))}" in result.output


def test_console_script_reports_config_error_without_starting_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raylab.cli", "train", "tinyimagenet", "--set", "lr=-0.5", "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "field 'lr'" in proc.stderr and "Traceback" not in proc.stderr
    assert "ray" not in proc.stdout.lower()


def test_models_lists_stages_and_parameter_counts():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for stage in ("quick", "medium", "full"):
        assert stage in result.output
    assert "11,271,432" in result.output  # ResNet-18 at 200 classes, the published size
    wide = runner.invoke(app, ["models"], env={"COLUMNS": "250"})
    rows = [line for line in wide.output.splitlines() if "dit_tokens.yaml" in line]
    assert any("full" in row and "32,725,648" in row for row in rows), rows  # the seed's DiT-S on 8-feature tokens


def test_unwritable_storage_exit_2_before_any_worker_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["train", "tinyimagenet", "--workers", "0", "--storage", str(blocker / "runs")])
    assert result.exit_code == 2, result.output
    assert "is not writable" in " ".join(result.output.split()) and "a-file" in result.output
