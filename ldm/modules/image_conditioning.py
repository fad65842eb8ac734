"""Conditioners for image-to-image diffusion: a spatially aligned condition concatenated to x_t.

Rombach et al. 2022, Sec. 3.3 ("for spatially aligned conditioning information, concatenation")
and CompVis/latent-diffusion's `conditioning_key: concat` / `hybrid`: the condition lives on the
latent grid and is stacked onto the noisy latent along channels, so the UNet's first convolution
takes `latent_channels + concat_channels` inputs (`UNet(concat_channels=...)`) while it still
predicts `latent_channels`.

- `LowResConditioner` (super-resolution, Sec. 4.4): batch["lowres"] (B, C, h, w) resized to the
  latent grid (bicubic; the identity when h equals it, e.g. 8x8 -> 32x32 with f = 4).
- `MaskedImageConditioner` (inpainting, Sec. 4.5; CompVis's 7 = 3 + 3 + 1 input channels):
  the frozen stage-1 encoder's latent of batch["masked_image"] and batch["mask"] averaged onto
  the latent grid (each cell: the fraction of its pixels to fill).
- `HybridConditioner`: concatenation plus another conditioner's outputs (cross-attention context
  of a text conditioner: CompVis's `hybrid`).

They follow the conditioner contract of ldm.modules.conditioning: `forward(batch, drop=None)` ->
UNet keyword arguments (here `concat`, (B, concat_channels, s, s)). The image condition is never
dropped: `drop` (classifier-free guidance) applies to the other conditioner of a hybrid only, so
guidance pushes towards the text while both branches see the same input image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.conditioning import Conditioner


def _check_image(batch: dict[str, Any], key: str, channels: int, who: str) -> torch.Tensor:
    if key not in batch:
        raise ValueError(f"{who} needs batch['{key}']; the batch has keys {sorted(batch)}")
    x = batch[key]
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{who}: batch['{key}'] has shape {tuple(x.shape)}; expected (B, {channels}, H, W)"
        )
    return x


def build_conditioner(conditioner: Any, autoencoder: nn.Module | None) -> nn.Module | None:
    """A conditioner module as is; a factory (a Hydra `_partial_`, for conditioners that encode
    with the frozen stage 1) called with `autoencoder=`; None stays None."""
    if conditioner is None or isinstance(conditioner, nn.Module):
        return conditioner
    return conditioner(autoencoder=autoencoder)


class ImageConditioner(Conditioner):
    """Base of the concatenated conditions: `concat_channels` and `latent_size` (the grid side)."""

    concat_channels: int = 0
    task: str = ""

    def unconditional(self, num: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        raise ValueError(
            f"a {self.task} model needs its input image to sample "
            f"(sample.py task={self.task} input=PATH); it has no unconditional mode"
        )


class LowResConditioner(ImageConditioner):
    """batch["lowres"] (B, C, h, w) in [-1, 1] -> concat (B, C, s, s) on the latent grid, of side
    s = image_size // autoencoder.downsample_factor (the autoencoder is only asked its factor)."""

    input_key = "lowres"
    task = "superres"

    def __init__(self, autoencoder: nn.Module, image_channels: int, image_size: int):
        super().__init__()
        factor = int(autoencoder.downsample_factor)
        if image_channels < 1 or image_size < 1 or image_size % factor:
            raise ValueError(
                f"image_channels={image_channels} must be >= 1 and image_size={image_size} a "
                f"multiple of the autoencoder's downsample_factor={factor}"
            )
        self.concat_channels, self.latent_size = int(image_channels), image_size // factor

    def forward(
        self, batch: dict[str, Any], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        lowres = _check_image(batch, "lowres", self.concat_channels, type(self).__name__)
        s = self.latent_size
        if lowres.shape[-2:] != (s, s):
            lowres = F.interpolate(
                lowres, size=(s, s), mode="bicubic", align_corners=False, antialias=True
            )
        return {"concat": lowres}


class _FrozenRef:
    """Holds a module by reference without registering it: its weights belong to (and are saved
    and moved with) the LatentDiffusion that passed it in, not to this conditioner."""

    def __init__(self, module: nn.Module):
        self.module = module


class MaskedImageConditioner(ImageConditioner):
    """batch["masked_image"] (B, C, H, W) and batch["mask"] (B, 1, H, W), 1 = fill ->
    concat (B, latent_channels + 1, s, s): the frozen encoder's scaled latent of the masked image
    and the mask averaged over each latent cell.

    `autoencoder`: the frozen stage 1 (`encode`, `scale_factor`, `latent_channels`,
    `downsample_factor`); Hydra configs build this class as a `_partial_` and LatentDiffusion
    calls it with its own autoencoder, so there is one copy of the weights.
    """

    input_key = "masked_image"
    task = "inpaint"

    def __init__(self, autoencoder: nn.Module, image_channels: int):
        super().__init__()
        self._autoencoder = _FrozenRef(autoencoder)
        self.image_channels = int(image_channels)
        self.latent_channels = int(autoencoder.latent_channels)
        self.concat_channels = self.latent_channels + 1

    @torch.no_grad()
    def forward(
        self, batch: dict[str, Any], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        who = type(self).__name__
        masked = _check_image(batch, "masked_image", self.image_channels, who)
        mask = _check_image(batch, "mask", 1, who)
        if mask.shape[-2:] != masked.shape[-2:]:
            raise ValueError(
                f"{who}: mask {tuple(mask.shape[-2:])} and masked_image "
                f"{tuple(masked.shape[-2:])} differ in size"
            )
        ae = self._autoencoder.module
        z = ae.encode(masked) * ae.scale_factor  # (B, c, s, s)
        m = F.adaptive_avg_pool2d(mask.to(z.dtype), z.shape[-2:])  # (B, 1, s, s) in [0, 1]
        return {"concat": torch.cat([z, m], dim=1)}


class HybridConditioner(Conditioner):
    """`concat` from an ImageConditioner plus the outputs of `context`: a class conditioner's
    `class_labels` (`conditioning=hybrid`: "fill this hole with a 7") or a text conditioner's
    `context` + `context_mask` for cross-attention (CompVis's `hybrid`). `drop` reaches the context
    only, and a batch without the context's entry (no label or caption given) gets the null
    context: the same model then inpaints or upscales without being told what to draw."""

    def __init__(
        self,
        concat: ImageConditioner | Any,
        context: Conditioner,
        autoencoder: nn.Module | None = None,
    ):
        super().__init__()
        concat = build_conditioner(concat, autoencoder)
        self.concat, self.context = concat, context
        self.input_key = concat.input_key  # the image is required; the context is optional
        self.context_key = context.input_key
        self.context_dim = getattr(context, "context_dim", None)
        self.pooled_dim = getattr(context, "pooled_dim", None)
        self.concat_channels = concat.concat_channels
        self.task = concat.task

    def forward(
        self, batch: dict[str, Any], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        image = self.concat(batch)
        if self.context_key in batch:
            return {**self.context(batch, drop), **image}
        concat = image["concat"]
        return {**self.context.unconditional(len(concat), concat.device), **image}

    def check_conditions(self, batch: dict[str, Any]) -> None:
        if self.context_key in batch:
            self.context.check_conditions(batch)

    def unconditional(self, num: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        return self.concat.unconditional(num, device)
