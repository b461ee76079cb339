"""The training loop without Ray (LocalSession): determinism, resume, checkpoint
format, retention, health checks and the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch
import torch

from raylab.checkpoint import CheckpointError, read_checkpoint_state
from raylab.config import LaunchConfig
from raylab.launch import train
from raylab.session import LocalSession
from raylab.task import get_task
from raylab.torch_loop import TrainingHealthError, epoch_batches, train_torch


def run_local(tmp_path: Path, name: str, overrides: dict):
    return train("tinyimagenet", "quick", overrides, LaunchConfig(num_workers=0, storage_path=str(tmp_path), name=name))


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(checkpoint) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_epoch_batches_shard_disjoint_equal_and_deterministic():
    plans = [epoch_batches(103, 8, seed=3, epoch=1, rank=r, world_size=3) for r in range(3)]
    assert {len(p) for p in plans} == {4}  # 103 // 3 = 34 per rank -> 4 full batches of 8
    flat = [i for plan in plans for batch in plan for i in batch]
    assert len(flat) == len(set(flat)) == 96
    assert plans[0] == epoch_batches(103, 8, seed=3, epoch=1, rank=0, world_size=3)
    assert plans[0] != epoch_batches(103, 8, seed=3, epoch=2, rank=0, world_size=3)
    assert len(epoch_batches(100, 8, 0, 0, 0, 1, multiple_of=4)) == 12  # 12 of 12 batches: a multiple of 4


def test_same_seed_same_weights_and_different_seed_differs(tmp_path, tiny):
    a = run_local(tmp_path, "a", tiny(seed=7))
    b = run_local(tmp_path, "b", tiny(seed=7))
    c = run_local(tmp_path, "c", tiny(seed=8))
    assert_same_weights(weights(a.latest_checkpoint), weights(b.latest_checkpoint))
    wa, wc = weights(a.latest_checkpoint), weights(c.latest_checkpoint)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_mid_epoch_gives_identical_weights(tmp_path, tiny):
    # 96 samples / batch 8 = 12 batches an epoch; stop at step 7 (mid-epoch), then resume.
    whole = run_local(tmp_path, "whole", tiny(seed=3, checkpoint_every_batches=4))
    first = run_local(tmp_path, "split", tiny(seed=3, checkpoint_every_batches=4, max_steps=7))
    state = read_checkpoint_state(first.latest_checkpoint)
    assert state["position"] == {"epoch": 0, "batch_in_epoch": 7, "global_step": 7}
    resumed = run_local(tmp_path, "split", tiny(seed=3, checkpoint_every_batches=4))
    assert_same_weights(weights(whole.latest_checkpoint), weights(resumed.latest_checkpoint))
    # The log holds each report once: the first attempt's (up to its step 7 checkpoint), then the rest.
    assert resumed.metrics["step"].tolist() == [4, 7, 8, 12, 16, 20, 24]


def test_checkpoint_folder_is_plain_verifiable_data(tmp_path, tiny):
    summary = run_local(tmp_path, "fmt", tiny(max_epochs=1))
    ckpt = Path(summary.latest_checkpoint)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "scheduler.pt", "state.json"]
    state = read_checkpoint_state(ckpt)
    assert state["position"] == {"epoch": 1, "batch_in_epoch": 0, "global_step": 12}
    assert state["config"]["family"] == "baseline" and state["config"]["seed"] == 0
    assert set(state["files"]) == {"model.safetensors", "optimizer.pt", "scheduler.pt"}
    assert "val_accuracy" in state["metrics"]
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert optim["state"] and optim["param_groups"][0]["lr"] > 0
    torch.load(ckpt / "scheduler.pt", weights_only=True)
    # The weights load into a freshly built model of the same config.
    from models.tinyimagenet.model import build_model

    model = build_model("baseline", 4, 4)
    model.load_state_dict(weights(ckpt))
    # A flipped byte is caught and named.
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_checkpoint_state(ckpt)


class _DiesAfterStoring(LocalSession):
    """A session whose process dies right after checkpoint `at` is stored (a SIGKILL at that instant)."""

    def __init__(self, *args, at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.at = at

    def report(self, metrics, checkpoint_dir, checkpoint_name):
        super().report(metrics, checkpoint_dir, checkpoint_name)
        if checkpoint_dir is not None and metrics["step"] == self.at:
            raise KeyboardInterrupt


def test_a_stored_checkpoint_always_has_its_metrics_row(tmp_path, tiny):
    task = get_task("tinyimagenet")
    cfg = task.config_cls.model_validate(tiny(checkpoint_every_batches=4))
    with pytest.raises(KeyboardInterrupt):
        train_torch(task, cfg, _DiesAfterStoring(tmp_path / "killed", keep_checkpoints=3, at=4))
    assert pd.read_parquet(tmp_path / "killed" / "metrics.parquet")["step"].tolist() == [4]
    train_torch(task, cfg, LocalSession(tmp_path / "killed", keep_checkpoints=3))  # resumes from step 4
    assert pd.read_parquet(tmp_path / "killed" / "metrics.parquet")["step"].tolist() == [4, 8, 12, 16, 20, 24]


def test_retention_keeps_newest(tmp_path, tiny):
    summary = run_local(tmp_path, "keep", tiny(max_epochs=2, checkpoint_every_batches=2, keep_checkpoints=2))
    kept = sorted(p.name for p in Path(summary.run_path).glob("checkpoint_*"))
    assert kept == ["checkpoint_epoch0001_batch000010_step00000022", "checkpoint_epoch0002_batch000000_step00000024"]


def test_run_files_metrics_tensorboard_samples(tmp_path, tiny):
    summary = run_local(tmp_path, "files", tiny(max_epochs=2, eval_every_steps=6))
    run = Path(summary.run_path)
    metrics = pd.read_parquet(run / "metrics.parquet")
    # evals at steps 6 and 18 mid-epoch, plus the end of each epoch (12, 24)
    assert metrics["step"].tolist() == [6, 12, 18, 24]
    assert {"step", "epoch", "lr", "train_loss", "val_accuracy", "val_loss", "samples_per_s"} <= set(metrics.columns)
    assert list(run.glob("tensorboard/events.out.tfevents.*"))
    assert summary.curves == str(run / "curves.png")
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = sorted(p.name for p in (run / "samples").iterdir())
    assert samples[0] == "step_00000000.json"  # the sampler ran before the first step
    first = json.loads((run / "samples" / "step_00000000.json").read_text())
    assert len(first["samples"]) == 2 and {"image", "label", "top3"} <= set(first["samples"][0])


def test_non_finite_loss_stops_with_position(tmp_path, tiny):
    task = get_task("tinyimagenet")
    cfg = task.config_cls.model_validate(tiny())
    real_loss = task.loss

    def poisoned(model, batch):
        loss, metrics = real_loss(model, batch)
        return loss * float("nan"), metrics

    task.loss = poisoned
    with pytest.raises(TrainingHealthError, match="epoch 0, batch 0, step 0"):
        train_torch(task, cfg, LocalSession(tmp_path / "nan", keep_checkpoints=1))


def test_too_small_split_is_a_clear_error(tmp_path, tiny):
    from raylab.config import ConfigError

    with pytest.raises(ConfigError, match="per_worker_batch_size"):
        run_local(tmp_path, "small", tiny(per_worker_batch_size=500))


def test_resume_with_another_worker_count_keeps_samples_seen_and_says_so(tmp_path, tiny):
    first = run_local(tmp_path, "elastic", tiny(checkpoint_every_batches=3, max_steps=3))
    # Pretend 2 workers wrote it: 3 batches per worker = 6 single-worker batches of this epoch.
    state_path = Path(first.latest_checkpoint) / "state.json"
    state = json.loads(state_path.read_text())
    state["world_size"], state["rng"] = 2, state["rng"] * 2
    state_path.write_text(json.dumps(state))
    updates: list[dict] = []
    task = get_task("tinyimagenet")
    cfg = task.config_cls.model_validate(tiny(checkpoint_every_batches=3, max_steps=4))
    train_torch(task, cfg, LocalSession(Path(first.run_path), keep_checkpoints=3, on_progress=updates.append))
    notices = [u["notice"] for u in updates if "notice" in u]
    assert notices and "2-worker checkpoint with 1 worker(s)" in notices[0] and "batch 6" in notices[0]
    with LocalSession(Path(first.run_path), keep_checkpoints=3).latest_checkpoint() as latest:
        assert read_checkpoint_state(latest)["position"] == {"epoch": 0, "batch_in_epoch": 7, "global_step": 4}


def test_data_loader_processes_do_not_change_the_result(tmp_path, tiny):
    # Augmentation is a function of (seed, epoch, index), and the loop fixes the order:
    # loading in 2 worker processes must give the very same weights as loading in-process.
    inline = run_local(tmp_path, "inline", tiny(seed=5, max_epochs=1))
    forked = run_local(tmp_path, "forked", tiny(seed=5, max_epochs=1, data_loader_workers=2))
    assert_same_weights(weights(inline.latest_checkpoint), weights(forked.latest_checkpoint))


def test_replica_check_names_the_diverged_worker():
    from raylab.torch_loop import check_replicas_agree

    check_replicas_agree([[1.0, 2.0], [1.0, 2.0]], step=5)  # in sync: silent
    with pytest.raises(TrainingHealthError, match="worker 1's weights differ from worker 0's at step 5 .first at parameter #1"):
        check_replicas_agree([[1.0, 2.0], [1.0, 2.5]], step=5)


def test_resume_with_changed_batch_size_names_the_change_and_finishes(tmp_path, tiny):
    # batch 4: 24 batches an epoch; stop at batch 20. With batch 8 an epoch has only 12
    # batches, so batch 20 is past its end: the epoch must end, not loop forever.
    run_local(tmp_path, "rebatch", tiny(per_worker_batch_size=4, max_epochs=1, checkpoint_every_batches=10, max_steps=20))
    updates: list[dict] = []
    task = get_task("tinyimagenet")
    cfg = task.config_cls.model_validate(tiny(per_worker_batch_size=8, max_epochs=2))
    train_torch(task, cfg, LocalSession(tmp_path / "rebatch", keep_checkpoints=3, on_progress=updates.append))
    notices = [u["notice"] for u in updates if "notice" in u]
    assert notices and "per_worker_batch_size 4 -> 8" in notices[0] and "max_epochs 1 -> 2" in notices[0]
    with LocalSession(tmp_path / "rebatch", keep_checkpoints=3).latest_checkpoint() as latest:
        assert read_checkpoint_state(latest)["position"] == {"epoch": 2, "batch_in_epoch": 0, "global_step": 32}
