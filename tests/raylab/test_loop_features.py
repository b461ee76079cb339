"""Loop features every model gets: EMA weights, sampling rounds with metrics and
pictures, the sampling cadence, and the task's headline metrics on the display."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch
import torch
from PIL import Image

from raylab.checkpoint import read_checkpoint_state
from raylab.config import LaunchConfig
from raylab.launch import train
from raylab.session import LocalSession
from raylab.task import SampleOutput, get_task
from raylab.torch_loop import train_torch


def run_local(tmp_path: Path, name: str, overrides: dict):
    return train("tinyimagenet", "quick", overrides, LaunchConfig(num_workers=0, storage_path=str(tmp_path), name=name))


def tensors(checkpoint: str | Path, file: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(checkpoint) / file))


def test_ema_is_saved_differs_from_live_weights_and_resumes_bit_identically(tmp_path, tiny):
    cfg = tiny(seed=3, ema_decay=0.9, checkpoint_every_batches=4)
    whole = run_local(tmp_path, "whole", cfg)
    first = run_local(tmp_path, "split", {**cfg, "max_steps": 7})  # stops mid-epoch (12 batches an epoch)
    assert read_checkpoint_state(first.latest_checkpoint)["position"]["batch_in_epoch"] == 7
    resumed = run_local(tmp_path, "split", cfg)
    ema_whole, ema_resumed = tensors(whole.latest_checkpoint, "ema.safetensors"), tensors(resumed.latest_checkpoint, "ema.safetensors")
    assert ema_whole.keys() == ema_resumed.keys()
    for key in ema_whole:
        assert torch.equal(ema_whole[key], ema_resumed[key]), key
    live = tensors(whole.latest_checkpoint, "model.safetensors")
    assert live.keys() == ema_whole.keys()
    floating = [k for k in live if live[k].is_floating_point() and "running" not in k and "num_batches" not in k]
    assert any(not torch.equal(live[k], ema_whole[k]) for k in floating)  # the average lags the live weights
    assert "ema.safetensors" in read_checkpoint_state(whole.latest_checkpoint)["files"]  # checksummed too


def test_ema_weights_are_what_evaluation_sees(tmp_path, tiny):
    # decay close to 1: the average barely leaves the initial weights, so evaluation with EMA
    # on must score like an untrained model while the live weights have learned.
    plain = run_local(tmp_path, "plain", tiny(seed=2, max_epochs=3))
    frozen_average = run_local(tmp_path, "ema", tiny(seed=2, max_epochs=3, ema_decay=0.999999))
    assert plain.final["train_accuracy"] == pytest.approx(frozen_average.final["train_accuracy"])
    assert frozen_average.final["val_accuracy"] < plain.final["val_accuracy"]


class ScoredSamples:
    """A tinyimagenet task whose sampler returns a SampleOutput with a metric and a picture."""

    def __new__(cls):
        task = get_task("tinyimagenet")
        real_sample = task.sample
        calls = {"n": 0}

        def sample(model, n, ctx, options=None):
            assert not model.training and not torch.is_grad_enabled()
            calls["n"] += 1
            image = Image.new("RGB", (8, 8), (calls["n"] * 20, 0, 0))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return SampleOutput(samples=real_sample(model, n, ctx), metrics={"sample_score": float(calls["n"])}, png=buffer.getvalue())

        task.sample = sample
        return task


def test_sampling_rounds_write_json_png_and_metrics_rows(tmp_path, tiny):
    task = ScoredSamples()
    # 96 samples / batch 16 = 6 steps an epoch, 2 epochs; a round before step 1 and every 4 steps
    cfg = task.config_cls.model_validate(tiny(sample_every_steps=4, num_samples=3, max_epochs=2, per_worker_batch_size=16))
    updates: list[dict] = []
    train_torch(task, cfg, LocalSession(tmp_path / "run", keep_checkpoints=2, on_progress=updates.append))
    run = tmp_path / "run"
    rounds = sorted(p.name for p in (run / "samples").glob("step_*.json"))
    assert rounds == ["step_00000000.json", "step_00000004.json", "step_00000008.json", "step_00000012.json"]
    payload = json.loads((run / "samples" / "step_00000004.json").read_text())
    assert payload["step"] == 4 and payload["metrics"] == {"sample_score": 2.0} and len(payload["samples"]) == 3
    assert payload["config"]["sample_every_steps"] == 4
    assert Image.open(run / "samples" / "step_00000004.png").size == (8, 8)
    metrics = pd.read_parquet(run / "metrics.parquet")
    scored = metrics.dropna(subset=["sample_score"])
    assert scored[["step", "sample_score"]].values.tolist() == [[0, 1.0], [4, 2.0], [8, 3.0], [12, 4.0]]
    # Evaluations stay on the epoch-end rows; the round at step 12 joined that step's row.
    assert metrics.dropna(subset=["val_accuracy"])["step"].tolist() == [6, 12]
    assert metrics["step"].tolist() == [0, 4, 6, 8, 12]
    assert any("sample_score" in u for u in updates)


def test_headline_metrics_reach_the_display(tmp_path, tiny):
    task = get_task("tinyimagenet")
    task.headline_metrics = ("loss",)
    cfg = task.config_cls.model_validate(tiny(max_epochs=1))
    updates: list[dict] = []
    train_torch(task, cfg, LocalSession(tmp_path / "run", keep_checkpoints=1, on_progress=updates.append))
    assert all(u["headline_metrics"] == ["loss"] for u in updates if "global_step" in u)
    from raylab.progress import status_text

    line = status_text(updates[-1])
    assert "loss=" in line and "accuracy=" not in line.replace("val_accuracy", "")
    assert any("avg_loss" in u for u in updates)


def test_in_process_runs_compute_with_the_threads_of_one_worker(tmp_path, tiny, monkeypatch):
    # --workers 0 uses as many threads as a Ray worker with --cpus-per-worker CPUs, then gives them back.
    from models.tinyimagenet.task import TinyImageNetTask

    seen: set[int] = set()
    real_loss = TinyImageNetTask.loss

    def loss(self, model, batch):
        seen.add(torch.get_num_threads())
        return real_loss(self, model, batch)

    monkeypatch.setattr(TinyImageNetTask, "loss", loss)
    before = torch.get_num_threads()
    train("tinyimagenet", "quick", tiny(max_epochs=1), LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="one", cpus_per_worker=1))
    assert seen == {1}
    seen.clear()
    train("tinyimagenet", "quick", tiny(max_epochs=1), LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="two", cpus_per_worker=2))
    assert seen == {2}
    assert torch.get_num_threads() == before


def test_evaluation_and_sampling_never_move_the_training_random_streams(tmp_path, tiny, monkeypatch):
    # Training draws from torch's global RNG (dropout on the logits); evaluation and sampling
    # draw too. Evaluating every 2 steps instead of once an epoch must not change the weights.
    from models.tinyimagenet.task import TinyImageNetTask

    real_loss, real_evaluate = TinyImageNetTask.loss, TinyImageNetTask.evaluate

    def loss(self, model, batch):
        images, labels = batch
        logits = torch.nn.functional.dropout(model(images), p=0.3, training=True)
        return torch.nn.functional.cross_entropy(logits, labels), {}

    def evaluate(self, model, ctx):
        torch.rand(1000)  # an evaluation that uses randomness (noise, a random subset...)
        return real_evaluate(self, model, ctx)

    monkeypatch.setattr(TinyImageNetTask, "loss", loss)
    monkeypatch.setattr(TinyImageNetTask, "evaluate", evaluate)
    once = run_local(tmp_path, "once", tiny(seed=9, max_epochs=1))
    often = run_local(tmp_path, "often", tiny(seed=9, max_epochs=1, eval_every_steps=2, num_samples=3))
    a, b = tensors(once.latest_checkpoint, "model.safetensors"), tensors(often.latest_checkpoint, "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fields_added_since_a_checkpoint_count_as_their_defaults_on_resume():
    from models.tinyimagenet.config import TinyImageNetConfig
    from raylab.loop_core import config_changes, config_defaults

    current = TinyImageNetConfig().model_dump(mode="json")
    old_checkpoint = {k: v for k, v in current.items() if k not in ("ema_decay", "keep_best_checkpoints", "health")}
    assert config_changes(old_checkpoint, current, config_defaults(TinyImageNetConfig)) == ""
    assert config_changes(old_checkpoint, {**current, "ema_decay": 0.9}, config_defaults(TinyImageNetConfig)) == "ema_decay None -> 0.9"
    assert config_changes({**old_checkpoint, "lr": 1.0}, current, config_defaults(TinyImageNetConfig)) == f"lr 1.0 -> {current['lr']!r}"


def test_task_notices_are_shown_when_the_run_starts(tmp_path, tiny, monkeypatch):
    from models.tinyimagenet.task import TinyImageNetTask

    real_build = TinyImageNetTask.build

    def build(self, cfg, ctx):
        parts = real_build(self, cfg, ctx)
        parts.metadata["notices"] = ["3 of 96 clips were truncated"]
        return parts

    monkeypatch.setattr(TinyImageNetTask, "build", build)
    task = get_task("tinyimagenet")
    updates: list[dict] = []
    train_torch(task, task.config_cls.model_validate(tiny(max_epochs=1)), LocalSession(tmp_path / "run", keep_checkpoints=1, on_progress=updates.append))
    notices = [u["notice"] for u in updates if "notice" in u]
    assert notices == ["3 of 96 clips were truncated"]
