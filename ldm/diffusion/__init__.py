"""Diffusion math in plain torch: noise schedules (schedules.py) and samplers (samplers.py)."""

from ldm.diffusion.schedules import NoiseSchedule, convert_prediction

__all__ = ["NoiseSchedule", "convert_prediction"]
