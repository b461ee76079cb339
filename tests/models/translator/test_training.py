"""The translator through the real loop (in-process, no Ray): gradient accumulation is
exactly a bigger batch, a mid-epoch resume is bit-identical, samples are translations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from raylab.checkpoint import read_checkpoint_state
from models.translator.config import TranslatorConfig
from raylab.config import LaunchConfig
from raylab.launch import train
from raylab.task import TaskContext, get_task


def run(tmp_path: Path, name: str, overrides: dict):
    return train("translator", "quick", overrides, LaunchConfig(num_workers=0, storage_path=str(tmp_path), name=name))


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(checkpoint) / "model.safetensors"))


def test_accumulating_4_batches_of_2_equals_one_batch_of_8(tmp_path, tiny_translator):
    # No batch statistics (gcn_norm none), no dropout; SGD so that any scale error shows in the step.
    common = tiny_translator(gcn_norm="none", dropout=0.0, optimizer="sgd", lr=0.5, max_steps=1, optimizer_weight_decay=0.0)
    accumulated = run(tmp_path, "accum", {**common, "per_worker_batch_size": 2, "grad_accum_steps": 4})
    whole = run(tmp_path, "whole", {**common, "per_worker_batch_size": 8, "grad_accum_steps": 1})
    a, b = weights(accumulated.latest_checkpoint), weights(whole.latest_checkpoint)
    assert a.keys() == b.keys()
    # The step moved the weights, so the runs agree on more than the (seeded) initial weights.
    cfg = TranslatorConfig(**{**common, "per_worker_batch_size": 8})
    torch.manual_seed(cfg.seed)
    initial = get_task("translator").build(cfg, TaskContext()).model.state_dict()
    moved = [k for k in a if not torch.equal(a[k], initial[k])]
    assert len(moved) > len(a) // 2
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-4, msg=key)


def resume_matches_uninterrupted(tmp_path: Path, overrides: dict) -> None:
    whole = run(tmp_path, "whole", overrides)
    first = run(tmp_path, "split", {**overrides, "max_steps": 6})
    assert read_checkpoint_state(first.latest_checkpoint)["position"] == {"epoch": 0, "batch_in_epoch": 6, "global_step": 6}
    resumed = run(tmp_path, "split", overrides)
    a, b = weights(whole.latest_checkpoint), weights(resumed.latest_checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_checkpoint_state(resumed.latest_checkpoint)["position"]["global_step"] == 16


def test_resume_mid_epoch_is_bit_identical(tmp_path, tiny_translator):
    # 64 clips / batch 8 = 8 batches an epoch; stop at step 6 (mid-epoch, BatchNorm statistics on), then resume.
    # A constant lr (the fixture's): with max_steps the first attempt's cosine schedule would be another schedule.
    resume_matches_uninterrupted(tmp_path, tiny_translator(seed=4, max_epochs=2, checkpoint_every_batches=2, gcn_norm="batch", max_length=24))


def test_resume_mid_epoch_with_dropout_is_bit_identical(tmp_path, tiny_translator):
    resume_matches_uninterrupted(tmp_path, tiny_translator(seed=4, max_epochs=2, checkpoint_every_batches=2, dropout=0.1, max_length=24))


def test_samples_are_translations_with_references(tmp_path, tiny_translator):
    summary = run(tmp_path, "samples", tiny_translator(num_samples=3, max_steps=2))
    files = sorted((Path(summary.run_path) / "samples").glob("*.json"))
    assert files, "no sampling round was written"
    payload = json.loads(files[-1].read_text(encoding="utf-8"))
    samples = payload["samples"]
    assert [s["id"] for s in samples] == ["dev_00000", "dev_00001", "dev_00002"]
    assert all(isinstance(s["prediction"], str) and s["reference"] for s in samples)
    final = summary.final
    assert final["val_sentences"] == 16  # BLEU over the whole dev split
    for key in ("val_bleu", "val_rouge_l", "val_token_accuracy", "val_loss"):
        assert key in final, key


def test_sample_works_for_any_n(tiny_translator):
    task = get_task("translator")
    cfg = TranslatorConfig(**tiny_translator(eval_batch_size=5))
    parts = task.build(cfg, TaskContext())
    parts.model.eval()
    assert task.sample(parts.model, 0, TaskContext()) == []
    one = task.sample(parts.model, 1, TaskContext())
    many = task.sample(parts.model, 100, TaskContext())  # more than the 16 dev clips; several eval batches
    assert len(one) == 1 and len(many) == 16
    assert [s["id"] for s in many] == [f"dev_{i:05d}" for i in range(16)]
    assert many[0] == one[0]
