"""UNet denoiser: shapes, conditioning on t and class, the null class, checkpointing, init,
errors."""

import pytest
import torch

from ldm.modules.unet import UNet, timestep_embedding

TINY = dict(
    in_channels=4,
    out_channels=4,
    model_channels=8,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_levels=[1],
    num_heads=2,
    norm_num_groups=4,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the zero init by random weights, so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def make(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return randomize(UNet(**{**TINY, **overrides}), seed).eval()


@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, 8),
        (dict(channel_mult=[1, 2, 2], attention_levels=[0, 2], num_res_blocks=2), 16),
        (dict(channel_mult=[1], attention_levels=[], in_channels=3, out_channels=3), 6),
        (dict(num_classes=10, dropout=0.1), 4),
    ],
)
def test_output_shape_equals_input(overrides, size):
    model = make(**overrides)
    x = torch.randn(3, model.in_channels, size, size)
    out = model(x, torch.tensor([0, 10, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_fresh_model_predicts_zero_and_parameter_count():
    """Zero-initialised output conv: an untrained net outputs exactly 0 (the target mean)."""
    model = UNet(**TINY, num_classes=10)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.count_nonzero(model.conv_out.weight) == 0
    assert all(
        torch.count_nonzero(b[0].conv2.weight) == 0 for b in model.down if hasattr(b[0], "conv2")
    )
    assert 5_000 < sum(p.numel() for p in model.parameters()) < 100_000


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 5]), 6)  # freqs 1, 10000^(-1/3), 10000^(-2/3)
    assert emb.shape == (2, 6)
    assert torch.allclose(emb[0], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    expected = torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)])
    assert torch.allclose(emb[1], expected, atol=1e-6)


def test_time_changes_output():
    model = make()
    x = torch.randn(2, 4, 8, 8)
    a = model(x, torch.tensor([10, 10]))
    b = model(x, torch.tensor([500, 500]))
    assert (a - b).abs().max() > 1e-3
    # equal inputs at equal t give equal outputs row by row
    assert torch.allclose(a[0], model(x[:1], torch.tensor([10]))[0], atol=1e-5)


def test_class_label_changes_output_and_null_class_works():
    model = make(num_classes=10)
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)
    t = torch.tensor([100, 100, 100])
    out = model(x, t, torch.tensor([2, 7, 10]))  # 10 = null class
    assert (out[0] - out[1]).abs().max() > 1e-3
    assert (out[0] - out[2]).abs().max() > 1e-3
    # labels=None means the null class for every sample
    assert torch.allclose(model(x, t, None), model(x, t, torch.full((3,), 10)), atol=1e-6)
    with pytest.raises(IndexError):
        model(x, t, torch.tensor([11, 0, 0]))


def test_unconditional_model_rejects_labels():
    model = make()
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([0]))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_identical_outputs_and_grads(dropout):
    plain = make(num_classes=10, dropout=dropout).train()
    ckpt = make(num_classes=10, dropout=dropout, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 4, 8, 8)
    t, y = torch.tensor([0, 250, 500, 999]), torch.tensor([0, 3, 10, 9])
    outs, grads = [], []
    for model in (plain, ckpt):
        model.zero_grad()
        torch.manual_seed(123)  # same dropout masks; non-reentrant checkpoint replays the RNG
        out = model(x, t, y)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6), name


def test_gradient_checkpointing_is_used_in_training():
    model = make(gradient_checkpointing=True).train()
    calls = []
    from torch.utils import checkpoint as ckpt_module

    original = ckpt_module.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    import ldm.modules.unet as unet_module

    unet_module.checkpoint = spy
    try:
        model(torch.randn(1, 4, 8, 8), torch.tensor([1])).sum().backward()
        n_train = len(calls)
        with torch.no_grad():
            model(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    finally:
        unet_module.checkpoint = original
    assert n_train > 0 and set(calls) == {False}
    assert len(calls) == n_train  # no recomputation bookkeeping without grad


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attention_levels=[2]), "attention_levels"),
        (dict(channel_mult=[]), "channel_mult"),
        (dict(num_heads=3), "num_heads"),
        (dict(norm_num_groups=3), "norm_num_groups"),
        (dict(num_res_blocks=0), "num_res_blocks"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{**TINY, **overrides})


def test_bad_input_size_raises():
    model = make()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 7, 7), torch.tensor([1]))
    with pytest.raises(ValueError, match="t has shape"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1]))
