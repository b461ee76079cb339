"""The diffusion process of models.dit.diffusion: schedule, hybrid loss with the
stop-gradient, DDIM correctness, guidance, any batch size, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from models.dit.diffusion import Diffusion, space_timesteps
from models.dit.model import DiTArch, DiTShape, build_dit


def test_linear_schedule_matches_ddpm():
    d = Diffusion(1000, 1e-4, 0.02)
    betas = d.tables["betas"]
    assert len(betas) == 1000 and betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert d.tables["alphas_cumprod"][-1] == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)
    assert d.tables["alphas_cumprod"][-1] < 1e-4  # x_T is (almost) pure noise


def test_spaced_timesteps_cover_both_ends_like_the_reference():
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 1) == [0]
    assert len(space_timesteps(1000, 50)) == 50 and space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="1001 steps"):
        space_timesteps(1000, 1001)


class _Output(torch.nn.Module):
    """A 'model' whose output is a trainable tensor: lets a test see which half gets gradients."""

    def __init__(self, shape):
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(shape) * 0.1)

    def forward(self, x, t, y):
        return self.out


def test_hybrid_loss_is_finite_and_vb_trains_only_the_variance():
    torch.manual_seed(0)
    d = Diffusion(1000, channel_dim=1)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, 500, 999])  # t = 0 takes the decoder NLL branch
    model = _Output((4, 6, 8, 8))
    terms = d.training_losses(model, x0, t, torch.zeros(4, dtype=torch.long), torch.randn_like(x0))
    assert set(terms) == {"loss", "mse", "vb"}
    for value in terms.values():
        assert value.shape == (4,) and torch.isfinite(value).all()
    assert (terms["vb"] > 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    eps_grad, var_grad = model.out.grad[:, :3], model.out.grad[:, 3:]
    assert torch.count_nonzero(eps_grad) == 0  # stop-gradient on the mean
    assert torch.count_nonzero(var_grad) > 0


def test_without_learned_sigma_the_loss_is_plain_mse():
    d = Diffusion(1000, channel_dim=2, learn_sigma=False)
    x0 = torch.zeros(2, 5, 4)
    noise = torch.ones_like(x0)
    terms = d.training_losses(lambda x, t, y: torch.zeros_like(x), x0, torch.tensor([3, 4]), torch.zeros(2, dtype=torch.long), noise)
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["loss"], torch.ones(2))


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_with_the_true_epsilon_recovers_the_data(steps):
    # For data that is a single point x*, the exact epsilon at x_t is known in closed form;
    # deterministic DDIM (eta 0) must then land on x* from any noise.
    d = Diffusion(1000, channel_dim=1)
    target = torch.linspace(-0.9, 0.9, 12).reshape(1, 3, 2, 2)
    abar = torch.from_numpy(d.tables["alphas_cumprod"]).float()

    def oracle(x, t, y):
        a = abar[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    out = d.ddim_sample(oracle, (5, 3, 2, 2), torch.zeros(5, dtype=torch.long), null_label=1, steps=steps,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(5, -1, -1, -1), atol=2e-3, rtol=0)


def test_guidance_combines_conditional_and_null_predictions():
    d = Diffusion(1000, channel_dim=2)
    seen = []

    def model(x, t, y):
        seen.append(y.clone())
        eps = torch.where(y.view(-1, 1, 1) == 7, torch.zeros_like(x), torch.ones_like(x))  # null -> 0, class -> 1
        return torch.cat([eps, eps], dim=2)

    x, t, y = torch.randn(3, 4, 2), torch.full((3,), 10), torch.tensor([0, 1, 2])
    eps = d.guided_eps(model, x, t, y, null_label=7, guidance=4.0)
    torch.testing.assert_close(eps, torch.full_like(x, 4.0))  # 0 + 4 * (1 - 0)
    assert seen[-1].tolist() == [0, 1, 2, 7, 7, 7]  # batch doubled with the null label
    torch.testing.assert_close(d.guided_eps(model, x, t, y, 7, 1.0), torch.ones_like(x))
    assert seen[-1].tolist() == [0, 1, 2]  # no doubling without guidance


@pytest.mark.parametrize("kind", ["images", "tokens"])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ddim_samples_any_batch_in_the_training_layout(kind, batch, guidance):
    shape = DiTShape(kind, 3 if kind == "images" else 8, 8, 4)
    torch.manual_seed(0)
    model = build_dit(shape, DiTArch(1, 32, 4, 2)).eval()
    d = Diffusion(1000, channel_dim=shape.channel_dim)
    out = d.ddim_sample(model, (batch, *shape.sample_shape()), torch.arange(batch) % 4, null_label=4, steps=3,
                        guidance=guidance, generator=torch.Generator().manual_seed(1))
    assert out.shape == (batch, *shape.sample_shape()) and torch.isfinite(out).all()


def test_ddim_same_seed_is_bitwise_reproducible_and_another_seed_differs():
    torch.manual_seed(0)
    shape = DiTShape("images", 1, 8, 4)
    model = build_dit(shape, DiTArch(2, 32, 4, 2)).eval()
    with torch.no_grad():  # make the model non-trivial: adaLN-Zero would output zeros
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    d = Diffusion(1000, channel_dim=1)

    def run(seed, eta=0.0):
        return d.ddim_sample(model, (3, 1, 8, 8), torch.tensor([0, 1, 2]), 4, steps=10, guidance=4.0, eta=eta,
                             generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert torch.equal(run(5, eta=1.0), run(5, eta=1.0))
    assert not torch.equal(run(0), run(1))
    assert not torch.equal(run(5, eta=1.0), run(5, eta=0.0))


def test_labels_must_be_one_per_sample():
    d = Diffusion(1000)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        d.ddim_sample(lambda x, t, y: x, (2, 1, 4, 4), torch.zeros(8, dtype=torch.long), 1)
