"""SpatialTransformer: the UNet's attention block of a cross-attention-conditioned LDM.

Rombach et al. 2022 (arXiv 2112.10752), Sec. 3.3 and Eq. 3: an intermediate UNet feature map
phi_i(z_t) (B, C, H, W) is flattened to H*W tokens that attend to the conditioning context
tau_theta(y) (B, L, D): Q = W_Q phi_i(z_t), K = W_K tau(y), V = W_V tau(y). As in CompVis'
`ldm/modules/attention.py` (SpatialTransformer / BasicTransformerBlock): GroupNorm and a projection
in, `depth` pre-norm transformer blocks (self-attention, cross-attention to the context,
GEGLU feed-forward, each residual), a zero-initialised projection out, and a residual around it all,
so an untrained block is the identity. Attention runs in `F.scaled_dot_product_attention`; the
context's key-padding mask keeps padded tokens out of every softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.blocks import group_norm, zero_module


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries (B, N, C) over keys/values (B, L, D) (self-attention when
    `context` is None), with an optional key-padding mask (B, L) bool, True = attend."""

    def __init__(self, query_dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide {query_dim} channels")
        context_dim = context_dim or query_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        nh = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, nh, L, C / nh)
            return t.view(b, t.shape[1], nh, c // nh).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, N, C / nh)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020), as CompVis' FeedForward."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), context); x += FF(LN(x))."""

    def __init__(self, dim: int, num_heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = MultiHeadAttention(dim, num_heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


def sincos_position_2d(
    h: int, w: int, dim: int, device: torch.device | None = None
) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (h * w, dim), row-major like the tokens: the first
    half of the channels encodes the row, the second the column, each as sin/cos at dim / 4
    frequencies 1 / 10000^(k / (dim / 4)) (MAE / DiT's `get_2d_sincos_pos_embed`)."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine position embedding needs channels % 4 == 0, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:  # (P,) -> (P, dim / 2)
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    ys = torch.arange(h, device=device).repeat_interleave(w)  # (h * w,)
    xs = torch.arange(w, device=device).repeat(h)
    return torch.cat([embed(ys), embed(xs)], dim=1).float()  # (h * w, dim)


class SpatialTransformer(nn.Module):
    """(B, C, H, W) feature map x context (B, L, D) -> (B, C, H, W); identity at initialisation.
    `position_embedding`: add `sincos_position_2d` to the image tokens, so that cross-attention
    can tell where a token sits (text that places things: "a 3 left of a 7"); no parameters, so
    the state_dict layout is the same either way. Off in CompVis (positions come only from the
    convolutions' padding); on in DiT."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        num_groups: int,
        context_dim: int,
        depth: int = 1,
        position_embedding: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"transformer_depth={depth} must be >= 1")
        if position_embedding and channels % 4:
            raise ValueError(f"position_embedding needs channels % 4 == 0, got {channels}")
        self.position_embedding = position_embedding
        self.norm = group_norm(channels, num_groups)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            [TransformerBlock(channels, num_heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        if self.position_embedding:
            tokens = tokens + sincos_position_2d(h, w, c, x.device).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)
        out = self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out  # (B, C, H, W)
