"""UNet denoiser for latents: time/class-conditioned ResNet blocks with self-attention (plain
torch).

Architecture after Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", arXiv 2006.11239,
Appendix B) with the improvements of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image
Synthesis", arXiv 2105.05233, Sec. 3 "ADM"): adaptive GroupNorm (scale-shift FiLM conditioning),
multi-head attention at chosen resolutions, zero-initialised residual output convolutions, and a
learned class embedding with a reserved "null" row for classifier-free guidance (Ho & Salimans 2022,
arXiv 2207.12598).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import SpatialTransformer


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (Vaswani et al. 2017, Sec. 3.5; DDPM App.
    B).

    Frequencies are geometric from 1 down to 1/max_period; the first half is cos, the second sin.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts as the identity (ADM, Sec. 3)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    if channels % num_groups:
        raise ValueError(
            f"norm_num_groups={num_groups} does not divide {channels} channels; "
            "choose model_channels * channel_mult divisible by norm_num_groups"
        )
    return nn.GroupNorm(num_groups, channels)


class ResBlock(nn.Module):
    """Residual block with adaptive GroupNorm: h = GN(h) * (1 + scale) + shift, (scale, shift)
    from the time (+ class) embedding (ADM "AdaGN", Dhariwal & Nichol 2021, Sec. 3 and Eq. in
    App. A).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(
            2, dim=1
        )  # 2 x (B, out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (Vaswani et al. 2017; DDPM App. B), computed
    with `F.scaled_dot_product_attention` (fused/flash kernels where available)."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
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
        q, k, v = (
            qkv.view(b, h * w, 3, nh, c // nh).permute(2, 0, 3, 1, 4).unbind(0)
        )  # 3 x (B, nh, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, d)
        out = out.transpose(1, 2).reshape(b, h * w, c)  # (B, HW, C)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class Downsample(nn.Module):
    """Strided 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Time- and class-conditioned UNet predicting the schedule's target (eps, x0 or v) for x_t.

    Args:
        in_channels / out_channels: latent channels in and out (equal for a denoiser).
        model_channels: width of level 0; level i has `model_channels * channel_mult[i]` channels.
        channel_mult: one entry per resolution level; each level after the first halves H and W.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up, for the skips).
        attention_levels: indices into `channel_mult` whose blocks get self-attention; the middle
            block always has one.
        num_heads: attention heads (must divide the channels of every attention level).
        dropout: dropout inside ResBlocks.
        num_classes: None for an unconditional model; otherwise labels 0..num_classes-1 and the
            extra row `num_classes` is the null class used for classifier-free guidance.
        gradient_checkpointing: recompute block activations in backward (less memory, ~30% slower).
        norm_num_groups: GroupNorm groups (must divide every block's channels).
        context_dim: width D of a cross-attention context (B, L, D) (text conditioning): the
            attention blocks become SpatialTransformers (self-attention, cross-attention to the
            context, feed-forward; ldm.modules.attention). None: plain self-attention blocks.
        transformer_depth: transformer blocks per SpatialTransformer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        gradient_checkpointing: bool = False,
        norm_num_groups: int = 32,
        context_dim: int | None = None,
        transformer_depth: int = 1,
    ):
        super().__init__()
        channel_mult, attention_levels = list(channel_mult), list(attention_levels)
        if not channel_mult or min(channel_mult) <= 0:
            raise ValueError(
                f"channel_mult={channel_mult} must be a non-empty list of positive ints"
            )
        bad_levels = [i for i in attention_levels if not 0 <= i < len(channel_mult)]
        if bad_levels:
            raise ValueError(
                f"attention_levels={attention_levels} has {bad_levels}; valid levels are "
                f"0..{len(channel_mult) - 1} (indices into channel_mult)"
            )
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks={num_res_blocks} must be >= 1")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be None or >= 1")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.context_dim = context_dim
        self.num_levels = len(channel_mult)
        self.gradient_checkpointing = gradient_checkpointing
        emb_dim = 4 * model_channels
        groups = norm_num_groups

        def attention(ch: int) -> nn.Module:
            if context_dim is None:
                return AttentionBlock(ch, num_heads, groups)
            return SpatialTransformer(ch, num_heads, groups, context_dim, transformer_depth)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # Row `num_classes` is the learned null (unconditional) embedding for CFG.
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, model_channels * mult, emb_dim, dropout, groups)]
                ch = model_channels * mult
                if level in attention_levels:
                    blocks.append(attention(ch))
                self.down.append(nn.ModuleList(blocks))
                skip_channels.append(ch)
            if level != self.num_levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, dropout, groups),
                attention(ch),
                ResBlock(ch, ch, emb_dim, dropout, groups),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [
                    ResBlock(
                        ch + skip_channels.pop(), model_channels * mult, emb_dim, dropout, groups
                    )
                ]
                ch = model_channels * mult
                if level in attention_levels:
                    blocks.append(attention(ch))
                if level != 0 and i == num_res_blocks:
                    blocks.append(Upsample(ch))
                self.up.append(nn.ModuleList(blocks))

        self.norm_out = group_norm(ch, groups)
        # Zero output: the untrained net predicts 0 (the mean of eps/v/x0 targets) -> stable start.
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))

    def embed(self, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Time (+ class) embedding (B, 4 * model_channels); labels None -> the null class."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))  # (B, E)
        if self.class_embed is None:
            if class_labels is not None:
                raise ValueError(
                    "class_labels given but the UNet is unconditional (num_classes=None)"
                )
            return emb
        if class_labels is None:
            class_labels = torch.full_like(t, self.num_classes)
        return emb + self.class_embed(class_labels)  # (B, E)

    def run_block(
        self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: tuple
    ) -> torch.Tensor:
        args = context if isinstance(block, SpatialTransformer) else (emb,)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, *args, use_reentrant=False)
        return block(h, *args)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W), t LongTensor (B,) -> prediction (B, C_out, H, W).

        `class_labels` LongTensor (B,) may contain `num_classes` (the null class); None means all
        null. `context` (B, L, context_dim) and `context_mask` (B, L) bool (True = real token,
        None = all real): the cross-attention condition, required when `context_dim` is set.
        """
        stride = 2 ** (self.num_levels - 1)
        if x.shape[-1] % stride or x.shape[-2] % stride:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is not divisible by {stride} "
                f"(2 ** (len(channel_mult) - 1))"
            )
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected ({x.shape[0]},)")
        emb = self.embed(t, class_labels)  # (B, E)
        if (context is None) != (self.context_dim is None):
            raise ValueError(
                f"the UNet has context_dim={self.context_dim} but context is "
                f"{'None' if context is None else tuple(context.shape)}"
            )
        if context is not None and (context.ndim != 3 or context.shape[-1] != self.context_dim):
            raise ValueError(
                f"context has shape {tuple(context.shape)}; expected (B, L, {self.context_dim})"
            )
        ctx = (context, context_mask)

        h = self.conv_in(x)  # (B, mc, H, W)
        skips = [h]
        for blocks in self.down:
            for block in blocks:
                h = self.run_block(block, h, emb, ctx)  # (B, mc * mult, H / 2^level, W / 2^level)
            skips.append(h)
        for block in self.mid:
            h = self.run_block(block, h, emb, ctx)  # (B, mc * mult[-1], H / stride, W / stride)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, ch + skip_ch, h, w)
            for block in blocks:
                h = self.run_block(block, h, emb, ctx)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
