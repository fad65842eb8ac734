"""Building blocks shared by the stage-1 encoder/decoder and the stage-2 UNet (plain torch).

One vocabulary for both networks: `group_norm`, `ResBlock`, `AttentionBlock` (the autoencoder's
single-head `ConvAttentionBlock`), `Downsample`, `Upsample`. The autoencoder follows Esser et al.
2021 (Taming Transformers) / Rombach et al. 2022; the UNet follows Dhariwal & Nichol 2021 (ADM).
Where the two papers' blocks differ, an argument says how (`emb_dim` for ADM's residual block,
`asymmetric_padding` for Taming's downsampling). Parameter names, and so the state_dict keys of
checkpoints, are those both networks always had.
"""

from __future__ import annotations

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


def group_norm(channels: int, num_groups: int | None = None, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm over `channels`: `num_groups` groups (must divide `channels`), or None to pick
    them with `num_groups_for` (the autoencoder, which also uses eps=1e-6 as Taming/LDM do)."""
    if num_groups is None:
        num_groups = num_groups_for(channels)
    elif channels % num_groups:
        raise ValueError(
            f"norm_num_groups={num_groups} does not divide {channels} channels; "
            "choose model_channels * channel_mult divisible by norm_num_groups"
        )
    return nn.GroupNorm(num_groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts as the identity (ADM, Sec. 3)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): (GroupNorm, SiLU, conv3x3) x 2 plus a 1x1
    skip when the channel count changes.

    With `emb_dim` it is ADM's block (Dhariwal & Nichol 2021, Sec. 3 and App. A): the second
    GroupNorm is modulated by the time (+ class) embedding, h = GN(h) * (1 + scale) + shift
    ("AdaGN"), and the output conv starts at zero so the block starts as the identity. Without,
    it is the Taming/LDM autoencoder's block (default init, no embedding).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        emb_dim: int | None = None,
        dropout: float = 0.0,
        num_groups: int | None = None,
        eps: float = 1e-5,
    ):
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        # Creation order = parameter init order (seeded runs) and state_dict order: keep it.
        self.norm1 = group_norm(in_ch, num_groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = None if emb_dim is None else nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, num_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if emb_dim is not None:
            zero_module(self.conv2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))  # (B, out, H, W)
        if self.emb_proj is not None:
            # 2 x (B, out, 1, 1)
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions with a residual connection (Vaswani et al.
    2017; DDPM App. B), computed with `F.scaled_dot_product_attention` (fused/flash kernels where
    available). The output projection starts at zero (ADM), so the block starts as the identity.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int | None = None):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide {channels} channels")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # The 1x1 convolutions are applied as matmuls over the (B, HW, C) tokens (same weights,
        # same result up to float rounding): on CPU a 1x1 conv costs several times a matmul, and
        # the token layout feeds SDPA's fused kernel instead of its unfused math fallback.
        b, c, h, w = x.shape
        nh = self.num_heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, HW, 3C)
        # 3 x (B, nh, HW, d)
        q, k, v = qkv.view(b, h * w, 3, nh, c // nh).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, d)
        out = out.transpose(1, 2).reshape(b, h * w, c)  # (B, HW, C)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class ConvAttentionBlock(nn.Module):
    """Single-head self-attention with a residual connection, its 1x1 projections run as convs:
    the autoencoder's attention (Taming/LDM; default init, GroupNorm eps 1e-6).

    The same maths as `AttentionBlock` with one head and the same parameters, but computed in the
    (B, C, HW) layout: the outputs differ at float rounding (~2e-7), so the autoencoders trained
    with it keep this computation and reproduce bit for bit.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = group_norm(channels, eps=eps)
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
    """Halve H and W with a stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2). Padding 1 on every
    side (ADM), or with `asymmetric_padding` right/bottom only (Taming/LDM autoencoders)."""

    def __init__(self, channels: int, asymmetric_padding: bool = False):
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        padding = 0 if asymmetric_padding else 1
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation then a 3x3 conv (avoids the checkerboard
    artefacts of transposed convs, Odena et al. 2016): (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
