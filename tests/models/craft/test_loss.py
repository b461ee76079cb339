"""Tests for CRAFT's hard-negative-mined MSE in models.craft.loss, on hand-made maps."""

from __future__ import annotations

import pytest
import torch

from models.craft.loss import MiningConfig, craft_loss, mined_map_loss

MINING = MiningConfig(positive_threshold=0.1, negative_ratio=3.0, negatives_without_positives=2)


def _maps(*rows: list[float]) -> torch.Tensor:
    """A (B, 1, N) map from per-image pixel lists."""
    return torch.tensor(rows, dtype=torch.float32)[:, None, :]


def test_positives_plus_the_three_hardest_negatives_per_positive() -> None:
    target = _maps([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    pred = _maps([0.5, 0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0])
    mask = torch.ones_like(target)
    loss = mined_map_loss(pred, target, mask, MINING)
    # positive: (0.5)^2; hardest 3 of the negatives' squared errors: .16, .09, .04
    assert float(loss) == pytest.approx(0.25 + (0.16 + 0.09 + 0.04) / 3, rel=1e-6)


def test_positive_threshold_is_strict_and_low_targets_are_negatives() -> None:
    target = _maps([0.1, 0.5, 0.0, 0.0])
    pred = _maps([0.3, 0.5, 0.0, 0.0])
    loss = mined_map_loss(pred, target, torch.ones_like(target), MINING)
    # One positive (0.5: error 0); the 0.1 pixel is a negative with error 0.04; all 3 negatives kept.
    assert float(loss) == pytest.approx(0.0 + 0.04 / 3, rel=1e-6)


def test_fewer_negatives_than_three_per_positive_takes_them_all() -> None:
    target = _maps([1.0, 1.0, 0.0])
    pred = _maps([1.0, 0.0, 0.6])
    loss = mined_map_loss(pred, target, torch.ones_like(target), MINING)
    assert float(loss) == pytest.approx(0.5 + 0.36, rel=1e-6)


def test_image_without_positives_takes_the_fixed_number_of_hardest_pixels() -> None:
    target = _maps([0.0, 0.0, 0.0, 0.0])
    pred = _maps([0.1, 0.9, 0.5, 0.0])
    loss = mined_map_loss(pred, target, torch.ones_like(target), MINING)
    assert float(loss) == pytest.approx((0.81 + 0.25) / 2, rel=1e-6)


def test_each_image_mines_its_own_count_and_the_batch_is_averaged() -> None:
    target = _maps([1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0])
    pred = _maps([0.0, 0.2, 0.2, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0, 0.0])
    loss = mined_map_loss(pred, target, torch.ones_like(target), MINING)
    first = 1.0 + 0.04  # positive error 1, the top 3 negatives all 0.04
    second = (1.0 + 0.0) / 2  # no positive: the 2 hardest pixels
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)


def test_masked_pixels_cost_nothing_and_are_not_mined() -> None:
    target = _maps([1.0, 0.0, 0.0, 0.0, 0.0])
    pred = _maps([1.0, 0.9, 0.1, 0.1, 0.1])
    mask = _maps([1.0, 0.0, 1.0, 1.0, 1.0])  # the 0.9 false positive is inside a ### word
    loss = mined_map_loss(pred, target, mask, MINING)
    assert float(loss) == pytest.approx(0.01, rel=1e-5)


def test_gradient_reaches_positives_and_mined_negatives_only() -> None:
    target = _maps([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    pred = _maps([0.5, 0.6, 0.5, 0.4, 0.1, 0.05]).requires_grad_()
    mined_map_loss(pred, target, torch.ones_like(target), MINING).backward()
    grad = pred.grad.flatten()
    assert (grad[:4] != 0).all()
    assert (grad[4:] == 0).all()  # the two easiest negatives were not among the top 3


def test_craft_loss_sums_region_and_affinity_terms() -> None:
    torch.manual_seed(0)
    pred = torch.rand(2, 8, 8, 2)
    region = (torch.rand(2, 8, 8) > 0.8).float()
    affinity = (torch.rand(2, 8, 8) > 0.9).float()
    mask = torch.ones(2, 8, 8)
    loss, cls_loss, geo_loss = craft_loss(pred, region, affinity, mask)
    torch.testing.assert_close(cls_loss, mined_map_loss(pred[..., 0], region, mask, MiningConfig()))
    torch.testing.assert_close(geo_loss, mined_map_loss(pred[..., 1], affinity, mask, MiningConfig()))
    torch.testing.assert_close(loss, cls_loss + geo_loss)
    perfect, _, _ = craft_loss(torch.stack([region, affinity], dim=-1), region, affinity, mask)
    assert float(perfect) == 0.0
