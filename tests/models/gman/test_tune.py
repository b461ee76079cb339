"""GMAN, a TensorFlow model, through Ray Tune: a 2-stage ladder ranked by val_mae whose
second stage adds a block and warm-starts from the first by Keras variable path and shape,
keeping its own data constants; then `raylab report` on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raylab.cli import app
from raylab.report import load_results

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[3]


def test_ladder_warm_starts_a_deeper_gman_by_variable_path(tmp_path, traffic_files):
    h5, se = traffic_files
    experiment = yaml.safe_load((REPO / "experiments" / "gman.yaml").read_text())
    small = {"data_path": str(h5), "se_path": str(se), "K": 2, "d": 2, "per_worker_batch_size": 8, "max_epochs": 1,
             "max_steps": 8, "eval_every_steps": 4, "log_every_steps": 4, "num_samples": 1, "xla": False,
             "checkpoint_every_batches": 0}
    experiment["stages"] = {"quick": {**small, "L": 1}, "medium": {**small, "L": 2}}  # the repository's ladder section, tiny stages
    experiment.pop("search")
    experiment["ladder"].pop("quick")  # its gate is for the real quick stage: 8 steps do not beat the baselines
    path = tmp_path / "gman.yaml"
    path.write_text(yaml.safe_dump(experiment))
    storage = tmp_path / "runs"
    result = CliRunner().invoke(app, ["ladder", "gman", "--experiment", str(path), "--storage", str(storage), "--name", "g"])
    assert result.exit_code == 0, result.output
    state = json.loads((storage / "g" / "ladder.json").read_text())
    assert state["metric"] == "val_mae" and state["mode"] == "min" and state["status"] == "finished"
    medium = state["stages"]["medium"]
    assert medium["init_from"] == state["stages"]["quick"]["best_checkpoint"]
    report = json.loads((storage / "g" / "medium" / "trial_000" / "warm_start.json").read_text())
    counts = report["counts"]
    # Block 0, the embeddings, transform attention and output match by path; block 1 is new.
    assert counts["loaded"] > 0 and counts["new"] > 0 and counts["skipped_shape"] == 0 and counts["unused"] == 0
    assert any("/block_1/" in name or "_1/" in name for name in report["new"]), report["new"][:5]
    assert {name.rsplit("/", 1)[-1] for name in report["kept"]} >= {"spatial_embedding", "input_mean", "input_std"}
    assert not [n for n in report["loaded"] if n.endswith(("input_mean", "input_std", "spatial_embedding", "seed_generator_state"))]
    table = load_results("g", storage=str(storage))
    assert list(table["stage"]) == ["quick", "medium"] and table["best_val_mae"].notna().all()
