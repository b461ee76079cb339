"""Tests for the CRAFT task (models.craft.task): build, loss, evaluation across
workers, the sampler, and the experiment file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylab.config import ConfigError, resolve_config
from raylab.launch import find_experiment
from raylab.task import SampleOutput, TaskContext, get_task

from models.craft.data import DataError


@pytest.fixture(scope="module")
def tiny_craft(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Overrides for a CRAFT that builds in a second on a small synthetic set."""
    synthetic = tmp_path_factory.mktemp("craft") / "syn"
    return {
        "width_divisor": 16, "image_size": 64, "eval_image_size": 64, "synthetic_image_size": 64,
        "synthetic_train_images": 16, "synthetic_val_images": 9, "synthetic_dir": str(synthetic),
        "per_worker_batch_size": 4, "eval_batch_size": 4, "max_epochs": 1,
    }


@pytest.fixture(scope="module")
def built(tiny_craft: dict):
    task = get_task("craft")
    cfg = task.config_cls.model_validate(tiny_craft)
    parts = task.build(cfg, TaskContext())
    parts.model.eval()
    return task, cfg, parts


def test_task_builds_from_the_synthetic_icdar_folder(built, tiny_craft: dict) -> None:
    task, cfg, parts = built
    root = Path(tiny_craft["synthetic_dir"])
    assert (root / "train_gts" / "gt_img_1.txt").is_file() and (root / "test_images" / "img_9.jpg").is_file()
    assert len(parts.train_data) == 16 and len(task.val_data) == 9
    assert task.headline_metrics == ("loss", "cls_loss", "geo_loss", "hmean")
    assert task.describe_sample(2).endswith("train_images/img_3.jpg")
    json.dumps(parts.metadata)


def test_loss_returns_the_seed_metric_names(built) -> None:
    task, _, parts = built
    batch = next(iter(torch.utils.data.DataLoader(parts.train_data, batch_size=2)))
    loss, metrics = task.loss(parts.model, batch)
    assert set(metrics) == {"cls_loss", "geo_loss"}
    torch.testing.assert_close(loss.detach(), metrics["cls_loss"] + metrics["geo_loss"])
    assert loss.requires_grad and loss.item() > 0


def test_evaluate_sums_counts_across_workers(built) -> None:
    task, _, parts = built
    with torch.no_grad():
        whole = task.evaluate(parts.model, TaskContext())
        # Two workers, each scoring its own slice; the reduction adds what both report.
        local: list[dict[str, float]] = []
        for rank in range(2):
            ctx = TaskContext(world_rank=rank, world_size=2, all_reduce_sum=lambda d: local.append(dict(d)) or dict(d))
            task.evaluate(parts.model, ctx)
    assert set(whole) == {"loss", "cls_loss", "geo_loss", "precision", "recall", "hmean"}
    summed = {k: local[0][k] + local[1][k] for k in local[0]}
    assert summed["images"] == 9 and local[0]["images"] == 5
    assert summed["gt"] > 0
    assert whole["loss"] == pytest.approx(summed["loss"] / 9, rel=1e-5)
    assert whole["cls_loss"] + whole["geo_loss"] == pytest.approx(whole["loss"], rel=1e-5)
    precision = summed["matched"] / summed["detections"] if summed["detections"] else 0.0
    assert whole["precision"] == pytest.approx(precision)


@pytest.mark.parametrize("n", [1, 3, 8, 20])
def test_sampler_gives_json_boxes_for_any_count(built, n: int) -> None:
    task, _, parts = built
    with torch.no_grad():
        out = task.sample(parts.model, n, TaskContext())
    assert isinstance(out, SampleOutput)
    assert len(out.samples) == min(n, 9)
    text = json.dumps(out.samples)
    first = json.loads(text)[0]
    assert first["image"] == "img_1.jpg"
    assert len(first["boxes"]) == len(first["scores"]) >= first["detected_words"]
    assert all(len(box) == 4 and all(len(p) == 2 for p in box) for box in first["gt_boxes"] + first["boxes"])
    assert out.png is not None and out.png.startswith(b"\x89PNG")
    json.dumps(out.metrics)


def test_sampler_finds_the_words_of_a_perfect_model(built) -> None:
    # A stand-in network that outputs the true maps: the sampler's boxes must then match the gt.
    task, _, _ = built

    class Oracle(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            maps = [task.val_data.item(i) for i in range(len(images))]
            return torch.stack([torch.stack([m.region, m.affinity], dim=-1) for m in maps])

    out = task.sample(Oracle(), 1, TaskContext())
    sample = out.samples[0]
    assert sample["gt_words"] > 0 and sample["matched"] == sample["gt_words"] == sample["detected_words"]
    assert out.metrics["sample_hmean"] == 1.0


def test_num_parameters_of_the_stages_and_full_size(built) -> None:
    task, _, _ = built
    path = find_experiment("craft")
    sizes = {stage: task.num_parameters(resolve_config(task.config_cls, path, stage, {})) for stage in ("quick", "medium", "full")}
    assert sizes["full"] == 20_770_466
    assert sizes["quick"] < sizes["medium"] < sizes["full"]
    full = resolve_config(task.config_cls, path, "full", {})
    assert full.image_size == 768 and full.checkpoint_every_batches > 0 and full.per_worker_batch_size == 16
    assert resolve_config(task.config_cls, path, "medium", {}).checkpoint_every_batches > 0


@pytest.mark.parametrize("override, fragment", [
    ({"image_size": 100}, r"image_size \(100\) must be a multiple of 32"),
    ({"width_divisor": 3}, "width_divisor"),
    ({"augment_min_scale": 2.0}, "augment_min_scale"),
    ({"text_threshold": 1.5}, "text_threshold"),
])
def test_bad_config_values_name_the_field(override: dict, fragment: str) -> None:
    task = get_task("craft")
    with pytest.raises(ConfigError, match=fragment):
        resolve_config(task.config_cls, find_experiment("craft"), "quick", override)


def test_data_dir_without_icdar_folders_is_a_data_error(tmp_path: Path, tiny_craft: dict) -> None:
    task = get_task("craft")
    cfg = task.config_cls.model_validate({**tiny_craft, "data_dir": str(tmp_path)})
    with pytest.raises(DataError, match="test image folder is missing"):
        task.build(cfg, TaskContext())
