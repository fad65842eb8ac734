"""The EMA update for Lightning's `WeightAveraging` callback (conf/callbacks/default.yaml:
`ema`)."""

from __future__ import annotations

import torch
from torch import Tensor


def ema_decay_at(
    update: Tensor | int, decay: float, warmup: bool = True, gamma: float = 8.0
) -> Tensor | float:
    """The decay of the `update`-th EMA update (1-based): `min(decay, (1 + n) / (gamma + 2 + n))`
    with warm-up, else `decay`. A tensor count gives a float64 tensor on its device: reading it
    into Python would synchronise a GPU every step.

    Until `decay` caps it, this average weighs the weights of step k about as k^gamma (the
    power-function EMA of Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
    Diffusion Models", Sec. 3.1: relative width sqrt((g + 1) / ((g + 2)^2 (g + 3)))). gamma = 8 is
    CompVis' LitEma and diffusers' EMAModel warm-up, (1 + n) / (10 + n): width 0.090 of the run.
    """
    if not warmup:
        return decay
    n = torch.as_tensor(update).double()
    return torch.clamp((1.0 + n) / (gamma + 2.0 + n), max=decay)


def get_ema_warmup_multi_avg_fn(decay: float = 0.999, warmup: bool = True, gamma: float = 8.0):
    """`torch.optim.swa_utils.get_ema_multi_avg_fn` with the usual warm-up of the decay.

    Without warm-up the average of a short run keeps a large share of the first weights: after
    the default CPU run's 875 stage-2 steps, 0.999^874 = 42% of the EMA is the step-1 network, and
    its samples are blobs. With warm-up that share is 1e-20 and the decay reaches 0.999
    after ~9,000 updates at gamma 8, so long runs average as before.

    Each update is a lerp, so tensors that do not change (the frozen autoencoder) stay bit-exact.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    if not gamma >= 0.0:
        raise ValueError(f"EMA gamma must be >= 0, got {gamma}")

    @torch.no_grad()
    def ema_update(
        ema_params: list[Tensor], current_params: list[Tensor], num_averaged: Tensor
    ) -> None:
        # AveragedModel copies the first model and counts it: the n-th call here is update n.
        weight = 1.0 - ema_decay_at(num_averaged, decay, warmup, gamma)
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, current_params, weight)
        else:
            for ema, current in zip(ema_params, current_params, strict=True):
                ema.copy_(ema * (1.0 - weight) + current * weight)

    return ema_update
