"""Convolutional encoder/decoder networks of the stage-1 autoencoder (plain torch nn.Modules).

The LightningModules that train them (KL / VQ autoencoders, losses, optimizers) are in
`ldm.models.autoencoder`; the blocks are shared with the UNet (`ldm.modules.blocks`).

Architecture of Esser et al. 2021 ("Taming Transformers", arXiv 2012.09841) as used by
Rombach et al. 2022 (LDM, arXiv 2112.10752, Sec. 3.1 / App. G): ResNet blocks with GroupNorm
and SiLU, strided-conv downsampling, nearest-neighbour upsampling, one self-attention block in
the middle. The downsampling factor is f = 2 ** (len(ch_mult) - 1).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.blocks import ConvAttentionBlock, Downsample, ResBlock, Upsample, group_norm

# Taming/LDM autoencoders normalise with eps=1e-6 (PyTorch's default is 1e-5).
EPS = 1e-6


def _check_arch(ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int) -> tuple:
    ch_mult = tuple(int(m) for m in ch_mult)
    if len(ch_mult) == 0 or any(m <= 0 for m in ch_mult):
        raise ValueError(f"ch_mult={list(ch_mult)} must be a non-empty list of positive ints")
    for name, value in (("ch", ch), ("num_res_blocks", num_res_blocks), ("z_channels", z_channels)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be a positive int")
    return ch_mult


class _MidBlock(nn.Sequential):
    def __init__(self, channels: int, attention: bool, dropout: float):
        layers = [ResBlock(channels, channels, dropout=dropout, eps=EPS)]
        if attention:
            layers.append(ConvAttentionBlock(channels, eps=EPS))
        layers.append(ResBlock(channels, channels, dropout=dropout, eps=EPS))
        super().__init__(*layers)


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, z_channels * (2 if double_z else 1), H/f, W/f).

    `double_z=True` outputs mean and log-variance of a diagonal Gaussian (KL autoencoder)."""

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        double_z: bool = True,
        mid_attention: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        ch_mult = _check_arch(ch, ch_mult, num_res_blocks, z_channels)
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.out_channels = 2 * z_channels if double_z else z_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        c_in = ch
        for level, mult in enumerate(ch_mult):
            c_out = ch * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c_in, c_out, dropout=dropout, eps=EPS))
                c_in = c_out
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(c_in, asymmetric_padding=True))
        self.down = nn.Sequential(*blocks)
        self.mid = _MidBlock(c_in, mid_attention, dropout)
        self.norm_out = group_norm(c_in, eps=EPS)
        self.conv_out = nn.Conv2d(c_in, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.conv_in(x))  # (B, ch * ch_mult[-1], H/f, W/f)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H/f, W/f)


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> x (B, out_channels, h*f, w*f); mirror of `Encoder` with
    num_res_blocks + 1 blocks per level as in Taming/LDM. No output activation: images live in
    [-1, 1] and the reconstruction loss pulls the output there."""

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        mid_attention: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        ch_mult = _check_arch(ch, ch_mult, num_res_blocks, z_channels)
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.upsample_factor = 2 ** (len(ch_mult) - 1)

        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _MidBlock(c_in, mid_attention, dropout)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c_in, c_out, dropout=dropout, eps=EPS))
                c_in = c_out
            if level != 0:
                blocks.append(Upsample(c_in))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(c_in, eps=EPS)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output conv: the adaptive GAN weight is computed from gradients here."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        h = self.up(h)  # (B, ch * ch_mult[0], h*f, w*f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h*f, w*f)
