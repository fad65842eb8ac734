"""Conditioners: nn.Modules that map a batch to the UNet's conditioning keyword arguments.

The one interface shared by every kind of conditioning (config group `conditioning`):

    conditioner(batch, drop=None) -> dict of UNet keyword arguments
        batch: the data dict (`{"image", "label", "caption", ...}`) or, at sampling, a dict holding
            only the condition (`{"label": (N,)}`, `{"caption": [N strings]}`).
        drop: optional (B,) bool; rows where it is True get the null condition (classifier-free
            guidance, Ho & Salimans 2022: condition dropout in training, the unconditional branch
            when sampling). The output of a dropped row must not depend on that row's condition.
    conditioner.unconditional(n, device) -> the null condition's UNet kwargs for n samples.
    conditioner.input_key: the batch entry it reads (named in errors when the batch lacks it).
    conditioner.context_dim: width D of the cross-attention context it produces, or None.
    conditioner.pooled_dim: width of the pooled vector it produces, or None.

UNet keyword arguments a conditioner may produce: `class_labels` (B,) (class embedding added to the
time embedding), `context` (B, L, D) with `context_mask` (B, L) bool, True = real token
(cross-attention, Rombach et al. 2022 Sec. 3.3), `pooled` (B, P) (a caption in one vector, added
to the time embedding). Outputs of one conditioner have the same shapes for
any batch of the same size, so the sampler can batch the conditional and unconditional halves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Conditioner(nn.Module):
    """Base class (see the module docstring for the contract)."""

    input_key: str = ""
    context_dim: int | None = None
    pooled_dim: int | None = None

    def unconditional(self, num: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_conditions(self, batch: dict[str, Any]) -> None:
        """Raise a one-line ValueError for a condition given at sampling that the model cannot
        take (e.g. words a trained tokenizer never saw); training batches are not checked."""

    def batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch[self.input_key])


class ClassConditioner(Conditioner):
    """Class labels (batch["label"], (B,)) -> `class_labels` for the UNet's class embedding, whose
    extra row `num_classes` is the null class. No parameters of its own: the embedding stays in the
    UNet (`unet.class_embed`), so class-conditional checkpoints keep their state_dict layout."""

    input_key = "label"

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.num_classes = num_classes

    def forward(
        self, batch: dict[str, Any], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        labels = batch[self.input_key]  # (B,)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)  # (B,)
        return {"class_labels": labels}

    def unconditional(self, num: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {
            "class_labels": torch.full((num,), self.num_classes, dtype=torch.long, device=device)
        }


def even_class_labels(
    num_samples: int, num_classes: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Labels (num_samples,) 0, 1, ..., K-1, 0, 1, ...: sample i gets class i mod K, so every class
    is asked for equally often, and a grid with K images per row shows class k in column k. The
    one spread of the validation grid, the final grid, sample.py and the FID callback."""
    return torch.arange(num_samples, device=device) % num_classes  # (N,)
