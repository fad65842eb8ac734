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
from ldm.modules.blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    zero_module,
)


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
        concat_channels: channels of a spatially aligned condition (forward's `concat`, on the
            latent grid) stacked onto x before the first convolution, which then takes
            `in_channels + concat_channels` inputs (Rombach et al. 2022, Sec. 3.3; CompVis
            `conditioning_key: concat`); 0: none (the layout of every older checkpoint). A list is
            summed, so configs can name the parts (inpainting: [latent_channels, 1] for the
            masked-image latent and the mask).
        gradient_checkpointing: recompute block activations in backward (less memory, ~30% slower).
        norm_num_groups: GroupNorm groups (must divide every block's channels).
        context_dim: width D of a cross-attention context (B, L, D) (text conditioning): the
            attention blocks become SpatialTransformers (self-attention, cross-attention to the
            context, feed-forward; ldm.modules.attention). None: plain self-attention blocks.
        transformer_depth: transformer blocks per SpatialTransformer.
        position_embedding: SpatialTransformers add a fixed 2-D sine-cosine position embedding to
            their image tokens (captions that place things; no parameters, same weights layout).
        pooled_dim: width of a pooled condition vector (forward's `pooled`, (B, pooled_dim): a
            whole caption in one vector) projected and added to the time embedding, so every
            ResBlock sees it (as Imagen and SDXL add a pooled text embedding); None: none (the
            layout of every older checkpoint).
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
        concat_channels: int | Sequence[int] = 0,
        position_embedding: bool = False,
        pooled_dim: int | None = None,
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
        if position_embedding and context_dim is None:
            raise ValueError(
                "position_embedding=true applies to cross-attention blocks: set context_dim "
                "(conditioning=text)"
            )
        if not isinstance(concat_channels, int):
            concat_channels = sum(concat_channels)
        if concat_channels < 0:
            raise ValueError(f"concat_channels={concat_channels} must be >= 0")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.concat_channels = concat_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.context_dim, self.pooled_dim = context_dim, pooled_dim
        self.num_levels = len(channel_mult)
        self.gradient_checkpointing = gradient_checkpointing
        emb_dim = 4 * model_channels
        groups = norm_num_groups

        def attention(ch: int) -> nn.Module:
            if context_dim is None:
                return AttentionBlock(ch, num_heads, groups)
            return SpatialTransformer(
                ch, num_heads, groups, context_dim, transformer_depth, position_embedding
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # Row `num_classes` is the learned null (unconditional) embedding for CFG.
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.pooled_embed = nn.Linear(pooled_dim, emb_dim) if pooled_dim else None

        self.conv_in = nn.Conv2d(in_channels + concat_channels, model_channels, 3, padding=1)
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

    def concat_condition(self, x: torch.Tensor, concat: torch.Tensor | None) -> torch.Tensor:
        """x (B, C, H, W) with the condition (B, concat_channels, H, W) stacked on its channels."""
        if not self.concat_channels:
            raise ValueError("concat given but the UNet takes no concatenated condition")
        expected = (x.shape[0], self.concat_channels, *x.shape[-2:])
        if concat is None or tuple(concat.shape) != expected:
            got = None if concat is None else tuple(concat.shape)
            raise ValueError(
                f"the UNet concatenates a condition of shape {expected} (concat_channels="
                f"{self.concat_channels}) to x; got concat={got}"
            )
        return torch.cat([x, concat.to(x.dtype)], dim=1)

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
        concat: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W), t LongTensor (B,) -> prediction (B, C_out, H, W).

        `class_labels` LongTensor (B,) may contain `num_classes` (the null class); None means all
        null. `context` (B, L, context_dim) and `context_mask` (B, L) bool (True = real token,
        None = all real): the cross-attention condition, required when `context_dim` is set.
        `concat` (B, concat_channels, H, W): the spatially aligned condition (required exactly when
        concat_channels > 0). `pooled` (B, pooled_dim): required exactly when pooled_dim is set.
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
        if (pooled is None) != (self.pooled_embed is None):
            raise ValueError(
                f"the UNet has pooled_dim={self.pooled_dim} but pooled is "
                f"{'None' if pooled is None else tuple(pooled.shape)}"
            )
        if pooled is not None:
            emb = emb + self.pooled_embed(pooled)  # (B, E)
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
        if self.concat_channels or concat is not None:
            x = self.concat_condition(x, concat)  # (B, C + concat_channels, H, W)

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
