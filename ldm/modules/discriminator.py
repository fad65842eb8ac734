"""PatchGAN discriminator, hinge losses and the adaptive generator weight (plain torch).

- NLayerDiscriminator: the 70x70 PatchGAN of Isola et al. 2017 (pix2pix, arXiv 1611.07004),
  as used by Esser et al. 2021 (Taming Transformers) and the CompVis LDM autoencoders.
- Hinge loss: Lim & Ye 2017 (Geometric GAN), Miyato et al. 2018 Eq. 16-17.
- Adaptive weight: Esser et al. 2021 Eq. 7, lambda = ||grad_L L_rec|| / (||grad_L L_GAN|| + 1e-4)
  with L the last decoder layer.
"""

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """x (B, in_channels, H, W) -> patch logits (B, 1, H', W').

    `n_layers` stride-2 convs; the 32x32 default data supports n_layers <= 3. BatchNorm as in
    pix2pix; use `sync_batchnorm` in the trainer config under DDP."""

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"n_layers={n_layers} and ndf={ndf} must be >= 1")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_pix2pix_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _pix2pix_init(m: nn.Module) -> None:
    """N(0, 0.02) conv weights, N(1, 0.02) norm scales (Radford et al. 2016, DCGAN)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """Esser et al. 2021 Eq. 7: balance the GAN gradient against the reconstruction gradient at
    the last decoder layer. Returns a detached scalar in [0, max_weight]; the graph is kept."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
