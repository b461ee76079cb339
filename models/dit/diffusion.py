"""Gaussian diffusion for DiT: the DDPM forward process, the hybrid training loss
with learned sigma, and DDIM sampling over spaced timesteps with optional
classifier-free guidance.

    diffusion = Diffusion(steps=1000, beta_start=1e-4, beta_end=0.02, channel_dim=1)
    terms = diffusion.training_losses(model, x0, t, y, noise)      # {"loss", "mse", "vb"} per sample
    x = diffusion.ddim_sample(model, shape, y, null_label=10, steps=10, guidance=4.0, generator=g)

Facts from facebookresearch/DiT `diffusion/` (itself from OpenAI's improved
diffusion): linear betas, epsilon prediction, LEARNED_RANGE variance (the
model's second half of channels v in [-1, 1] interpolates the log variance
between the clipped posterior variance and beta), loss = MSE on epsilon + the
variational-bound term in bits in which the mean is a stop-gradient (the vb
term trains only the variance), DDIM with eta 0 on the timesteps that
`space_timesteps(1000, [steps])` keeps. Tables are computed in float64, as in
the reference, then used in float32. Guidance is applied to every epsilon
channel (the standard form; the reference applies it to the first 3 of its 4
latent channels only "for exact reproducibility" of its published numbers).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` timesteps spread evenly over [0, num_timesteps - 1], both ends included."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot sample with {count} steps from a {num_timesteps}-step diffusion.")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    return sorted({int(round(i * stride)) for i in range(count)})


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of x in [-1, 1] quantised to 256 levels (the decoder term at t = 0), in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class Diffusion:
    """A T-step linear-beta diffusion over batches whose channel axis is `channel_dim`."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, channel_dim: int = 1, learn_sigma: bool = True):
        self.num_timesteps = steps
        self.channel_dim = channel_dim
        self.learn_sigma = learn_sigma
        betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.tables = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """tables[name][t] shaped to broadcast against `like` (one value per sample)."""
        values = torch.from_numpy(self.tables[name]).to(like.device)[t].float()
        return values.view(-1, *([1] * (like.dim() - 1)))

    # -- forward process ------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return mean, self._at("posterior_log_variance_clipped", t, xt)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_recip_alphas_cumprod", t, xt) * xt - self._at("sqrt_recipm1_alphas_cumprod", t, xt) * eps

    def split_output(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(epsilon, variance values) from a model output; variance is None without learned sigma."""
        channels = x.shape[self.channel_dim]
        if not self.learn_sigma:
            return out, None
        eps, var = torch.split(out, channels, dim=self.channel_dim)
        return eps, var

    def model_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """LEARNED_RANGE: v in [-1, 1] interpolates between the posterior variance and beta (in log space)."""
        frac = (var_values + 1) / 2
        return frac * self._at("log_betas", t, var_values) + (1 - frac) * self._at("posterior_log_variance_clipped", t, var_values)

    # -- training ---------------------------------------------------------------

    def vb_term(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
        """Per-sample KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits; the decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        model_x0 = self.predict_x0(xt, t, eps)  # not clipped while training, as in the reference
        model_mean, _ = self.q_posterior(model_x0, xt, t)
        model_log_var = self.model_log_variance(var_values, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        decoder_nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample loss terms: mse (epsilon), vb (variance, learned sigma only) and their sum."""
        xt = self.q_sample(x0, t, noise)
        eps, var_values = self.split_output(model(xt, t, y), x0)
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if var_values is not None:
            # The vb term must train the variance only: the mean it sees is a constant.
            terms["vb"] = self.vb_term(x0, xt, t, eps.detach(), var_values)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # -- sampling ---------------------------------------------------------------

    def guided_eps(self, model: Model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null_label: int, guidance: float) -> torch.Tensor:
        """Epsilon for a batch; with guidance > 1 the batch is doubled with null labels and combined."""
        if guidance == 1.0:
            eps, _ = self.split_output(model(x, t, y), x)
            return eps
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
        eps, _ = self.split_output(both, torch.cat([x, x]))
        cond, uncond = eps.chunk(2, dim=0)
        return uncond + guidance * (cond - uncond)

    @torch.no_grad()
    def ddim_sample(
        self, model: Model, shape: tuple[int, ...], y: torch.Tensor, null_label: int, steps: int = 10,
        guidance: float = 1.0, eta: float = 0.0, clip_denoised: bool = True,
        generator: torch.Generator | None = None, device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Samples of `shape` (batch first, any batch size) conditioned on labels `y` of shape (B,)."""
        if y.shape != (shape[0],):
            raise ValueError(f"labels must have shape ({shape[0]},), one per sample, got {tuple(y.shape)}.")
        kept = space_timesteps(self.num_timesteps, steps)
        abar = self.tables["alphas_cumprod"]
        x = torch.randn(shape, generator=generator, device=device)
        y = y.to(device)
        for i in reversed(range(len(kept))):
            t = torch.full((shape[0],), kept[i], dtype=torch.long, device=device)
            eps = self.guided_eps(model, x, t, y, null_label, guidance)
            x0 = self.predict_x0(x, t, eps)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            # Re-derive epsilon from the (clipped) x0, as the reference's DDIM step does.
            eps = (self._at("sqrt_recip_alphas_cumprod", t, x) * x - x0) / self._at("sqrt_recipm1_alphas_cumprod", t, x)
            a_t = float(abar[kept[i]])
            a_prev = float(abar[kept[i - 1]]) if i > 0 else 1.0
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0 and i > 0:
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
        return x
