"""Sweeps (`raylab sweep`): the search-space grammar and YAML `search:` sections are checked
before Ray starts; ASHA stops a bad trial early and its workers are freed; Optuna search
with a batch-size dimension follows the explicit lr rule; every trial keeps a run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from raylab.cli import app
from raylab.config import ConfigError
from raylab.search_space import parse_space_option, scaled_lr, trial_config
from raylab.task import get_task

runner = CliRunner()


def write_experiment(folder: Path, data_dir: Path, **sections) -> Path:
    """A tiny TinyImageNet experiment file: 96 training images, batch 8 -> 12 steps per epoch."""
    defaults = {"data_dir": str(data_dir), "family": "baseline", "width": 4, "image_size": 16, "per_worker_batch_size": 8,
                "log_every_steps": 2, "num_samples": 0, "eval_batch_size": 32, "lr": 2e-3, "max_epochs": 1}
    body = {"model": "tinyimagenet", "defaults": defaults, "stages": {"quick": {}}, **sections}
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def sweep_args(experiment: Path, storage: Path, *extra: str) -> list[str]:
    return ["sweep", "tinyimagenet", "--experiment", str(experiment), "--storage", str(storage), *extra]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if anything starts Ray: these mistakes must be caught before."""
    import raylab.ray_backend

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(raylab.ray_backend, "ensure_ray", refuse)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("lr=logunifrm(1e-5,1e-2)", "unknown distribution 'logunifrm' (did you mean loguniform?)"),
        ("lrr=loguniform(1e-5,1e-2)", "'lrr' is not a field of TinyImageNetConfig (did you mean lr?)"),
        ("lr=loguniform(0,1e-2)", "loguniform() needs bounds above 0, got 0"),
        ("lr=uniform(1e-2,1e-5)", "uniform() needs low < high"),
        ("lr=uniform(1e-5)", "uniform() takes two bounds (low, high), got 1"),
        ("lr=uniform(a,1)", "'a' is not a number"),
        ("width=randint(2,4.5)", "4.5 is not an integer"),
        ("width=uniform(4,8)", "field 'width' input should be a valid integer"),
        ("per_worker_batch_size=choice(0,8)", "field 'per_worker_batch_size' input should be greater than 0 (got 0)"),
        ("family=choice(residual,vgg)", "field 'family' input should be 'baseline', 'residual', 'deeper_wider' or 'se' (got 'vgg')"),
        ("family=choice(se,se)", "choice() lists a value twice"),
        ("lr", "is not of the form field=distribution(...)"),
        ("lr=0.1", "'0.1' is not a distribution"),
        ("init_from=choice(a,b)", "'init_from' cannot be searched"),
    ],
)
def test_bad_space_strings_exit_2_before_ray_starts(tmp_path, tiny_data, no_ray, space, message):
    experiment = write_experiment(tmp_path, tiny_data)
    result = runner.invoke(app, sweep_args(experiment, tmp_path / "runs", "--space", space))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text and f"--space '{space}'" in text
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("search", "extra", "message"),
    [
        ({"quick": {"space": {"lr": "logunif(1e-5, 1e-2)"}}}, [], "search.quick.space.lr: unknown distribution 'logunif'"),
        ({"quick": {"space": {"depth": "choice(1, 2)"}}}, [], "'depth' is not a field of TinyImageNetConfig"),
        ({"quick": {"samples": 0}}, [], "field 'samples' input should be greater than 0"),
        ({"quick": {"scheduler": "pbt"}}, [], "field 'scheduler' input should be 'asha', 'hyperband', 'median' or 'fifo'"),
        ({"quick": {"sampels": 4}}, [], "unknown field 'sampels'"),
        ({"huge": {"samples": 2}}, [], "search.huge names no stage of the file"),
        ({"quick": {"space": {"lr": "grid(1e-3, 1e-2)"}, "search": "optuna"}}, [], "grid() dimensions need --search random"),
        ({"quick": {"space": {"lr": "uniform(1e-3, 1e-2)"}, "scheduler": "hyperband"}}, [], "hyperband needs the stage's budget in steps"),
        ({"quick": {"space": {"lr": "uniform(1e-3, 1e-2)"}}}, ["--workers", "0"], "use --workers 1 or more"),
        ({"quick": {"space": {"lr": "uniform(1e-3, 1e-2)"}}}, ["--mode", "up"], "field 'mode' input should be 'min' or 'max'"),
    ],
)
def test_bad_yaml_search_sections_exit_2_before_ray_starts(tmp_path, tiny_data, no_ray, search, extra, message):
    experiment = write_experiment(tmp_path, tiny_data, search=search)
    result = runner.invoke(app, sweep_args(experiment, tmp_path / "runs", *extra))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


def test_lr_scaling_rule_is_explicit(tiny):
    base = get_task("tinyimagenet").config_cls.model_validate(tiny(lr=1e-3, per_worker_batch_size=8))
    assert trial_config(base, {"per_worker_batch_size": 32}, "none").lr == pytest.approx(1e-3)
    assert trial_config(base, {"per_worker_batch_size": 32}, "linear").lr == pytest.approx(4e-3)
    assert trial_config(base, {"per_worker_batch_size": 32}, "sqrt").lr == pytest.approx(2e-3)
    assert trial_config(base, {"per_worker_batch_size": 4, "lr": 2e-3}, "linear").lr == pytest.approx(1e-3)
    assert scaled_lr(1.0, 8, 8, "linear") == 1.0
    with pytest.raises(ConfigError, match="per_worker_batch_size"):
        trial_config(base, {"per_worker_batch_size": -1}, "none")


def test_grammar_reads_numbers_words_and_inclusive_integer_ranges():
    assert parse_space_option("lr=loguniform(1e-5, 1e-2)").args == (1e-5, 1e-2)
    assert parse_space_option("family=grid(residual, se)").args == ("residual", "se")
    assert parse_space_option("augment=choice(true,false)").args == (True, False)
    dim = parse_space_option("width=randint(4,16)")
    assert dim.kind == "randint" and dim.candidates() == [4, 16]


def wait_for_free_cpus(timeout_s: float = 60.0) -> tuple[float, float]:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
        if free >= total or time.monotonic() > deadline:
            return free, total
        time.sleep(1)


@pytest.mark.ray
@pytest.mark.parametrize(("scheduler", "grace"), [("asha", 6), ("hyperband", 3), ("median", 3)])
def test_a_scheduler_stops_a_bad_trial_early_and_the_sweep_finishes(tmp_path, tiny_data, scheduler, grace):
    # Two learning rates, each twice: at the first rung the tiny lr's val_loss is the worse one,
    # so ASHA (keep 1 in 2), asynchronous HyperBand (2 brackets: rungs from step 3 and from
    # step 6) and the median rule (worse than the median of the others) stop one of its trials.
    evals = 6 if scheduler == "asha" else 3
    experiment = write_experiment(tmp_path, tiny_data, stages={"quick": {"max_steps": 12, "eval_every_steps": evals}})
    storage = tmp_path / "runs"
    result = runner.invoke(app, sweep_args(experiment, storage, "--space", "lr=grid(1e-7,3e-3)", "--samples", "2",
                                           "--scheduler", scheduler, "--grace-steps", str(grace), "--reduction-factor", "2",
                                           "--metric", "val_loss", "--name", "asha"))
    assert result.exit_code == 0, result.output
    record = json.loads((storage / "asha" / "sweep.json").read_text())
    assert record["fingerprint"]["search"]["scheduler"] == scheduler
    trials = record["trials"]
    assert sorted(trials) == ["trial_000", "trial_001", "trial_002", "trial_003"]
    assert all(t["status"] == "TERMINATED" for t in trials.values()), trials
    stopped = [name for name, t in trials.items() if t["stopped_early"]]
    assert stopped, trials
    for name in stopped:
        assert trials[name]["params"]["lr"] == 1e-7 and trials[name]["step"] < 12
    assert record["best"]["params"]["lr"] == 3e-3 and record["status"] == "finished"
    for name in trials:  # every trial keeps raylab's run folder
        folder = storage / "asha" / name
        assert (folder / "metrics.parquet").is_file() and (folder / "trial.json").is_file() and (folder / "tensorboard").is_dir()
        # the epoch ends at step 12: finished trials checkpointed there (a stopped one may too:
        # its workers can take a few more steps while Tune tears it down)
        assert name in stopped or (folder / "checkpoint_epoch0001_batch000000_step00000012").is_dir()
    assert "stopped early" in result.output and "best val_loss" in result.output
    free, total = wait_for_free_cpus()
    assert free == total  # the stopped trials' workers were released


@pytest.mark.ray
def test_optuna_sweep_with_a_batch_dimension_scales_lr_linearly(tmp_path, tiny_data):
    experiment = write_experiment(tmp_path, tiny_data, stages={"quick": {"max_steps": 4, "eval_every_steps": 4}})
    storage = tmp_path / "runs"
    result = runner.invoke(app, sweep_args(experiment, storage, "--space", "lr=loguniform(1e-4,1e-2)",
                                           "--space", "per_worker_batch_size=choice(4,8)", "--lr-scaling", "linear",
                                           "--search", "optuna", "--scheduler", "fifo", "--samples", "2", "--name", "opt"))
    assert result.exit_code == 0, result.output
    record = json.loads((storage / "opt" / "sweep.json").read_text())
    assert record["fingerprint"]["search"]["search"] == "optuna" and len(record["trials"]) == 2
    lrs = set()
    for name, trial in record["trials"].items():
        assert trial["status"] == "TERMINATED" and not trial["stopped_early"]
        saved = json.loads((storage / "opt" / name / "trial.json").read_text())
        params, config = saved["params"], saved["config"]
        assert 1e-4 <= params["lr"] <= 1e-2 and params["per_worker_batch_size"] in (4, 8)
        # the sampled lr is meant for the stage's batch (8); the trial's batch scales it
        assert config["lr"] == pytest.approx(params["lr"] * params["per_worker_batch_size"] / 8)
        assert config["per_worker_batch_size"] == params["per_worker_batch_size"]
        lrs.add(params["lr"])
    assert len(lrs) == 2
    assert "lr scaling linear (relative to global batch 8)" in " ".join(result.output.split())


@pytest.mark.ray
def test_a_fifo_sweep_reuses_a_finished_trials_actor_and_its_trials_train_alike(tmp_path, tiny_data):
    # 3 identical trials, 2 at once: the third runs in the actor of one that finished
    # (Tune's reuse_actors, on for fifo) and must train exactly as the fresh ones did.
    experiment = write_experiment(tmp_path, tiny_data, stages={"quick": {"max_steps": 6, "eval_every_steps": 6}})
    storage = tmp_path / "runs"
    result = runner.invoke(app, sweep_args(experiment, storage, "--space", "lr=grid(0.002)", "--samples", "3",
                                           "--scheduler", "fifo", "--max-concurrent", "2", "--name", "reuse"))
    assert result.exit_code == 0, result.output
    folders = sorted(p for p in (storage / "reuse").glob("trial_*") if p.is_dir())
    assert len(folders) == 3
    actors = [json.loads((f / "trial.json").read_text())["actor"]["pid"] for f in folders]
    assert len(set(actors)) == 2, actors  # one actor ran two trials
    weights = {(next(f.glob("checkpoint_*_step00000006")) / "model.safetensors").read_bytes() for f in folders}
    assert len(weights) == 1  # bit-identical, whichever actor ran the trial


def test_same_name_with_other_settings_is_refused(tmp_path, tiny_data):
    import pyarrow.fs as pafs

    from raylab.config import LaunchConfig
    from raylab.sweep import SweepRecord, plan_sweep

    experiment = write_experiment(tmp_path, tiny_data)
    launch = LaunchConfig(storage_path=str(tmp_path / "runs"), name="same")
    first = plan_sweep("tinyimagenet", "quick", {"samples": 2}, launch, experiment=experiment, space_options=["lr=loguniform(1e-4,1e-2)"])
    SweepRecord(pafs.LocalFileSystem(), str(tmp_path / "runs" / "same"), first).open()
    again = plan_sweep("tinyimagenet", "quick", {"samples": 2}, launch, experiment=experiment, space_options=["lr=loguniform(1e-4,1e-2)"])
    SweepRecord(pafs.LocalFileSystem(), str(tmp_path / "runs" / "same"), again).open()  # the same sweep: continues
    other = plan_sweep("tinyimagenet", "quick", {"samples": 2}, launch, experiment=experiment, space_options=["lr=loguniform(1e-3,1e-2)"])
    with pytest.raises(ConfigError, match=r"was started with other settings \(space .*1e-3|0\.001.*choose a new --name"):
        SweepRecord(pafs.LocalFileSystem(), str(tmp_path / "runs" / "same"), other).open()


def test_missing_metric_is_told_by_a_report_of_its_kind():
    from raylab.config import missing_metric

    evaluation = {"step": 3, "train_loss": 1.0, "val_loss": 1.2, "val_accuracy": 0.5}
    message = missing_metric("val_acuracy", evaluation)
    assert message and "'val_acuracy' is not among the val_ metrics this run reports (val_accuracy, val_loss)" in message
    assert "(did you mean val_accuracy?)" in message
    assert missing_metric("val_accuracy", evaluation) is None
    assert missing_metric("val_accuracy", {"step": 2, "train_loss": 1.0}) is None  # not an evaluation: cannot tell yet
    assert missing_metric("sample_label_accuracy", evaluation) is None  # sampling rounds come on their own cadence
    assert missing_metric("vall_loss", evaluation) is None  # no known kind: judged when the trial ends


@pytest.mark.ray
def test_a_misspelt_metric_stops_the_trial_at_its_first_evaluation(tmp_path, tiny_data):
    experiment = write_experiment(tmp_path, tiny_data, stages={"quick": {"max_steps": 12, "eval_every_steps": 3}})
    storage = tmp_path / "runs"
    result = runner.invoke(app, sweep_args(experiment, storage, "--metric", "val_acuracy", "--name", "typo"))
    assert result.exit_code == 1, result.output
    assert "(did you mean val_accuracy?)" in " ".join(result.output.split())
    trial = json.loads((storage / "typo" / "trial_000" / "trial.json").read_text())
    assert "ConfigError: the sweep's metric 'val_acuracy' is not among the val_ metrics" in trial["error"]
    # stopped at the report of the first evaluation (step 3), not after the whole budget: its row
    # (stored before the report) is the only one
    assert pd.read_parquet(storage / "typo" / "trial_000" / "metrics.parquet")["step"].tolist() == [3]
    assert not list((storage / "typo" / "trial_000").glob("checkpoint_*"))
