"""`raylab report` and `raylab.report.load_results`: one table of every trial (config,
final and best metrics, steps, times, checkpoint paths) written as Parquet and CSV,
learning curves and, for a sweep, the metric against each searched field as PNGs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from raylab.cli import app
from raylab.config import LaunchConfig
from raylab.launch import train
from raylab.report import best_checkpoint, load_results, wall_seconds

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def test_single_run_report_from_the_cli(tmp_path, tiny):
    train("tinyimagenet", "quick", tiny(max_epochs=2), LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="one"))
    result = runner.invoke(app, ["report", "one", "--storage", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "one" / "results.parquet")
    assert len(table) == 1 and table.loc[0, "kind"] == "run" and table.loc[0, "steps"] == 24
    assert table.loc[0, "metric"] == "val_loss" and table.loc[0, "best"] == pytest.approx(table.loc[0, "best_val_loss"])
    assert table.loc[0, "best_checkpoint"].startswith(str(tmp_path / "one" / "checkpoint_"))
    assert json.loads(table.loc[0, "config"])["width"] == 4
    csv = pd.read_csv(tmp_path / "one" / "results.csv")
    assert list(csv.columns) == list(table.columns)
    assert (tmp_path / "one" / "learning_curves.png").read_bytes().startswith(PNG)
    assert "wrote" in result.output and "results.parquet" in result.output


def test_report_of_nothing_is_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["report", "empty", "--storage", str(tmp_path)])
    assert result.exit_code == 2
    assert "holds no ladder.json, sweep.json, metrics.parquet or checkpoint: nothing to report" in " ".join(result.output.split())
    result = runner.invoke(app, ["report", "missing", "--storage", str(tmp_path)])
    assert result.exit_code == 2 and "is not a ladder, sweep or run folder" in " ".join(result.output.split())


def test_best_checkpoint_follows_the_metric_and_wall_time_spans_resumes(tmp_path, tiny):
    run = train("tinyimagenet", "quick", tiny(max_epochs=3, keep_checkpoints=None),
                LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="three"))
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    record, by_metric = best_checkpoint(fs, run.run_path, "val_loss", "min")
    best_row = run.metrics.loc[run.metrics["val_loss"].idxmin()]
    assert by_metric and record.position[0] == int(best_row["step"])
    record, by_metric = best_checkpoint(fs, run.run_path, "no_such_metric", "max")
    assert not by_metric and record.name.endswith("step00000036")  # the newest valid one
    assert wall_seconds(pd.DataFrame({"time_s": [1.0, 2.0, 0.5, 1.5]})) == pytest.approx(3.5)  # two attempts


@pytest.mark.ray
def test_sweep_report_writes_parquet_csv_and_plots(tmp_path, tiny_data):
    defaults = {"data_dir": str(tiny_data), "family": "baseline", "width": 4, "image_size": 16, "per_worker_batch_size": 8,
                "log_every_steps": 2, "num_samples": 0, "eval_batch_size": 32, "max_steps": 6, "eval_every_steps": 3}
    search = {"quick": {"space": {"lr": "grid(1e-4, 3e-3)"}, "samples": 1, "scheduler": "fifo", "metric": "val_loss"}}
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({"model": "tinyimagenet", "defaults": defaults, "stages": {"quick": {}}, "search": search}))
    storage = tmp_path / "runs"
    swept = runner.invoke(app, ["sweep", "tinyimagenet", "--experiment", str(experiment), "--storage", str(storage), "--name", "rep"])
    assert swept.exit_code == 0, swept.output

    result = runner.invoke(app, ["report", str(storage / "rep")])
    assert result.exit_code == 0, result.output
    folder = storage / "rep"
    table = pd.read_parquet(folder / "results.parquet")
    assert list(table["trial"]) == ["trial_000", "trial_001"] and set(table["state"]) == {"finished"}
    assert sorted(table["lr"]) == [1e-4, 3e-3]
    for column in ("best", "final", "best_val_loss", "final_val_loss", "final_val_accuracy", "steps", "wall_s", "train_s",
                   "best_checkpoint", "run", "config"):
        assert table[column].notna().all(), column
    assert (table["steps"] == 6).all() and (table["wall_s"] >= table["train_s"]).all()
    assert table.equals(load_results(str(folder)))  # the same from Python
    for png in ("learning_curves.png", "search_space.png"):
        assert (folder / png).read_bytes().startswith(PNG), png
    assert (folder / "results.csv").read_text().splitlines()[0].split(",")[:4] == list(table.columns[:4])
