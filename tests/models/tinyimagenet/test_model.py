"""Tests for the TinyImageNet classifier families in models.tinyimagenet.model."""

from __future__ import annotations

import pytest
import torch

from models.tinyimagenet.model import FAMILIES, BasicBlock, build_model, count_parameters

# CIFAR-style ResNet-18 (3x3 stem, no maxpool, 1x1 conv+BN projections) with a
# 200-way head: 11,173,962 parameters at 10 classes + 190 * (512 + 1).
RESNET18_200_CLASS_PARAMETERS = 11_271_432


def test_families_are_the_four_of_the_diagnosis() -> None:
    assert FAMILIES == ("baseline", "residual", "deeper_wider", "se")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch, size", [(2, 64), (3, 32), (1, 16)])
def test_forward_gives_one_logit_row_per_image(family: str, batch: int, size: int) -> None:
    model = build_model(family, num_classes=7, width=8).eval()
    with torch.no_grad():
        logits = model(torch.randn(batch, 3, size, size))
    assert logits.shape == (batch, 7)
    assert torch.isfinite(logits).all()


def test_residual_at_width_64_has_exactly_resnet18_parameter_count() -> None:
    count = count_parameters(build_model("residual", num_classes=200, width=64))
    assert count == RESNET18_200_CLASS_PARAMETERS
    assert 11_260_000 <= count <= 11_280_000


def test_count_parameters_counts_every_element() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2


def test_se_adds_parameters_to_residual() -> None:
    residual = count_parameters(build_model("residual", num_classes=200, width=64))
    se = count_parameters(build_model("se", num_classes=200, width=64))
    assert se > residual
    # Two linear layers per block, reduction 16, blocks of 64,64,128,128,...,512,512.
    channels = [64, 64, 128, 128, 256, 256, 512, 512]
    assert se - residual == sum(2 * c * (c // 16) + c // 16 + c for c in channels)


def test_se_and_residual_differ_only_by_squeeze_excitation_modules() -> None:
    residual_names = {n for n, _ in build_model("residual", 10, width=16).named_parameters()}
    se_names = {n for n, _ in build_model("se", 10, width=16).named_parameters()}
    assert residual_names < se_names
    assert all(".se." in name for name in se_names - residual_names)


def test_unknown_family_raises_naming_it() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        build_model("resnet50", num_classes=10)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_depend_on_the_input(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(family, num_classes=10, width=32).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(images)
        shuffled = model(images.flip(0))
    # Different images in one batch must give clearly different logits ...
    assert (logits[0] - logits[1]).abs().max() > 1e-3 * logits.abs().max()
    # ... and in eval mode a sample's logits must not depend on its batch mates.
    torch.testing.assert_close(shuffled, logits.flip(0), rtol=1e-4, atol=1e-5)


def test_convolutions_use_kaiming_fan_out_and_batchnorm_starts_as_identity() -> None:
    model = build_model("deeper_wider", num_classes=10, width=16)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    big = max(convs, key=lambda m: m.weight.numel())
    fan_out = big.out_channels * big.kernel_size[0] * big.kernel_size[1]
    expected_std = (2.0 / fan_out) ** 0.5
    assert big.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_gradients_reach_the_first_layer_of_every_family() -> None:
    for family in FAMILIES:
        model = build_model(family, num_classes=5, width=8).train()
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
        loss.backward()
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert first_conv.weight.grad is not None
        assert first_conv.weight.grad.abs().sum() > 0, family


def _final_feature_map_size(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    seen: list[tuple[int, int]] = []
    model.head.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[-2:])))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, image_size, image_size))
    return seen[0]


@pytest.mark.parametrize("family", ["residual", "se"])
def test_resnet_keeps_64_px_resolution_in_its_stem(family: str) -> None:
    # Three stride-2 stages and no stem downsampling: 64 px -> 8x8 before pooling.
    assert _final_feature_map_size(build_model(family, 10, width=8), 64) == (8, 8)


def test_squeeze_excitation_gates_only_the_residual_branch() -> None:
    block = BasicBlock(8, 8, stride=1, se=True).eval()
    # A gate shut to ~0 must leave just the identity shortcut: relu(x).
    torch.nn.init.constant_(block.se.expand.bias, -50.0)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x), rtol=0, atol=1e-6)
