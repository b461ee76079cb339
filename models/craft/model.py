"""The CRAFT network (Baek et al., 2019): a VGG16-BN encoder and a U-Net decoder
that predict a character-region map and an affinity map at half resolution.

    model = build_craft(width_divisor=1)           # 20,770,466 parameters
    maps = model(images)                           # (B, 3, H, W) -> (B, H/2, W/2, 2)

Channel 0 of the output is the region score (how central a pixel is to a
character), channel 1 the affinity score (how central it is to the gap between
two neighbouring characters of a word). There is no final activation: both are
regressed against Gaussian heat maps with an MSE loss (`models.craft.loss`).

`width_divisor` divides every channel count except the two output maps, so a
small model keeps the full model's structure (quick stage: /8, ~64x fewer
weights). H and W should be multiples of 32; other sizes work because each
decoder stage is resized to its skip connection, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH_DIVISORS = (1, 2, 4, 8, 16)
NUM_MAPS = 2  # region, affinity

# VGG16-BN convolution widths, "M" = 2x2 max pool, as torchvision builds `features`.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# CRAFT cuts torchvision's vgg16_bn.features into four slices at these layer
# indices; each slice ends on a BatchNorm (the next slice starts with its ReLU),
# and conv5_3 onwards (index 39+) is not used.
_SLICE_BOUNDS = (0, 12, 19, 29, 39)


def _vgg16_bn_features(divisor: int) -> list[nn.Module]:
    """torchvision's vgg16_bn `features` layer list with every width divided by `divisor`."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = int(item) // divisor
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        in_channels = out_channels
    return layers


class VGG16BNBackbone(nn.Module):
    """The encoder: four VGG16-BN slices (1/2, 1/4, 1/8, 1/16 resolution) and the
    dilated "fc6/fc7" stage (max pool 3/1/1, 3x3 conv dilation 6, 1x1 conv)."""

    def __init__(self, divisor: int) -> None:
        super().__init__()
        features = _vgg16_bn_features(divisor)
        self.slices = nn.ModuleList(
            nn.Sequential(*features[start:end]) for start, end in zip(_SLICE_BOUNDS, _SLICE_BOUNDS[1:])
        )
        c512, c1024 = 512 // divisor, 1024 // divisor
        self.dilated = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(c512, c1024, kernel_size=3, padding=6, dilation=6),
            nn.Conv2d(c1024, c1024, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps deepest first: [fc7 (1/16), slice4 (1/16), slice3 (1/8), slice2 (1/4), slice1 (1/2)]."""
        skips = []
        for stage in self.slices:
            x = stage(x)
            skips.append(x)
        return [self.dilated(x), *reversed(skips)]


class UpBlock(nn.Module):
    """1x1 conv over [decoder, skip] channels down to `mid`, then 3x3 conv to `out`."""

    def __init__(self, in_channels: int, mid: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CRAFT(nn.Module):
    """Region + affinity score maps, (B, 3, H, W) -> (B, H/2, W/2, 2), no final activation."""

    def __init__(self, width_divisor: int = 1) -> None:
        super().__init__()
        if width_divisor not in WIDTH_DIVISORS:
            raise ValueError(f"width_divisor must be one of {WIDTH_DIVISORS}, got {width_divisor}.")
        d = width_divisor
        self.backbone = VGG16BNBackbone(d)
        # (decoder channels + skip channels) -> mid -> out, as in the reference's
        # double_conv(1024, 512, 256) ... double_conv(128, 64, 32).
        self.up = nn.ModuleList([
            UpBlock((1024 + 512) // d, 512 // d, 256 // d),
            UpBlock((256 + 512) // d, 256 // d, 128 // d),
            UpBlock((128 + 256) // d, 128 // d, 64 // d),
            UpBlock((64 + 128) // d, 64 // d, 32 // d),
        ])
        c32, c16 = 32 // d, 16 // d
        self.head = nn.Sequential(
            nn.Conv2d(c32, c32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c32, c32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c32, c16, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c16, c16, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv2d(c16, NUM_MAPS, kernel_size=1),
        )
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fc7, *skips = self.backbone(images)
        # The deepest skip has fc7's resolution, so the first block needs no resize.
        y = self.up[0](torch.cat([fc7, skips[0]], dim=1))
        for block, skip in zip(self.up[1:], skips[1:]):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return self.head(y).permute(0, 2, 3, 1)


def _init_weights(model: nn.Module) -> None:
    # The reference's init (Xavier-uniform convs, zero bias, identity BatchNorm);
    # without ImageNet weights it applies to the backbone too.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_craft(width_divisor: int = 1) -> CRAFT:
    """A freshly initialised CRAFT; `width_divisor` 1 is the published size."""
    return CRAFT(width_divisor)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())
