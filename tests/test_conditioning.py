"""Conditioning plumbing (ldm.modules.conditioning) and the cross-attention SpatialTransformer:
old class-conditional checkpoints sample as before, the context reaches the UNet, padding is
masked."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ldm.models.loading import load_latent_diffusion
from ldm.modules.attention import SpatialTransformer, sincos_position_2d
from ldm.modules.conditioning import ClassConditioner
from ldm.modules.unet import UNet

FIXTURES = Path(__file__).parent / "fixtures"


def test_old_class_checkpoint_loads_and_samples_as_the_old_code_did():
    """diffusion_6fef1e3_debug_fast.ckpt (old code) -> the same guided and unguided samples that
    the code at 6fef1e3 drew with these seeds (diffusion_6fef1e3_samples.pt, made by that code)."""
    model, _ = load_latent_diffusion(FIXTURES / "diffusion_6fef1e3_debug_fast.ckpt")
    reference = torch.load(FIXTURES / "diffusion_6fef1e3_samples.pt", weights_only=True)
    assert isinstance(model.conditioner, ClassConditioner)
    assert not list(model.conditioner.state_dict())  # layout unchanged: the embedding is the UNet's
    g = torch.Generator().manual_seed(0)
    guided = model.sample(10, class_labels=torch.arange(10), guidance_scale=3.0, generator=g)
    g = torch.Generator().manual_seed(1)
    uncond = model.sample(4, generator=g)
    torch.testing.assert_close(guided, reference["guided"], atol=1e-5, rtol=0)
    torch.testing.assert_close(uncond, reference["uncond"], atol=1e-5, rtol=0)


def test_class_conditioner_drops_to_the_null_class():
    cond = ClassConditioner(10)
    labels = torch.tensor([1, 2, 3])
    out = cond({"label": labels}, drop=torch.tensor([False, True, False]))
    assert torch.equal(out["class_labels"], torch.tensor([1, 10, 3]))
    assert torch.equal(cond({"label": labels})["class_labels"], labels)
    assert torch.equal(cond.unconditional(2, "cpu")["class_labels"], torch.tensor([10, 10]))


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Replace the zero-initialised output projections by random weights, so outputs move."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def test_spatial_transformer_is_identity_at_init_and_follows_the_context():
    torch.manual_seed(0)
    block = SpatialTransformer(channels=8, num_heads=2, num_groups=4, context_dim=6)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 6)
    assert torch.equal(block(x, ctx), x)  # zero-initialised projection out
    randomized(block)
    out = block(x, ctx)
    assert not torch.allclose(out, block(x, ctx + 1.0))  # depends on the context
    # padded tokens are ignored: changing them (masked out) leaves the output unchanged ...
    mask = torch.tensor([[True, True, False], [True, False, False]])
    padded = ctx.clone()
    padded[0, 2] += 5.0
    padded[1, 1:] -= 3.0
    torch.testing.assert_close(block(x, ctx, mask), block(x, padded, mask))
    # ... and the mask matters: the same change with every token real moves the output
    assert not torch.allclose(block(x, ctx), block(x, padded))
    # a masked context equals the context cut to its real tokens
    torch.testing.assert_close(block(x[:1], ctx[:1], mask[:1]), block(x[:1], ctx[:1, :2]))


def test_unet_with_context_dim_uses_the_context_and_checks_it():
    unet = UNet(
        4,
        4,
        8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_num_groups=4,
        context_dim=6,
    )
    assert sum(isinstance(m, SpatialTransformer) for m in unet.modules()) == 4  # 1 down, mid, 2 up
    randomized(unet)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = unet(x, t, context=ctx, context_mask=mask)
    assert out.shape == x.shape
    assert not torch.allclose(out, unet(x, t, context=ctx.flip(0), context_mask=mask))
    with pytest.raises(ValueError, match="context_dim=6 but context is None"):
        unet(x, t)
    with pytest.raises(ValueError, match=r"expected \(B, L, 6\)"):
        unet(x, t, context=torch.randn(2, 5, 7))
    plain = UNet(4, 4, 8, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, norm_num_groups=4)
    with pytest.raises(ValueError, match="context_dim=None but context is"):
        plain(x, t, context=ctx)


def test_unet_pooled_vector_conditions_each_sample_and_is_checked():
    kw = dict(channel_mult=(1, 2), num_res_blocks=1, num_heads=2, norm_num_groups=4)
    unet = randomized(UNet(4, 4, 8, context_dim=6, pooled_dim=5, **kw))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.randn(2, 3, 6)
    pooled = torch.randn(2, 5)
    out = unet(x, t, context=ctx, pooled=pooled)
    other = pooled.clone()
    other[1] = torch.randn(5)
    moved = unet(x, t, context=ctx, pooled=other)
    torch.testing.assert_close(moved[0], out[0])  # row 0's pooled unchanged: its output too
    assert (moved[1] - out[1]).abs().mean() > 1e-2  # row 1 follows its own pooled vector
    with pytest.raises(ValueError, match="pooled_dim=5 but pooled is None"):
        unet(x, t, context=ctx)
    plain = UNet(4, 4, 8, context_dim=6, **kw)
    assert not any("pooled" in k for k in plain.state_dict())  # older checkpoints' layout
    with pytest.raises(ValueError, match=r"pooled_dim=None but pooled is \(2, 5\)"):
        plain(x, t, context=ctx, pooled=pooled)


def test_sincos_position_embedding_values_and_what_it_tells_cross_attention():
    pe = sincos_position_2d(2, 3, 8)  # (6, 8): rows (y) in channels 0-3, columns (x) in 4-7
    assert pe.shape == (6, 8)
    # token k sits at (k // 3, k % 3); each half is [sin(p w0), sin(p w1), cos(p w0), cos(p w1)]
    # with w = 1 / 10000^(j / 2) = (1, 0.01)
    y, x = 1.0, 2.0
    half = [math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)]
    expected = torch.tensor([*half, math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100)])
    torch.testing.assert_close(pe[5], expected)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="channels % 4"):
        sincos_position_2d(2, 2, 6)
    # A feature map that is the same everywhere: without positions every token attends alike
    # (left and right halves come out equal), with them they differ; no parameters are added.
    torch.manual_seed(0)
    plain = SpatialTransformer(channels=8, num_heads=2, num_groups=4, context_dim=6)
    placed = SpatialTransformer(8, 2, 4, 6, position_embedding=True)
    assert plain.state_dict().keys() == placed.state_dict().keys()
    placed.load_state_dict(randomized(plain).state_dict())
    x, ctx = torch.randn(1, 8, 1, 1).expand(1, 8, 4, 4), torch.randn(1, 3, 6)
    out_plain, out_placed = plain(x, ctx), placed(x, ctx)
    torch.testing.assert_close(out_plain[..., :2], out_plain[..., 2:].flip(-1))
    assert not torch.allclose(out_placed[..., :2], out_placed[..., 2:].flip(-1), atol=1e-3)
    with pytest.raises(ValueError, match="position_embedding=true applies to cross-attention"):
        UNet(4, 4, 8, (1, 2), 1, norm_num_groups=4, position_embedding=True)
