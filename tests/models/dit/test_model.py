"""The DiT network of models.dit.model: sizes against the reference, layouts, the
seed's crash at the model boundary, adaLN-Zero init and label dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.dit.model import (
    ARCHITECTURES, DiTArch, DiTShape, InputShapeError, build_dit, count_parameters, sincos_1d, sincos_2d,
)

TINY = DiTArch(depth=2, hidden_size=32, num_heads=4, patch_size=2)
TOKENS = DiTShape("tokens", channels=8, size=16, num_classes=5)
IMAGES = DiTShape("images", channels=3, size=8, num_classes=5)


def _count(shape: DiTShape, arch) -> int:
    with torch.device("meta"):
        return count_parameters(build_dit(shape, arch))


def test_dit_s2_has_the_reference_parameter_count():
    # facebookresearch/DiT: DiT-S/2 on 32x32x4 latents, 1000 classes, learned sigma (frozen
    # pos_embed included, as the reference counts it): 32,963,360 = the paper's "33M".
    assert _count(DiTShape("images", 4, 32, 1000), "DiT-S/2") == 32_963_360
    assert _count(DiTShape("images", 4, 32, 1000), "DiT-XL/2") == 675_129_632  # the paper's 675M


def test_seed_000_token_dit_s_has_32_725_648_parameters():
    # DiT-S blocks, Linear(8 -> 384) token embedder, 16-wide learned-sigma head; the label table
    # (classes + null) and the positional table (seq_len rows) together hold 662 rows of 384.
    assert _count(DiTShape("tokens", 8, 651, 10), "DiT-S/1") == 32_725_648


def test_every_reference_name_builds_with_its_size():
    assert {"DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2"} <= set(ARCHITECTURES)
    with torch.device("meta"):
        model = build_dit(DiTShape("images", 4, 32, 10), "DiT-B/4")
    assert len(model.blocks) == 12 and model.pos_embed.shape == (1, 64, 768)
    assert model.blocks[0].attn.heads == 12


@pytest.mark.parametrize("shape", [TOKENS, IMAGES], ids=["tokens", "images"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_output_has_twice_the_channels_in_the_input_layout(shape, batch):
    model = build_dit(shape, TINY)
    x = torch.randn(batch, *shape.sample_shape())
    out = model(x, torch.randint(0, 1000, (batch,)), torch.randint(0, 5, (batch,)))
    expected = list(x.shape)
    expected[shape.channel_dim] *= 2
    assert list(out.shape) == expected


def test_seed_crash_conv1d_layout_is_refused_at_the_boundary_naming_both_shapes():
    model = build_dit(TOKENS, DiTArch(2, 384, 6, 1))
    conv1d_layout = torch.randn(2, 8, 16)  # (B, F, T): what an untransposed Conv1d pipeline feeds
    with pytest.raises(InputShapeError) as caught:
        model(conv1d_layout, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    message = str(caught.value)
    assert "(B, 16, 8)" in message and "(2, 8, 16)" in message and "transpose" in message


def test_seed_crash_raw_8_feature_tokens_are_embedded_before_the_384_wide_table():
    model = build_dit(TOKENS, DiTArch(2, 384, 6, 1))
    raw = torch.randn(2, 16, 8)  # un-embedded tokens: the model embeds them itself
    assert model.embed(raw).shape == (2, 16, 384)
    assert model(raw, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)).shape == (2, 16, 16)


@pytest.mark.parametrize("bad", [(2, 16, 384), (2, 16), (2, 3, 8, 8)])
def test_other_wrong_token_layouts_are_refused(bad):
    model = build_dit(TOKENS, TINY)
    with pytest.raises(InputShapeError, match=r"expects x of shape \(B, 16, 8\)"):
        model(torch.randn(*bad), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_timesteps_and_labels_must_match_the_batch():
    model = build_dit(IMAGES, TINY)
    x = torch.randn(3, 3, 8, 8)
    with pytest.raises(InputShapeError, match=r"t and y of shape \(3,\)"):
        model(x, torch.zeros(8, dtype=torch.long), torch.zeros(3, dtype=torch.long))  # t sized by a training batch
    with pytest.raises(InputShapeError, match="received"):
        model(torch.randn(3, 8, 8, 3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_adaln_zero_init_makes_blocks_identity_and_output_zero():
    torch.manual_seed(0)
    model = build_dit(IMAGES, TINY)
    x = torch.randn(4, 3, 8, 8)
    t, y = torch.randint(0, 1000, (4,)), torch.randint(0, 5, (4,))
    assert torch.count_nonzero(model(x, t, y)) == 0
    h = model.embed(x)
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks:
        torch.testing.assert_close(block(h, c), h, rtol=0, atol=0)
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0


def test_positional_table_is_fixed_sincos_and_not_trained():
    model = build_dit(IMAGES, TINY)
    assert not model.pos_embed.requires_grad
    grid = IMAGES.size // TINY.patch_size
    np.testing.assert_allclose(model.pos_embed[0].numpy(), sincos_2d(32, grid), atol=1e-6)
    table = sincos_1d(8, np.arange(3))
    np.testing.assert_allclose(table[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(table[1, 0], np.sin(1.0))
    token_model = build_dit(TOKENS, TINY)
    np.testing.assert_allclose(token_model.pos_embed[0].numpy(), sincos_1d(32, np.arange(8)), atol=1e-6)


def test_pos_embed_gets_no_update_from_training():
    model = build_dit(IMAGES, TINY)
    before = model.pos_embed.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        out = model(torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 5, (2,)))
        ((out - 1) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert model.pos_embed.grad is None
    torch.testing.assert_close(model.pos_embed, before, rtol=0, atol=0)


def test_label_dropout_uses_the_null_row_only_in_training():
    model = build_dit(IMAGES, DiTArch(2, 32, 4, 2, class_dropout_prob=0.999999))
    assert model.y_embedder.embedding_table.num_embeddings == 6  # 5 classes + null
    labels = torch.arange(5)
    null = model.y_embedder.embedding_table.weight[5]
    model.train()
    torch.testing.assert_close(model.y_embedder(labels), null.expand(5, -1))
    model.eval()
    torch.testing.assert_close(model.y_embedder(labels), model.y_embedder.embedding_table.weight[:5])


def test_no_null_row_without_label_dropout():
    model = build_dit(IMAGES, DiTArch(2, 32, 4, 2, class_dropout_prob=0.0))
    assert model.y_embedder.embedding_table.num_embeddings == 5


def test_patch_grid_layout_round_trips_through_unpatchify():
    # A final layer that copies each patch's pixels back must give the input again:
    # checks that patchify (conv) and unpatchify agree on the pixel order.
    arch = DiTArch(1, 48, 4, 2, learn_sigma=False)
    model = build_dit(DiTShape("images", 3, 8, 5), arch)
    x = torch.randn(2, 3, 8, 8)
    patches = x.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    torch.testing.assert_close(model.unpatchify(patches), x)
    token_model = build_dit(DiTShape("tokens", 8, 16, 5), DiTArch(1, 48, 4, 4, learn_sigma=False))
    seq = torch.randn(2, 16, 8)
    torch.testing.assert_close(token_model.unpatchify(seq.reshape(2, 4, 32)), seq)
