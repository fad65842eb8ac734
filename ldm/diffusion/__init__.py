"""Diffusion math in plain torch: noise schedules (schedules.py) and samplers (samplers.py)."""

from ldm.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    DPMSolverSDESampler,
    Sampler,
    build_sampler,
    guided_prediction,
    sampling_timesteps,
)
from ldm.diffusion.schedules import NoiseSchedule, convert_prediction

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSDESampler",
    "DPMSolverSampler",
    "NoiseSchedule",
    "Sampler",
    "build_sampler",
    "convert_prediction",
    "guided_prediction",
    "sampling_timesteps",
]
