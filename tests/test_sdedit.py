"""SDEdit: samplers start at an intermediate step; strength maps to the step; strength -> 0 returns
the input."""

import pytest
import torch

from ldm.diffusion import NoiseSchedule, build_sampler
from ldm.diffusion.sdedit import check_strength, sdedit, sdedit_start
from tests.test_samplers import gaussian_model, start_noise


def schedule():
    return NoiseSchedule(name="linear", num_timesteps=100, beta_end=0.2)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm_solver"])
def test_start_zero_is_the_full_run(name):
    sch = schedule()
    model = gaussian_model(sch, 0.3, 0.5, wobble=0.1)
    sampler = build_sampler(name, sch, steps=10)
    x_T = start_noise((2, 3))
    a = sampler(model, x_T, generator=torch.Generator().manual_seed(1))
    b = sampler(model, x_T, generator=torch.Generator().manual_seed(1), start=0)
    assert torch.equal(a, b)


def test_resuming_from_a_step_reproduces_the_rest_of_a_run():
    """Deterministic DDIM: stopping at step k and restarting there with start=k gives its x0."""
    sch = schedule()
    model = gaussian_model(sch, 0.3, 0.5, wobble=0.1)
    sampler = build_sampler("ddim", sch, steps=10, eta=0.0)
    seen = {}
    full = sampler(model, start_noise((4, 3)), callback=lambda i, t, x, x0: seen.setdefault(i, x))
    rest = sampler(model, seen[6], start=6)
    assert torch.equal(rest, full)
    calls = []
    sampler(lambda x, t: calls.append(int(t[0])) or model(x, t), seen[6], start=6)
    assert calls == sampler.timesteps[6:].tolist()
    assert torch.equal(sampler(model, seen[6], start=10), seen[6])
    with pytest.raises(ValueError, match="start"):
        sampler(model, seen[6], start=11)


def test_strength_to_start_step():
    assert sdedit_start(25, 1.0) == 0
    assert sdedit_start(25, 0.6) == 10  # the last 15 of 25 steps
    assert sdedit_start(25, 0.01) == 25  # no step
    for bad in (0.0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="strength"):
            check_strength(bad)


def test_sdedit_small_strength_returns_input_and_large_strength_moves_it():
    sch = schedule()
    model = gaussian_model(sch, 0.0, 1.0)
    sampler = build_sampler("ddim", sch, steps=20)
    z0 = torch.full((3, 4), 5.0, dtype=torch.float64)  # far from the model's data N(0, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sdedit(sampler, model, z0, 0.01, generator=g), z0)
    small = sdedit(sampler, model, z0, 0.1, generator=g)
    full = sdedit(sampler, model, z0, 1.0, generator=g)
    # the edit moves the input towards the data, the more the higher the strength
    assert (small - z0).abs().mean() < 1.0 < (full - z0).abs().mean()
    assert full.abs().mean() < 2.0


def test_sdedit_with_guidance_uses_both_conditions():
    sch = schedule()
    base = gaussian_model(sch, 0.0, 1.0)
    seen = []

    def model(x, t, class_labels):
        seen.append(class_labels.tolist())
        return base(x, t) + 0.1 * class_labels.view(-1, 1).to(x.dtype)

    sampler = build_sampler("ddim", sch, steps=10)
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    cond, uncond = {"class_labels": torch.tensor([3, 4])}, {"class_labels": torch.tensor([10, 10])}
    out = sdedit(sampler, model, z0, 0.5, cond=cond, uncond=uncond, guidance_scale=2.0)
    assert len(seen) == 5 and seen[0] == [10, 10, 3, 4]
    plain = sdedit(sampler, model, z0, 0.5, cond=cond)
    assert not torch.allclose(out, plain)
