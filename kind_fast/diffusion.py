"""DDPM noise schedule and training loss, as DiT trains (linear betas, T = 1000, ε-prediction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class GaussianDiffusion:
    """Linear-beta DDPM schedule; ``loss`` is the ε-prediction MSE on the model's first C channels."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps = num_timesteps
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_ac = alphas_cumprod.sqrt().float()
        self.sqrt_1m_ac = (1.0 - alphas_cumprod).sqrt().float()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a = self.sqrt_ac.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        s = self.sqrt_1m_ac.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return a * x0 + s * noise

    def loss(self, model, x0: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (n,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        out = model(self.q_sample(x0, t, noise), t, y)
        return F.mse_loss(out[:, : x0.shape[1]].float(), noise.float())
