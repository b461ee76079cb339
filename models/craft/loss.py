"""CRAFT's loss: pixel MSE times the confidence mask, with online hard-negative mining.

Per image and per map (region -> `cls_loss`, affinity -> `geo_loss`, the
seed's names): the mean loss over positive pixels (target > 0.1) plus the mean
over the 3·P hardest negatives, where P is the number of positives (all
negatives when there are fewer than 3·P). An image with no positive pixel
contributes the mean of its `negatives_without_positives` hardest pixels, so
empty crops still teach the model to stay silent. Both are averaged over the
batch and added: `loss = cls_loss + geo_loss`.

Mining a different k per image is done without a Python loop: negatives are
sorted hardest first, and the sum of the top k is read off a cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MiningConfig:
    positive_threshold: float = 0.1  # a target above this is a positive pixel
    negative_ratio: float = 3.0  # hardest negatives kept per positive
    negatives_without_positives: int = 500  # hardest pixels kept when an image has no positive


def _top_k_mean(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean of the k[i] largest entries of each row of `values` (B, N); 0 where k[i] == 0."""
    ranked, _ = values.sort(dim=1, descending=True)
    sums = torch.cumsum(ranked, dim=1)
    index = (k.clamp(min=1) - 1).unsqueeze(1)
    top_sum = sums.gather(1, index).squeeze(1)
    return torch.where(k > 0, top_sum / k.clamp(min=1), torch.zeros_like(top_sum))


def mined_map_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mining: MiningConfig) -> torch.Tensor:
    """Hard-negative-mined masked MSE for one map, averaged over the batch; inputs (B, H, W)."""
    batch = pred.shape[0]
    pixel_loss = ((pred - target) ** 2 * mask).reshape(batch, -1)
    positive = target.reshape(batch, -1) > mining.positive_threshold
    num_positive = positive.sum(dim=1)
    num_negative = positive.shape[1] - num_positive
    positive_mean = (pixel_loss * positive).sum(dim=1) / num_positive.clamp(min=1)
    # Positives must never be picked as "hard negatives": push them below every real loss (>= 0).
    negatives = torch.where(positive, torch.full_like(pixel_loss, -1.0), pixel_loss)
    k = torch.minimum((mining.negative_ratio * num_positive).long(), num_negative)
    k = torch.where(num_positive > 0, k, torch.clamp(num_negative, max=mining.negatives_without_positives))
    per_image = positive_mean + _top_k_mean(negatives, k)
    return per_image.mean()


def craft_loss(
    pred: torch.Tensor, region: torch.Tensor, affinity: torch.Tensor, mask: torch.Tensor, mining: MiningConfig = MiningConfig()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cls_loss, geo_loss) for predictions (B, H, W, 2) against (B, H, W) targets and mask."""
    cls_loss = mined_map_loss(pred[..., 0], region, mask, mining)
    geo_loss = mined_map_loss(pred[..., 1], affinity, mask, mining)
    return cls_loss + geo_loss, cls_loss, geo_loss
