"""GMAN through raylab's TensorFlow loop, in-process (`--workers 0`): checkpoint files,
determinism, exact mid-epoch resume, early stopping, and the quick stage beating the baselines.
TensorFlow traces every run's step anew, so runs are shared between tests where they can be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from models.gman.recipe import evaluations_since_best
from raylab.checkpoint import read_checkpoint_state
from raylab.config import LaunchConfig
from raylab.launch import RunSummary, train


def run_local(storage: Path, name: str, overrides: dict, stage: str = "quick") -> RunSummary:
    return train("gman", stage, overrides, LaunchConfig(num_workers=0, storage_path=str(storage), name=name))


def tensors(checkpoint: str | Path) -> dict[str, np.ndarray]:
    """Every variable a checkpoint holds: the model's and the optimizer's, by path."""
    folder = Path(checkpoint)
    return {**safetensors.numpy.load_file(str(folder / "model.safetensors")),
            **safetensors.numpy.load_file(str(folder / "optimizer.safetensors"))}


def assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gman-runs")


@pytest.fixture(scope="module")
def whole(storage, traffic_files) -> RunSummary:
    """12 steps of a tiny GMAN with output dropout, seed 2, uninterrupted."""
    return run_local(storage, "whole", tiny_overrides(traffic_files, seed=2))


def tiny_overrides(traffic_files, **extra) -> dict:
    h5, se = traffic_files
    return {"data_path": str(h5), "se_path": str(se), "L": 1, "K": 2, "d": 2, "per_worker_batch_size": 8, "output_dropout": 0.1,
            "max_epochs": 1, "max_steps": 12, "log_every_steps": 4, "num_samples": 1, **extra}


def test_checkpoint_is_plain_tensors_by_path_and_state_json(whole):
    folder = Path(whole.latest_checkpoint)
    state = read_checkpoint_state(folder)  # checksums verified
    assert state["framework"] == "tensorflow" and state["position"]["global_step"] == 12
    assert set(state["files"]) == {"model.safetensors", "optimizer.safetensors", "evaluations.json"}
    saved = tensors(folder)
    assert saved["adam/iteration"].shape == () and int(saved["adam/iteration"]) == 12  # the LR schedule resumes from it
    assert saved["gman/input_mean"].shape == () and saved["gman/spatial_embedding"].shape == (6, 64)
    assert "gman/encoder_0/spatial/query/dense_0/kernel" in saved
    assert any(k.startswith("adam/gman_encoder_0_spatial_query_dense_0_kernel") for k in saved)
    seeds = state["rng"][0]["seed_generators"]
    assert set(seeds) == {"gman/output/dropout_0/seed/seed_generator_state", "gman/output/dropout_1/seed/seed_generator_state"}
    tf_settings = state["task_metadata"]["tensorflow"]
    assert tf_settings["onednn"] == "0" and tf_settings["intra_op_threads"] >= 1
    assert "node2vec file" in state["task_metadata"]["spatial_embedding"]
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pt"))


def test_run_folder_has_metrics_baselines_and_forecast_samples(whole):
    final = whole.final
    for key in ("val_mae", "val_mae_h3", "val_rmse_h6", "val_mape_h12", "val_last_value_mae_h12", "val_historical_average_mae_h12"):
        assert np.isfinite(final[key]), key
    assert final["lr"] == pytest.approx(2e-3)
    samples = sorted((Path(whole.run_path) / "samples").glob("step_*.json"))
    assert [p.stem for p in samples] == ["step_00000000", "step_00000012"]
    forecast = json.loads(samples[-1].read_text())["samples"][0]
    assert len(forecast["history"]) == len(forecast["forecast"]) == len(forecast["actual"]) == 12
    assert samples[-1].with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (Path(whole.run_path) / "metrics.parquet").is_file() and (Path(whole.run_path) / "curves.png").is_file()


def test_same_seed_same_weights(storage, traffic_files, whole):
    again = run_local(storage, "again", tiny_overrides(traffic_files, seed=2))
    assert_identical(tensors(whole.latest_checkpoint), tensors(again.latest_checkpoint))


def test_mid_epoch_resume_is_bit_identical(storage, traffic_files, whole):
    first = run_local(storage, "split", tiny_overrides(traffic_files, seed=2, max_steps=5))
    assert read_checkpoint_state(first.latest_checkpoint)["position"] == {"epoch": 0, "batch_in_epoch": 5, "global_step": 5}
    resumed = run_local(storage, "split", tiny_overrides(traffic_files, seed=2))  # same name: resumes at step 5, mid-epoch
    assert read_checkpoint_state(resumed.latest_checkpoint)["position"]["global_step"] == 12
    assert_identical(tensors(whole.latest_checkpoint), tensors(resumed.latest_checkpoint))


def test_gradient_accumulation_steps_once_per_accumulated_batch(storage, traffic_files):
    summary = run_local(storage, "accum", tiny_overrides(traffic_files, grad_accum_steps=2, max_steps=3, num_samples=0))
    state = read_checkpoint_state(summary.latest_checkpoint)
    assert state["position"] == {"epoch": 0, "batch_in_epoch": 6, "global_step": 3}
    assert int(tensors(summary.latest_checkpoint)["adam/iteration"]) == 3
    assert np.isfinite(summary.final["train_loss"])


def test_early_stopping_ends_the_run_at_the_first_epoch_without_improvement(storage, traffic_files):
    # 5 steps an epoch and an lr that cannot move a weight: only BatchNorm's moving statistics
    # change, so the validation MAE drifts both ways and, with patience 1, the run must stop
    # at the first epoch whose MAE is above the best so far -- long before max_epochs.
    overrides = tiny_overrides(traffic_files, per_worker_batch_size=256, max_steps=None, max_epochs=6, lr=1e-30, min_lr=0.0,
                               patience=1, num_samples=0)
    summary = run_local(storage, "early", overrides)
    history = [h["mae"] for h in json.loads((Path(summary.latest_checkpoint) / "evaluations.json").read_text())]
    assert len(history) < 6 and summary.final["epoch"] == len(history)
    assert evaluations_since_best(history) == 1
    assert all(evaluations_since_best(history[:i]) == 0 for i in range(1, len(history)))
    again = run_local(storage, "early", overrides)  # the stopped run stays stopped
    assert again.final["step"] == summary.final["step"]


def test_quick_stage_beats_last_value_and_historical_average_at_horizon_12(storage):
    summary = run_local(storage, "quick", {"num_samples": 0})
    best = summary.metrics.loc[summary.metrics["val_mae_h12"].idxmin()]
    print({k: round(float(best[k]), 3) for k in best.index if k.startswith("val_") and ("h12" in k or k == "val_mae")})
    assert best["val_mae_h12"] < best["val_last_value_mae_h12"]
    assert best["val_mae_h12"] < best["val_historical_average_mae_h12"]


def test_raylab_sample_rebuilds_a_tensorflow_checkpoint_and_forecasts(whole, tmp_path):
    from raylab.sampling import sample_checkpoint

    result = sample_checkpoint(whole.latest_checkpoint, n=3, out=tmp_path / "forecasts.json")
    payload = json.loads((tmp_path / "forecasts.json").read_text())
    assert payload["model"] == "gman" and payload["weights"] == "model.safetensors" and payload["step"] == 12
    assert len(payload["samples"]) == 3 and result.png_path is not None and result.png_path.is_file()
    first = payload["samples"][0]
    assert len(first["forecast"]) == len(first["actual"]) == 12 and all(np.isfinite(first["forecast"]))
    # The stored weights, not a fresh initialisation: the same window's forecast as the run's last sampling round.
    last_round = json.loads(sorted((Path(whole.latest_checkpoint).parent / "samples").glob("step_*.json"))[-1].read_text())
    assert last_round["samples"][0]["forecast"] == first["forecast"]


def test_ema_is_what_evaluation_sees_saved_and_resumed_bit_identically(storage, traffic_files, whole, tmp_path):
    from raylab.sampling import sample_checkpoint

    ema = run_local(storage, "ema", tiny_overrides(traffic_files, seed=2, ema_decay=0.8))
    live, averaged = tensors(ema.latest_checkpoint), safetensors.numpy.load_file(str(Path(ema.latest_checkpoint) / "ema.safetensors"))
    # EMA never changes training: the live weights are those of the same run without it ...
    assert_identical(tensors(whole.latest_checkpoint), live)
    # ... but the shadow differs from them, and evaluation scored the shadow.
    kernels = [k for k in averaged if k.endswith("kernel")]
    assert kernels and any(not np.array_equal(averaged[k], live[k]) for k in kernels)
    assert not any(k.endswith("seed_generator_state") for k in averaged)
    assert ema.final["val_mae"] != whole.final["val_mae"]
    split = run_local(storage, "ema-split", tiny_overrides(traffic_files, seed=2, ema_decay=0.8, max_steps=5))
    resumed = run_local(storage, "ema-split", tiny_overrides(traffic_files, seed=2, ema_decay=0.8))
    assert read_checkpoint_state(split.latest_checkpoint)["position"]["global_step"] == 5
    assert_identical(averaged, safetensors.numpy.load_file(str(Path(resumed.latest_checkpoint) / "ema.safetensors")))
    assert sample_checkpoint(ema.latest_checkpoint, n=1).payload["weights"] == "ema.safetensors"
