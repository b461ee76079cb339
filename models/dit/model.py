"""The DiT network (Peebles & Xie, "Scalable Diffusion Models with Transformers"),
for images and for 1-D token sequences.

    model = build_dit(DiTShape(kind="images", channels=3, size=32, num_classes=10), "DiT-S/2")
    out = model(x, t, y)   # x (B,C,H,W) or (B,T,F); t (B,); y (B,) -> (B,2C,H,W) or (B,T,2F)

Faithful to facebookresearch/DiT `models.py`: a p x p patch embedder for images
(or a Linear over the feature axis of p consecutive tokens for sequences), a
fixed sin-cos positional table, a timestep embedder (256 sinusoidal
frequencies -> Linear -> SiLU -> Linear), a label embedder with one extra
"null" row and label dropout for classifier-free guidance, adaLN-Zero blocks,
and a final layer predicting epsilon and the variance interpolation (learned
sigma: twice the input channels). Sizes S/B/L/XL and patch sizes 2/4/8 are
named like the reference (`DiT-S/2`); `/1` is the token-sequence embedder of
seed 000 (one token per position).

Seed 000 crashed with `tensor a (8) ... tensor b (384) ... dimension 2`: raw
8-feature tokens reached the 384-wide positional table. Here the input is
checked at the model boundary against the layout the model was built for, and
embedding always happens before the table is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

# name -> (depth, hidden size, heads), as in the reference's DiT_models
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (1, 2, 4, 8)
ARCHITECTURES = tuple(f"DiT-{size}/{patch}" for size in DIT_SIZES for patch in PATCH_SIZES)
FREQUENCY_EMBEDDING_SIZE = 256


class InputShapeError(ValueError):
    """A tensor handed to the model does not have the layout the model was built for."""


@dataclass(frozen=True)
class DiTShape:
    """What the model consumes: images (channels x size x size) or token sequences
    (size tokens x channels features), and how many classes condition it."""

    kind: Literal["images", "tokens"]
    channels: int  # image channels, or features per token
    size: int  # image height = width, or sequence length
    num_classes: int

    def sample_shape(self) -> tuple[int, ...]:
        """One sample in the training layout (without the batch axis)."""
        if self.kind == "images":
            return (self.channels, self.size, self.size)
        return (self.size, self.channels)

    @property
    def channel_dim(self) -> int:
        """Axis of a batch that holds channels/features (where learned sigma doubles the width)."""
        return 1 if self.kind == "images" else 2


@dataclass(frozen=True)
class DiTArch:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True


def arch_of(name: str, **overrides) -> DiTArch:
    """`DiT-S/2` -> DiTArch(12, 384, 6, 2)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown DiT architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}.")
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden, heads = DIT_SIZES[size]
    return DiTArch(depth, hidden, heads, int(patch), **overrides)


# ---------------------------------------------------------------------------
# Fixed sin-cos positional tables (MAE's construction, as the reference uses)
# ---------------------------------------------------------------------------


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M, dim) table: sin of position x frequency in the first half, cos in the second."""
    if dim % 2:
        raise ValueError(f"positional table width must be even, got {dim}.")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, dim) table; half the width encodes the row, half the column."""
    # The reference builds its meshgrid with w first, so the first half encodes the column index.
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


# ---------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), D) with a p x p stride-p convolution."""

    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenEmbed(nn.Module):
    """(B, T, F) -> (B, T/p, D): a Linear over the features of p consecutive tokens.

    Tokens stay in the (batch, time, feature) layout the transformer uses, so there
    is no Conv1d (B, F, T) layout to forget to transpose."""

    def __init__(self, features: int, hidden: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(features * patch, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        return self.proj(x.reshape(b, t // self.patch, self.patch * f))


class TimestepEmbedder(nn.Module):
    """Scalar diffusion steps -> D-wide vectors: sinusoidal features, then an MLP."""

    def __init__(self, hidden: int, frequencies: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.frequencies))


class LabelEmbedder(nn.Module):
    """Class ids -> D-wide vectors; id `num_classes` is the null (unconditional) label.

    In training mode a fraction `dropout_prob` of labels is replaced by the null id
    so the same network also learns the unconditional model guidance needs."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads.")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        inner = int(hidden * ratio)
        self.fc1 = nn.Linear(hidden, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Attention and MLP, each pre-normed, modulated (shift, scale) and gated by the condition."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_per_token: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_per_token, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer: (x_t, t, y) -> epsilon (and the variance interpolation when learn_sigma)."""

    def __init__(self, shape: DiTShape, arch: DiTArch):
        super().__init__()
        if shape.size % arch.patch_size:
            raise ValueError(f"size {shape.size} is not divisible by patch size {arch.patch_size}.")
        self.shape, self.arch = shape, arch
        self.out_channels = shape.channels * (2 if arch.learn_sigma else 1)
        hidden, patch = arch.hidden_size, arch.patch_size
        if shape.kind == "images":
            self.x_embedder: nn.Module = PatchEmbed(shape.channels, hidden, patch)
            grid = shape.size // patch
            table = sincos_2d(hidden, grid)
            out_per_token = patch * patch * self.out_channels
        else:
            self.x_embedder = TokenEmbed(shape.channels, hidden, patch)
            table = sincos_1d(hidden, np.arange(shape.size // patch))
            out_per_token = patch * self.out_channels
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(shape.num_classes, hidden, arch.class_dropout_prob)
        # Fixed, not trained; a Parameter (as in the reference) so checkpoints and counts match it.
        self.pos_embed = nn.Parameter(torch.from_numpy(table).float().unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden, arch.num_heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.final_layer = FinalLayer(hidden, out_per_token)
        self._initialize_weights()

    @property
    def null_label(self) -> int:
        return self.shape.num_classes

    def _initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch conv is initialised like the Linear it is.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Raise InputShapeError naming the expected and received shapes."""
        expected = self.shape.sample_shape()
        layout = "(B, C, H, W)" if self.shape.kind == "images" else "(B, T, F) tokens x features"
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            hint = ""
            if self.shape.kind == "tokens" and tuple(x.shape[1:]) == expected[::-1]:
                hint = " (this is the Conv1d (B, F, T) layout: transpose it to (B, T, F))"
            raise InputShapeError(
                f"DiT expects x of shape (B, {', '.join(map(str, expected))}) {layout} but received "
                f"{tuple(x.shape)}{hint}."
            )
        batch = x.shape[0]
        if tuple(t.shape) != (batch,) or tuple(y.shape) != (batch,):
            raise InputShapeError(
                f"DiT expects t and y of shape ({batch},), one per sample of x, but received t {tuple(t.shape)} and y {tuple(y.shape)}."
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens plus the positional table, (B, N, D)."""
        tokens = self.x_embedder(x)
        if tokens.shape[1:] != self.pos_embed.shape[1:]:
            raise InputShapeError(
                f"embedded input has shape {tuple(tokens.shape)} but the positional table is {tuple(self.pos_embed.shape)}."
            )
        return tokens + self.pos_embed

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        b, c, p = out.shape[0], self.out_channels, self.arch.patch_size
        if self.shape.kind == "tokens":
            return out.reshape(b, self.shape.size, c)
        grid = self.shape.size // p
        out = out.reshape(b, grid, grid, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, c, grid * p, grid * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, y)
        h = self.embed(x)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def build_dit(shape: DiTShape, arch: DiTArch | str) -> DiT:
    """A freshly initialised DiT; `arch` is a DiTArch or a name such as 'DiT-S/2'."""
    return DiT(shape, arch_of(arch) if isinstance(arch, str) else arch)


def count_parameters(model: nn.Module) -> int:
    """Every parameter element, the frozen positional table included (the reference's count)."""
    return sum(p.numel() for p in model.parameters())
