"""The learning-rate schedules the PyTorch models share."""

import math

import pytest
import torch

from raylab.lr_schedules import lr_multiplier, warmup_then


def test_warmup_is_linear_then_the_schedule_takes_over():
    assert [lr_multiplier(s, 100, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(4, 104, 4, "cosine") == 1.0
    assert lr_multiplier(54, 104, 4, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(104, 104, 4, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(500, 104, 4, "cosine") == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    assert [lr_multiplier(s, 0, 0, "step", 0.8, 10) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.8, pytest.approx(0.64)]


def test_lambda_scheduler_follows_the_multiplier_step_by_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_then(opt, total_steps=10, warmup_steps=2, schedule="cosine")
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:2] == [pytest.approx(0.05), pytest.approx(0.1)]
    assert seen[6] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
