"""Learning-rate schedules from Hydra `_partial_` configs (both stages' LightningModules)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

LRScheduler = torch.optim.lr_scheduler.LRScheduler
SchedulerFactory = Callable[..., LRScheduler]  # a Hydra `_partial_` scheduler


def build_lr_scheduler(
    factory: SchedulerFactory, optimizer: torch.optim.Optimizer, total_steps: float
) -> LRScheduler:
    """`factory(optimizer)` for a Hydra `_partial_` scheduler, with two additions so a YAML file can
    describe warm-up + cosine: a `SequentialLR`'s `schedulers` are `_partial_`s as well, built on
    the same optimizer, and a `CosineAnnealingLR` with `T_max=None` decays to `eta_min` over the
    steps left when it starts (`total_steps` minus its milestone)."""
    if (
        isinstance(factory, functools.partial)
        and factory.func is torch.optim.lr_scheduler.SequentialLR
    ):
        starts = [0, *factory.keywords["milestones"]]
        parts = [
            _build_one(part, optimizer, total_steps - start)
            for part, start in zip(factory.keywords["schedulers"], starts, strict=True)
        ]
        return factory(optimizer, schedulers=parts)
    return _build_one(factory, optimizer, total_steps)


def _build_one(
    factory: SchedulerFactory, optimizer: torch.optim.Optimizer, steps_left: float
) -> LRScheduler:
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR
    if not (
        isinstance(factory, functools.partial)
        and factory.func is cosine
        and factory.keywords.get("T_max") is None
    ):
        return factory(optimizer)
    if not math.isfinite(steps_left):
        raise ValueError(
            "the lr scheduler's CosineAnnealingLR has T_max=null (decay over the rest of "
            "training), which needs a finite trainer.max_epochs or max_steps"
        )
    return factory(optimizer, T_max=max(1, int(steps_left)))
