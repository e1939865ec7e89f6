"""DDPM as DiT trains and samples it: linear betas, T = 1000, ε-prediction, learned Σ.

Training (``loss_terms``), for x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε:

* ``mse``: mean over pixels of (ε_θ - ε)², on the model's first C output channels;
* ``vb`` (only when the model outputs 2C channels, "learned sigma"): the variational bound
  term for the variance, in bits per dimension, with the mean's gradient stopped (so only the
  variance channels learn from it, as in Nichol & Dhariwal's hybrid loss that DiT uses):
  KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) for t > 0 and the discretised-Gaussian
  decoder NLL of x_0 for t = 0. The variance is interpolated in log space between the
  posterior variance β̃_t and β_t by the model's output v ∈ [-1, 1]:
  log Σ = ½(v + 1)·log β_t + ½(1 - v)·log β̃_t  ("learned range").
* ``loss`` = mse + vb, per sample (the caller averages).

``loss`` (the original simple API) is kept: the plain ε-MSE on a random t.

Sampling runs through diffusers' ``DDPMScheduler`` (``variance_type="learned_range"``) and
``DDIMScheduler`` built from this schedule's betas (``kind_fast.train.sampling.make_scheduler``);
``space_timesteps`` is the DDPM respacing it uses (ADM's: evenly spaced, both ends kept).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _bcast(v: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """Gather a float64 schedule vector at t and shape it to broadcast against ``like``."""
    return v.to(like.device)[t].to(torch.float32).view(-1, *([1] * (like.dim() - 1)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor,
                                        bin_width: float = 2.0 / 255.0) -> Tensor:
    """log P(x) of data in [-1, 1] quantised into bins of ``bin_width`` under N(mean, e^{2·log_scale}).

    The edge bins extend to ±∞. Elementwise, in nats.
    """
    inv = torch.exp(-log_scale)
    hi = torch.special.ndtr((x - mean + bin_width / 2) * inv)
    lo = torch.special.ndtr((x - mean - bin_width / 2) * inv)
    cdf_hi = torch.where(x > 1.0 - 1e-3, torch.ones_like(hi), hi)
    cdf_lo = torch.where(x < -1.0 + 1e-3, torch.zeros_like(lo), lo)
    return torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps spread evenly over [0, num_timesteps - 1] (both ends kept)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_timesteps}], got {steps!r}")
    if steps == 1:
        return [num_timesteps - 1]
    return sorted({round(i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)})


class GaussianDiffusion:
    """Linear-beta DDPM schedule (float64 tables) with DiT's training loss (sampling: diffusers).

    Args:
        num_timesteps, beta_start, beta_end: the linear schedule (DiT: 1000, 1e-4, 0.02).
        betas: explicit betas instead.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 *, betas: Tensor | None = None):
        if betas is None:
            if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
                raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
            if not 0 < beta_start <= beta_end < 1:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        betas = betas.to(torch.float64)
        self.num_timesteps = n = betas.shape[0]
        self.betas = betas
        ac = torch.cumprod(1.0 - betas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, ac_prev
        self.sqrt_ac = ac.sqrt().float()  # float32 copies: the original API
        self.sqrt_1m_ac = (1.0 - ac).sqrt().float()
        self.sqrt_recip_ac = (1.0 / ac).sqrt()
        self.sqrt_recipm1_ac = (1.0 / ac - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # β̃_0 = 0: clip the log at t = 0 to β̃_1 (as improved DDPM does)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if n > 1 else torch.log(betas)
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac)

    # ------------------------------------------------------------------ schedule
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε."""
        a = self.sqrt_ac.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        s = self.sqrt_1m_ac.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return a * x0 + s * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log variance of q(x_{t-1} | x_t, x_0)."""
        mean = _bcast(self.posterior_mean_coef1, t, xt) * x0 + _bcast(self.posterior_mean_coef2, t, xt) * xt
        return mean, _bcast(self.posterior_log_variance_clipped, t, xt).expand_as(xt)

    def predict_x0(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return _bcast(self.sqrt_recip_ac, t, xt) * xt - _bcast(self.sqrt_recipm1_ac, t, xt) * eps

    def split_output(self, out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """(ε, variance values or None) from a model output of C or 2C channels."""
        if out.shape[1] == channels:
            return out, None
        if out.shape[1] == 2 * channels:
            return out[:, :channels], out[:, channels:]
        raise ValueError(f"model output has {out.shape[1]} channels; expected {channels} or {2 * channels}")

    def p_mean_variance(self, out: Tensor, xt: Tensor, t: Tensor) -> dict[str, Tensor]:
        """p_θ(x_{t-1} | x_t) from a model output (the VB term's model side): mean, log variance,
        predicted x_0 and ε."""
        eps, v = self.split_output(out.float(), xt.shape[1])
        if v is None:  # fixed variance: β̃_t (DDPM's "fixed small")
            log_var = _bcast(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        else:
            frac = (v + 1.0) / 2.0
            log_var = (frac * _bcast(torch.log(self.betas), t, xt)
                       + (1.0 - frac) * _bcast(self.posterior_log_variance_clipped, t, xt))
        x0 = self.predict_x0(xt, t, eps)
        mean, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "log_var": log_var, "pred_x0": x0, "eps": eps}

    # ------------------------------------------------------------------ training
    def loss_terms(self, out: Tensor, x0: Tensor, xt: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """Per-sample (N,) ``mse``, ``vb`` (zeros without learned sigma) and ``loss``, float32."""
        eps, v = self.split_output(out, x0.shape[1])
        dims = tuple(range(1, x0.dim()))
        mse = ((eps.float() - noise.float()) ** 2).mean(dims)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            frozen = torch.cat([eps.detach(), v], dim=1)  # the VB term trains the variance only
            p = self.p_mean_variance(frozen, xt.float(), t)
            q_mean, q_log_var = self.q_posterior(x0.float(), xt.float(), t)
            kl = normal_kl(q_mean, q_log_var, p["mean"], p["log_var"]).mean(dims) / math.log(2.0)
            nll = -discretized_gaussian_log_likelihood(x0.float(), p["mean"], 0.5 * p["log_var"])
            nll = nll.mean(dims) / math.log(2.0)
            vb = torch.where(t == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def loss(self, model, x0: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The simple objective: ε-MSE on the first C channels at a uniformly drawn t."""
        n = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (n,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        out = model(self.q_sample(x0, t, noise), t, y)
        return F.mse_loss(out[:, : x0.shape[1]].float(), noise.float())
