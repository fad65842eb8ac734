"""bench/common.py's FLOP count (the numerator of the UNet's fraction of the GEMM peak) against
hand counts of one convolution and one attention block."""

import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldm.modules.blocks import AttentionBlock

_spec = importlib.util.spec_from_file_location(
    "bench_common", Path(__file__).resolve().parents[1] / "bench" / "common.py"
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def plain_count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_conv_count_equals_the_hand_count_forward_and_backward():
    conv = nn.Conv2d(64, 128, 3, padding=1)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    fwd = common.conv2d_flops(batch=2, c_in=64, c_out=128, h_out=8, w_out=8, kernel=3)
    assert fwd == 2 * (2 * 128 * 8 * 8) * (64 * 9) == 18_874_368
    with torch.no_grad():
        assert common.count_flops(lambda: conv(x)) == fwd
    # Backward: the input gradient and the weight gradient are one forward's worth each.
    assert common.count_flops(lambda: conv(x).sum().backward()) == 3 * fwd
    strided = nn.Conv2d(64, 64, 3, stride=2, padding=1)  # a Downsample: 4x4 outputs
    with torch.no_grad():
        got = common.count_flops(lambda: strided(x))
    assert got == common.conv2d_flops(2, 64, 64, 4, 4, 3)


def test_attention_block_count_equals_the_hand_count_on_cpu():
    """The UNet's AttentionBlock at the default 4x4 level: qkv projection, Q K^T and A V over 16
    tokens in 4 heads of 32, output projection. FlopCounterMode alone counts 0 for the CPU
    attention kernel (`_scaled_dot_product_flash_attention_for_cpu` is not in its registry);
    count_flops adds it."""
    b, c, heads, side = 2, 128, 4, 4
    tokens = side * side
    block = AttentionBlock(c, heads)
    x = torch.randn(b, c, side, side)
    projections = common.linear_flops(b * tokens, c, 3 * c) + common.linear_flops(b * tokens, c, c)
    attention = common.attention_flops(b, heads, tokens, c // heads)
    assert attention == 2 * 2 * b * heads * tokens * tokens * (c // heads) == 262_144
    with torch.no_grad():
        assert common.count_flops(lambda: block(x)) == projections + attention
        assert plain_count(lambda: block(x)) == projections  # the gap count_flops closes
    # Backward of the attention product: 2.5x its forward (torch's sdpa backward formula).
    q, k, v = (torch.randn(b, heads, tokens, c // heads, requires_grad=True) for _ in "qkv")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert common.count_flops(lambda: sdpa(q, k, v).sum().backward()) == 3.5 * attention
