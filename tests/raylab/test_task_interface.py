"""Every registered task satisfies the interface, and its experiment file validates."""

from __future__ import annotations

import json

import pytest

from raylab.config import STAGES, TrainConfig, read_experiment, stage_values, validate_config
from raylab.launch import find_experiment
from raylab.task import TASKS, TaskContext, TfTask, TorchTask, framework_of, get_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_implements_the_interface(name):
    task = get_task(name)
    assert framework_of(task) in ("torch", "tensorflow")
    assert isinstance(task, TfTask if framework_of(task) == "tensorflow" else TorchTask)
    assert tuple(task.headline_metrics) and all(isinstance(m, str) for m in task.headline_metrics)
    assert issubclass(task.config_cls, TrainConfig)
    undocumented = [f for f, info in task.config_cls.model_fields.items() if not info.description]
    assert not undocumented, f"{name}: fields without a description: {undocumented}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_stage_validates_and_sizes_grow(name):
    task = get_task(name)
    path = find_experiment(name)
    experiment = read_experiment(path)
    assert experiment["model"] == name
    assert set(experiment["stages"]) == set(STAGES)
    sizes = []
    for stage in STAGES:
        cfg = validate_config(task.config_cls, stage_values(experiment, stage, path), stage)
        sizes.append(task.num_parameters(cfg))
        assert task.describe(cfg)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_tinyimagenet_sampler_any_count_json(tiny):
    import torch

    task = get_task("tinyimagenet")
    cfg = task.config_cls.model_validate(tiny())
    ctx = TaskContext()
    parts = task.build(cfg, ctx)
    parts.model.eval()
    with torch.no_grad():
        for n in (1, 3, 8):
            samples = task.sample(parts.model, n, ctx)
            assert len(samples) == n
            json.dumps(samples)


def test_wrong_num_classes_names_wnids_file(tiny):
    from models.tinyimagenet.data import DataError

    task = get_task("tinyimagenet")
    cfg = task.config_cls.model_validate(tiny(num_classes=200))
    with pytest.raises(DataError, match="wnids.txt lists 4 classes"):
        task.build(cfg, TaskContext())
