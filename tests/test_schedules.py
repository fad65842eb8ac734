"""NoiseSchedule: values against diffusers, explicit betas/sigmas, conversions, q_sample,
weights."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from ldm.diffusion import NoiseSchedule
from ldm.diffusion.schedules import PREDICTION_TYPES, betas_from_sigmas, linear_betas

# (our name, diffusers beta_schedule, endpoints); cosine is diffusers' "squaredcos_cap_v2".
SHARED = [
    ("linear", "linear", {"beta_start": 1e-4, "beta_end": 2e-2}),
    ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("cosine", "squaredcos_cap_v2", {}),
    ("sigmoid", "sigmoid", {"beta_start": 1e-4, "beta_end": 2e-2}),
]


@pytest.mark.parametrize(("name", "dname", "ends"), SHARED)
def test_schedule_values_match_diffusers(name, dname, ends):
    ours = NoiseSchedule(name, num_timesteps=1000, **ends)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=dname, **ends)
    # Ours is float64 rounded once to float32; diffusers' linspace/sigmoid run in float32.
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-6, atol=0)
    # Same betas, accurate cumprod: float32 rounding, except that 1 - beta of a float32 beta
    # near 1 (cosine's 0.999 cap) is only good to ~1e-5 relative.
    exact = torch.cumprod(1 - ref.betas.double(), 0).float()
    torch.testing.assert_close(ours.alphas_cumprod[:-1], exact[:-1], rtol=2e-6, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod[-1:], exact[-1:], rtol=2e-5, atol=0)
    # diffusers' own float32 cumprod accumulates ~1e-5 relative error over 1000 factors.
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=3e-5, atol=0)
    assert ours.betas.dtype == torch.float32 and ours.alphas_cumprod.dtype == torch.float32


def test_cosine_closed_form_and_cap():
    """Nichol & Dhariwal eq. 17: alphas_cumprod[t] = f(t + 1) / f(0) below the 0.999 beta cap."""
    s = NoiseSchedule("cosine", num_timesteps=1000)

    def f(u):
        return math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 499, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert s.betas[-1].item() == pytest.approx(0.999, rel=1e-7)
    assert s.betas.max().item() == pytest.approx(0.999, rel=1e-7)


@pytest.mark.parametrize(("name", "dname", "ends"), SHARED)
def test_zero_terminal_snr_matches_diffusers(name, dname, ends):
    ours = NoiseSchedule(name, zero_terminal_snr=True, prediction_type="v", **ends)
    plain = NoiseSchedule(name, **ends)
    # Same algorithm (Lin et al. 2023, Alg. 1) run by diffusers in float64 on our float64 betas.
    ref64 = diffusers_rescale(plain.betas.double())
    torch.testing.assert_close(ours.betas, ref64.float(), rtol=1e-6, atol=1e-7)
    assert ours.alphas_cumprod[-1].item() == 0.0 and ours.betas[-1].item() == 1.0
    assert ours.snr(torch.tensor([999])).item() == 0.0
    # sqrt(alphas_cumprod[0]) is preserved by the rescale.
    assert ours.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    # Stock diffusers does it in float32: agreement in absolute terms to ~1e-6.
    ref = DDPMScheduler(beta_schedule=dname, rescale_betas_zero_snr=True, **ends)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=2e-6)


def test_explicit_betas_round_trip():
    named = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    betas = named.betas.double().tolist()
    explicit = NoiseSchedule(betas=betas)
    assert explicit.num_timesteps == 1000 and explicit.name == "betas"
    assert torch.equal(explicit.betas, named.betas)
    torch.testing.assert_close(explicit.alphas_cumprod, named.alphas_cumprod, rtol=1e-6, atol=0)
    # state_dict carries every buffer, and a schedule rebuilt the same way loads it strictly.
    assert set(explicit.state_dict()) == {
        "betas",
        "alphas_cumprod",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
    }
    NoiseSchedule(betas=betas).load_state_dict(explicit.state_dict(), strict=True)


def test_sigmas_closed_form_and_vp_round_trip():
    sigmas = torch.linspace(0.01, 0.5, 200, dtype=torch.float64)
    s = NoiseSchedule(sigmas=sigmas.tolist())
    var_ve = torch.cumsum(sigmas**2, 0)  # s_t^2
    torch.testing.assert_close(s.alphas_cumprod.double(), 1 / (1 + var_ve), rtol=1e-6, atol=0)
    # A VP schedule written as VE per-step noise sizes comes back unchanged.
    vp = NoiseSchedule("linear", num_timesteps=300)
    ac = torch.cumprod(1 - linear_betas(300, 1e-4, 2e-2), 0)  # float64, before storage rounding
    s2 = (1 - ac) / ac  # VE marginal variances
    ve_sigmas = torch.cat([s2[:1], s2[1:] - s2[:-1]]).sqrt()
    back = NoiseSchedule(sigmas=ve_sigmas.tolist())
    torch.testing.assert_close(back.alphas_cumprod, vp.alphas_cumprod, rtol=1e-6, atol=0)
    torch.testing.assert_close(back.betas, vp.betas, rtol=1e-6, atol=0)


def test_sigmas_reproduce_ve_marginal_variances():
    """Simulate the VE chain x_{t+1} = x_t + N(0, sigma_t^2) and compare with the VP schedule."""
    gen = torch.Generator().manual_seed(0)
    sigmas = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8, 1.6], dtype=torch.float64)
    s = NoiseSchedule(sigmas=sigmas.tolist())
    n = 200_000
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    steps = torch.randn(len(sigmas), n, generator=gen, dtype=torch.float64) * sigmas[:, None]
    x_ve = x0 + torch.cumsum(steps, 0)  # (T, n): x_t of the VE chain
    for t in range(len(sigmas)):
        tt = torch.full((n,), t)
        x_vp = s.q_sample(x0, tt, torch.randn(n, generator=gen, dtype=torch.float64))
        x_vp_as_ve = x_vp / s.sqrt_alphas_cumprod[t].double()  # x^VE = x^VP / sqrt(abar)
        intended = float((sigmas[: t + 1] ** 2).sum())
        assert x_ve[t].var().item() == pytest.approx(intended, rel=0.02)
        assert x_vp_as_ve.var().item() == pytest.approx(intended, rel=0.02)
        assert x_vp_as_ve.mean().item() == pytest.approx(0.7, abs=0.02)


def test_betas_from_sigmas_formula():
    sig = torch.tensor([0.3, 0.4, 1.2], dtype=torch.float64)
    b = betas_from_sigmas(sig)
    s2 = torch.cumsum(sig**2, 0)
    ac = torch.cumprod(1 - b, 0)
    torch.testing.assert_close(ac, 1 / (1 + s2))
    assert b[0].item() == pytest.approx(0.09 / 1.09)


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
def test_conversions_round_trip(ptype):
    s = NoiseSchedule("cosine", prediction_type=ptype)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(64, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 990, (64,), generator=gen)  # the 0.999-capped tail is covered elsewhere
    x_t = s.q_sample(x0, t, eps)
    target = s.training_target(x0, eps, t)
    # The training target, read back as each type, gives the true x0 / eps / v.
    a = s.sqrt_alphas_cumprod[t].double().view(-1, 1, 1, 1)
    sig = s.sqrt_one_minus_alphas_cumprod[t].double().view(-1, 1, 1, 1)
    v = a * eps - sig * x0
    torch.testing.assert_close(s.to_x0(x_t, t, target), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.to_eps(x_t, t, target), eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.to_v(x_t, t, target), v, rtol=0, atol=1e-9)
    # Every pair of types, both directions.
    truth = {"x0": x0, "eps": eps, "v": v}
    for src in PREDICTION_TYPES:
        for dst in PREDICTION_TYPES:
            out = s.convert(x_t, t, truth[src], src, dst)
            back = s.convert(x_t, t, out, dst, src)
            torch.testing.assert_close(out, truth[dst], rtol=0, atol=1e-8)
            torch.testing.assert_close(back, truth[src], rtol=0, atol=1e-8)


def test_v_target_and_q_sample_match_diffusers():
    s = NoiseSchedule("linear", prediction_type="v")
    ref = DDPMScheduler(beta_schedule="linear")
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 8, 1, 3, 3, generator=gen)
    t = torch.tensor([0, 17, 500, 999, 3, 640, 200, 998])
    torch.testing.assert_close(
        s.q_sample(x0, t, eps), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        s.training_target(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-6
    )


def test_q_sample_statistics():
    s = NoiseSchedule("linear")
    gen = torch.Generator().manual_seed(3)
    n = 100_000
    x0 = torch.full((n, 1), 1.5)
    for t in (0, 250, 999):
        tt = torch.full((n,), t)
        x_t = s.q_sample(x0, tt, torch.randn(n, 1, generator=gen))
        abar = s.alphas_cumprod[t].item()
        assert x_t.mean().item() == pytest.approx(1.5 * math.sqrt(abar), abs=0.01)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - abar), rel=0.01, abs=1e-4)
    # snr is alphas_cumprod / (1 - alphas_cumprod) and decreases in t.
    snr = s.snr(torch.arange(1000))
    assert torch.all(snr[1:] < snr[:-1])
    assert snr[10].item() == pytest.approx(
        s.alphas_cumprod[10].item() / (1 - s.alphas_cumprod[10].item()), rel=1e-6
    )


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
def test_min_snr_weights_are_one_x0_space_loss(ptype):
    """Hang et al. 2023: each type's weighted MSE equals min(SNR, gamma) * ||x0_hat - x0||^2."""
    s = NoiseSchedule("linear", prediction_type=ptype)
    gen = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 32, 6, generator=gen, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(32, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (32,), generator=gen)
    x_t = s.q_sample(x0, t, eps)
    pred = s.convert(x_t, t, x0_hat, "x0", ptype)  # the model output that means x0_hat
    mse = ((pred - s.training_target(x0, eps, t)) ** 2).mean(1)
    weight = s.loss_weight(t, "min_snr", min_snr_gamma=5.0).double()
    x0_mse = ((x0_hat - x0) ** 2).mean(1)
    expected = s.snr(t).double().clamp(max=5.0) * x0_mse
    torch.testing.assert_close(weight * mse, expected, rtol=2e-5, atol=0)
    assert torch.equal(s.loss_weight(t), torch.ones(32))
    assert s.loss_weight(t).shape == (32,)


def test_validation_errors():
    with pytest.raises(
        ValueError, match=r"'quadratic'.*'linear', 'scaled_linear', 'cosine', 'sigmoid'"
    ):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match=r"'epsilon'.*'eps', 'x0', 'v'"):
        NoiseSchedule(prediction_type="epsilon")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        NoiseSchedule(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="either betas or sigmas"):
        NoiseSchedule(betas=[0.1], sigmas=[0.1])
    with pytest.raises(ValueError, match="num_timesteps=5"):
        NoiseSchedule(betas=[0.1, 0.2], num_timesteps=5)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        NoiseSchedule(betas=[0.1, 1.0])
    with pytest.raises(ValueError, match="sigmas must be positive"):
        NoiseSchedule(sigmas=[0.1, -0.2])
    with pytest.raises(ValueError, match="'huber'"):
        NoiseSchedule().loss_weight(torch.tensor([1]), "huber")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        NoiseSchedule().loss_weight(torch.tensor([1]), "min_snr", min_snr_gamma=0)


def test_repr_and_device_move():
    s = NoiseSchedule("cosine", prediction_type="v")
    text = repr(s)
    assert (
        "name='cosine'" in text and "prediction_type='v'" in text and "num_timesteps=1000" in text
    )
    s64 = s.to(torch.float64)  # buffers follow .to() like any module's
    assert s64.alphas_cumprod.dtype == torch.float64
