"""Convolutional encoder/decoder of the stage-1 autoencoder (plain torch).

Architecture of Esser et al. 2021 ("Taming Transformers", arXiv 2012.09841) as used by
Rombach et al. 2022 (LDM, arXiv 2112.10752, Sec. 3.1 / App. G): ResNet blocks with GroupNorm
and SiLU, strided-conv downsampling, nearest-neighbour upsampling, one self-attention block in
the middle. The downsampling factor is f = 2 ** (len(ch_mult) - 1).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def num_groups_for(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Number of GroupNorm groups for `channels`: the largest divisor of `channels` that is at most
    `max_groups` and leaves at least `min_channels_per_group` channels per group (or 1 group), so
    that narrow CPU-sized nets (e.g. 16 or 32 channels) still normalise over several channels."""
    upper = max(1, min(max_groups, channels // min_channels_per_group))
    for g in range(upper, 0, -1):
        if channels % g == 0:
            return g
    return 1


def normalization(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) x 2 plus a 1x1 skip when the
    channel count changes (He et al. 2016, as in the Taming/LDM autoencoders)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = normalization(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalization(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (Vaswani et al. 2017), over
    all H*W positions, computed with `scaled_dot_product_attention`."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalization(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # 3 x (B, C, HW)
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv; pad right/bottom only, as in Taming/LDM."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation then a 3x3 conv (avoids checkerboard
    artefacts of transposed convs, Odena et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


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
        layers = [ResnetBlock(channels, channels, dropout)]
        if attention:
            layers.append(AttnBlock(channels))
        layers.append(ResnetBlock(channels, channels, dropout))
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
                blocks.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(c_in))
        self.down = nn.Sequential(*blocks)
        self.mid = _MidBlock(c_in, mid_attention, dropout)
        self.norm_out = normalization(c_in)
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
                blocks.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
            if level != 0:
                blocks.append(Upsample(c_in))
        self.up = nn.Sequential(*blocks)
        self.norm_out = normalization(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output conv: the adaptive GAN weight is computed from gradients here."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        h = self.up(h)  # (B, ch * ch_mult[0], h*f, w*f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h*f, w*f)
