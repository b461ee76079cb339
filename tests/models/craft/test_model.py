"""Tests for the CRAFT network in models.craft.model."""

from __future__ import annotations

import pytest
import torch

from models.craft.model import CRAFT, WIDTH_DIVISORS, build_craft, count_parameters

# clovaai/CRAFT-pytorch's CRAFT() (VGG16-BN without conv5_3, dilated fc6/fc7,
# four up-blocks, five head convs) has exactly this many parameters.
CRAFT_PARAMETERS = 20_770_466


def test_full_width_has_exactly_the_published_parameter_count() -> None:
    with torch.device("meta"):
        model = build_craft(1)
    assert count_parameters(model) == CRAFT_PARAMETERS


@pytest.mark.parametrize("divisor", WIDTH_DIVISORS[1:])
def test_narrower_models_shrink_roughly_quadratically(divisor: int) -> None:
    with torch.device("meta"):
        count = count_parameters(build_craft(divisor))
    assert CRAFT_PARAMETERS / divisor**2 * 0.9 < count < CRAFT_PARAMETERS / divisor**2 * 1.1


@pytest.mark.parametrize("batch, height, width", [(2, 64, 64), (1, 96, 64), (3, 128, 160)])
def test_output_is_two_maps_at_half_resolution_channels_last(batch: int, height: int, width: int) -> None:
    model = build_craft(8).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, height, width))
    assert out.shape == (batch, height // 2, width // 2, 2)
    assert torch.isfinite(out).all()


def test_no_final_activation_lets_scores_leave_0_1() -> None:
    # Region/affinity targets are regressed with MSE, so the head must be linear:
    # a huge last bias must come straight through.
    model = build_craft(16).eval()
    torch.nn.init.constant_(model.head[-1].bias, 5.0)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.min() > 1.0


def test_structure_matches_the_reference() -> None:
    with torch.device("meta"):
        model = build_craft(1)
    convs = [m for m in model.backbone.slices.modules() if isinstance(m, torch.nn.Conv2d)]
    # VGG16-BN's 13 convs minus conv5_3, which CRAFT's slices leave out.
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512]
    dilated = model.backbone.dilated
    assert isinstance(dilated[0], torch.nn.MaxPool2d) and dilated[0].stride == 1 and dilated[0].kernel_size == 3
    assert dilated[1].dilation == (6, 6) and (dilated[1].in_channels, dilated[1].out_channels) == (512, 1024)
    assert dilated[2].kernel_size == (1, 1) and dilated[2].out_channels == 1024
    ups = [(b.conv[0].in_channels, b.conv[0].out_channels, b.conv[3].out_channels) for b in model.up]
    assert ups == [(1536, 512, 256), (768, 256, 128), (384, 128, 64), (192, 64, 32)]
    head = [(c.in_channels, c.out_channels) for c in model.head if isinstance(c, torch.nn.Conv2d)]
    assert head == [(32, 32), (32, 32), (32, 16), (16, 16), (16, 2)]
    # Each backbone slice ends on a BatchNorm: the next one starts with its ReLU.
    assert all(isinstance(s[-1], torch.nn.BatchNorm2d) for s in model.backbone.slices)


def test_skip_resolutions_halve_down_to_one_sixteenth() -> None:
    model = build_craft(8).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 128, 128))
    assert [f.shape[-1] for f in features] == [8, 8, 16, 32, 64]
    assert [f.shape[1] for f in features] == [128, 64, 64, 32, 16]


def test_unknown_width_divisor_is_refused() -> None:
    with pytest.raises(ValueError, match="width_divisor"):
        CRAFT(3)


def test_gradients_reach_the_first_convolution() -> None:
    model = build_craft(8).train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    first = model.backbone.slices[0][0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
