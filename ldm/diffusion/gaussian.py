"""Exact denoisers of Gaussian data: a closed-form check of samplers, with no network involved.

For data x0 ~ N(mu, std^2) (per element) and x_t = a x0 + s n (a = sqrt(abar_t),
s = sqrt(1 - abar_t), n ~ N(0, 1)), Gaussian conditioning gives the optimal denoiser in closed form:

    E[x0 | x_t] = mu + a std^2 / (a^2 std^2 + s^2) (x_t - a mu).

A sampler driven by it should return N(mu, std^2): any gap is the sampler's own discretization
error (or, for ancestral samplers at few steps, their missing variance). `gaussian_sample_stats`
measures it; tests/test_samplers.py uses it, and issue 21's table (the std each configured
sampler returns at its default steps) comes from `python -m ldm.diffusion.gaussian`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule, convert_prediction


def gaussian_model(
    schedule: NoiseSchedule, mu: Any, std: Any, wobble: float = 0.0
) -> Callable[[Tensor, Tensor], Tensor]:
    """Exact model_fn(x_t, t) for data x0 ~ N(mu, std^2) per element, in the schedule's
    prediction type. `mu`, `std`: floats or tensors broadcasting against x_t's trailing dims.
    `wobble` adds a smooth nonlinear error (so comparisons against other implementations are
    not only of linear maps)."""

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        abar = schedule.alphas_cumprod.double()[t].view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = mu + a * std**2 / (a**2 * std**2 + s**2) * (x_t - a * mu)
        x0 = x0 + wobble * torch.sin(2 * x_t) * (t.view_as(a) + 1) / schedule.num_timesteps
        return convert_prediction(x0, x_t, a, s, "x0", schedule.prediction_type)

    return model_fn


def gaussian_sample_stats(
    sampler: Any,
    mu: float = 0.5,
    std: float = 0.3,
    num_samples: int = 20000,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) of `num_samples` scalars that `sampler` (built on some NoiseSchedule) returns
    when driven by the exact denoiser of N(mu, std^2), in float64. The standard error of the std
    is about std / sqrt(2 num_samples) (0.5 % at 20,000)."""
    model_fn = gaussian_model(sampler.schedule, mu, std)
    x_T = torch.randn(
        (num_samples, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    x = sampler(model_fn, x_T, generator=torch.Generator().manual_seed(seed + 1))
    return x.mean().item(), x.std().item()


def main() -> None:
    """Print the std ratio of every configured sampler (conf/sampler/*.yaml) at its default
    steps, on the default schedule (conf/schedule/linear.yaml)."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    conf = Path(__file__).resolve().parents[2] / "conf"
    schedule = instantiate(OmegaConf.load(conf / "schedule" / "linear.yaml"))
    print(f"exact denoiser of N(0.5, 0.3^2), {schedule.name} schedule, {schedule.prediction_type}")
    for path in sorted((conf / "sampler").glob("*.yaml")):
        sampler = instantiate(OmegaConf.load(path))(schedule=schedule)
        mean, sd = gaussian_sample_stats(sampler)
        print(
            f"  sampler={path.stem:<16} steps {sampler.steps:>4}: mean {mean:.4f} std {sd:.4f} "
            f"({sd / 0.3:.3f} x)"
        )


if __name__ == "__main__":
    main()
