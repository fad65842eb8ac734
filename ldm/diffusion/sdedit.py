"""SDEdit image-to-image (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with
Stochastic Differential Equations", arXiv 2108.01073, Algorithm 1) for any sampler and model.

The input (here a latent z0) is noised to an intermediate time t0 = strength * T,
x_t0 = sqrt(abar_t0) z0 + sqrt(1 - abar_t0) eps, and the reverse process runs from there. With a
sampler of `steps` steps, `strength` selects how many of its last steps run: round(strength *
steps) (diffusers' StableDiffusionImg2ImgPipeline uses the same split, with int()), starting at
the sampler's timestep `timesteps[steps - n]`. strength = 1 is ordinary sampling from noise (at
the sampler's first timestep); strength -> 0 runs no step and returns z0 itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.samplers import ModelFn, Sampler, _randn_like


def check_strength(strength: float) -> float:
    """`strength` must be a number in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise ValueError(f"strength={strength!r} must be a number in (0, 1]")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1] (1 = from pure noise)")
    return float(strength)


def sdedit_start(steps: int, strength: float) -> int:
    """Index of the sampler step SDEdit starts at: `steps - round(strength * steps)`."""
    return steps - round(check_strength(strength) * steps)


@torch.no_grad()
def sdedit(
    sampler: Sampler,
    model_fn: ModelFn,
    z0: Tensor,
    strength: float,
    *,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Any = None,
    **sampler_kwargs: Any,
) -> Tensor:
    """Noise `z0` (B, ...) to the sampler's timestep matching `strength` and denoise from there
    with `sampler` (with guidance when `guidance_scale` != 1; `sampler_kwargs`, e.g.
    guidance_interval, go to the sampler). Returns the edited z0 (B, ...)."""
    start = sdedit_start(sampler.steps, strength)
    if start == sampler.steps:
        return z0
    t = sampler.timesteps[start].to(z0.device).expand(z0.shape[0])  # (B,)
    x_t = sampler.schedule.q_sample(z0, t, _randn_like(z0, generator))  # (B, ...)
    return sampler(
        model_fn,
        x_t,
        cond=cond,
        uncond=uncond,
        guidance_scale=guidance_scale,
        generator=generator,
        callback=callback,
        start=start,
        **sampler_kwargs,
    )
