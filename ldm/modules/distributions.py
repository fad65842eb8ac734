"""Diagonal Gaussian posterior q(z|x) of the KL-regularised autoencoder (plain torch).

Kingma & Welling 2014 ("Auto-Encoding Variational Bayes", arXiv 1312.6114): reparameterised
sampling z = mean + std * eps and the closed-form KL to N(0, I) (their App. B).
"""

import torch


class DiagonalGaussian:
    """Built from the encoder output `parameters` (B, 2C, h, w) = [mean, logvar] along dim 1."""

    def __init__(self, parameters: torch.Tensor):
        if parameters.dim() < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                f"parameters of shape {tuple(parameters.shape)} need an even channel dim 1"
            )
        self.mean, logvar = parameters.chunk(2, dim=1)  # 2 x (B, C, h, w)
        # Clamp as CompVis does so exp() stays finite early in training.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps  # (B, C, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over all but the batch dim."""
        kl = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)  # (B,)
