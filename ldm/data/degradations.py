"""Image-to-image inputs made from clean images: low-resolution copies (super-resolution) and masks
(inpainting), deterministic given a torch.Generator, and pasting the known region back.

Conventions: images (C, H, W) or (B, C, H, W) float in [-1, 1]; a mask is (1, H, W) float with
1 = unknown (to be filled) and 0 = known, the convention of CompVis/latent-diffusion's inpainting
(and of `sample.py task=inpaint mask=PATH`, where white = fill). Masked pixels are set to 0 (mid
grey), as in CompVis's `masked_image = (1 - mask) * image`.

- `SuperResolution`: optional Gaussian blur, bicubic downscale by `factor` (antialiased, as
  PIL/Matlab `imresize` do), optional additive Gaussian noise (Rombach et al. 2022, Sec. 4.4 use
  bicubic x4 "following SR3"; blur + noise is the usual "classical" degradation of Wang et al.
  2021, Real-ESRGAN Sec. 3.1, first order).
- `Inpainting`: boxes or free-form brush strokes (Yu et al. 2019, DeepFill v2, Algorithm 1; the
  random-walk strokes LaMa also uses) covering an area fraction drawn from `area`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MASK_KINDS = ("box", "stroke", "mixed")
MASKED_VALUE = 0.0  # what masked pixels are set to in `masked_image` (mid grey in [-1, 1])


def item_seed(*parts: int) -> int:
    """A 63-bit seed from integers (sha256): one independent stream per (seed, item, epoch, ...)."""
    digest = hashlib.sha256("-".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _range(value: float | Sequence[float], name: str, lo: float, hi: float) -> tuple[float, float]:
    """A fixed value v -> (v, v); [a, b] -> (a, b); both within [lo, hi]."""
    pair = (
        (float(value), float(value)) if isinstance(value, int | float) else tuple(map(float, value))
    )
    if len(pair) != 2 or not lo <= pair[0] <= pair[1] <= hi:
        raise ValueError(f"{name}={value!r} must be a number or [min, max] within [{lo}, {hi}]")
    return pair


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with std `sigma` pixels (kernel radius 3 sigma,
    reflect padding); sigma <= 0 returns the input."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def bicubic_resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of (B, C, H, W) in [-1, 1] (antialiased when shrinking), clamped to [-1, 1].
    The bicubic baseline of super-resolution is `bicubic_resize(lowres, H)`."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    out = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(-1.0, 1.0)


class SuperResolution:
    """Degradation for super-resolution: blur (sigma drawn from `blur_sigma`), bicubic downscale by
    `factor`, additive noise (std drawn from `noise_std`, in [-1, 1] units), clamp.

    `__call__(image (C, H, W), generator) -> {"lowres": (C, H / factor, W / factor)}`. Without blur
    and noise it draws nothing and is a pure function of the image.
    """

    key = "lowres"

    def __init__(
        self,
        factor: int = 4,
        blur_sigma: float | Sequence[float] = 0.0,
        noise_std: float | Sequence[float] = 0.0,
    ):
        if isinstance(factor, bool) or factor not in (2, 4, 8):
            raise ValueError(f"task.degradation.factor={factor!r} must be 2, 4 or 8")
        self.factor = int(factor)
        self.blur_sigma = _range(blur_sigma, "task.degradation.blur_sigma", 0.0, 10.0)
        self.noise_std = _range(noise_std, "task.degradation.noise_std", 0.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"SuperResolution(factor={self.factor}, blur_sigma={list(self.blur_sigma)}, "
            f"noise_std={list(self.noise_std)})"
        )

    def lowres_size(self, image_size: int) -> int:
        if image_size % self.factor:
            raise ValueError(
                f"image size {image_size} is not divisible by the super-resolution "
                f"factor {self.factor}"
            )
        return image_size // self.factor

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        _, h, w = image.shape
        x = image[None].float()  # (1, C, H, W)
        sigma = _uniform(generator, *self.blur_sigma) if self.blur_sigma[1] > 0 else 0.0
        x = gaussian_blur(x, sigma)
        x = bicubic_resize(x, (self.lowres_size(h), self.lowres_size(w)))  # (1, C, h, w)
        std = _uniform(generator, *self.noise_std) if self.noise_std[1] > 0 else 0.0
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator)
        return {"lowres": x.clamp(-1.0, 1.0)[0]}


def box_mask(size: int, area: float, generator: torch.Generator) -> torch.Tensor:
    """One axis-aligned box of about `area * size^2` pixels (aspect ratio in [1/2, 2]) at a random
    position: (1, size, size) float, 1 inside."""
    target = area * size * size
    aspect = math.exp(_uniform(generator, -math.log(2), math.log(2)))
    h = min(size, max(1, round(math.sqrt(target * aspect))))
    w = min(size, max(1, round(target / h)))
    top = int(torch.randint(0, size - h + 1, (), generator=generator))
    left = int(torch.randint(0, size - w + 1, (), generator=generator))
    mask = torch.zeros(1, size, size)
    mask[:, top : top + h, left : left + w] = 1.0
    return mask


def stroke_mask(size: int, area: float, generator: torch.Generator, width: float) -> torch.Tensor:
    """Free-form brush strokes (random walks of thick segments, DeepFill v2 Algorithm 1) added one
    segment at a time until at least `area` of the pixels are covered: (1, size, size) float.
    Brush width is drawn in [width / 2, width] pixels per stroke; a stroke has 2-5 segments of
    length size/8 .. size/3, each turning by up to 60 degrees. The random numbers are drawn from
    `generator` in one call (fast: the geometry runs in numpy on the size x size grid)."""
    max_strokes = 64
    u = torch.rand(max_strokes, 5 + 3 * 5, generator=generator, dtype=torch.float64).numpy()
    centres = np.arange(size) + 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    mask = np.zeros((size, size), dtype=bool)
    target = area * size * size
    for r in u:  # one stroke per row of uniforms
        y, x = r[0] * size, r[1] * size
        radius = (width / 2 + r[2] * width / 2) / 2
        angle = r[3] * 2 * math.pi
        segments = 2 + int(r[4] * 4)  # 2..5
        for k in range(segments):
            angle += (r[5 + 3 * k] * 2 - 1) * math.pi / 3
            length = size / 8 + r[6 + 3 * k] * (size / 3 - size / 8)
            y1 = min(max(y + length * math.sin(angle), 0.0), float(size))
            x1 = min(max(x + length * math.cos(angle), 0.0), float(size))
            # distance to the segment (y, x) -> (y1, x1) of the pixel centres in its bounding box
            top, bottom = max(int(min(y, y1) - radius), 0), min(int(max(y, y1) + radius) + 1, size)
            left, right = max(int(min(x, x1) - radius), 0), min(int(max(x, x1) + radius) + 1, size)
            py, px = yy[top:bottom, left:right], xx[top:bottom, left:right]
            dy, dx = y1 - y, x1 - x
            t = ((py - y) * dy + (px - x) * dx) / max(dy * dy + dx * dx, 1e-8)
            t = np.minimum(np.maximum(t, 0.0), 1.0)
            near = (py - (y + t * dy)) ** 2 + (px - (x + t * dx)) ** 2 <= radius * radius
            mask[top:bottom, left:right] |= near
            y, x = y1, x1
            if mask.sum() >= target:
                return torch.from_numpy(mask)[None].float()
    return torch.from_numpy(mask)[None].float()


class Inpainting:
    """Random inpainting masks and masked images.

    `__call__(image (C, H, W), generator) -> {"mask": (1, H, W), "masked_image": (C, H, W)}`, mask
    1 = fill; the area fraction is drawn uniformly from `area` ([min, max] or a number) per image.
    `kind`: `box` (one box: the area is exact up to rounding), `stroke` (free-form brush strokes:
    at least the area, overshooting by at most one segment), or `mixed` (each with probability 1/2).
    `stroke_width`: brush width as a fraction of the image size.
    """

    keys = ("mask", "masked_image")

    def __init__(
        self,
        kind: str = "mixed",
        area: float | Sequence[float] = (0.25, 0.5),
        stroke_width: float = 0.15,
    ):
        if kind not in MASK_KINDS:
            raise ValueError(f"task.mask.kind={kind!r} is not one of {list(MASK_KINDS)}")
        self.kind = kind
        self.area = _range(area, "task.mask.area", 0.0, 1.0)
        if not 0 < stroke_width <= 1:
            raise ValueError(f"task.mask.stroke_width={stroke_width} must be in (0, 1]")
        self.stroke_width = float(stroke_width)

    def __repr__(self) -> str:
        return (
            f"Inpainting(kind={self.kind!r}, area={list(self.area)}, "
            f"stroke_width={self.stroke_width})"
        )

    def make_mask(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """(1, size, size) float mask, 1 = fill."""
        area = _uniform(generator, *self.area)
        kind = self.kind
        if kind == "mixed":
            kind = "box" if torch.rand((), generator=generator).item() < 0.5 else "stroke"
        if area <= 0:
            return torch.zeros(1, size, size)
        if kind == "box":
            return box_mask(size, area, generator)
        return stroke_mask(size, area, generator, self.stroke_width * size)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        _, h, w = image.shape
        if h != w:
            raise ValueError(f"inpainting masks need square images, got {h}x{w}")
        mask = self.make_mask(h, generator)  # (1, H, W)
        return {"mask": mask, "masked_image": mask_image(image, mask)}


def mask_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The known part of `image` with the unknown pixels (mask = 1) set to MASKED_VALUE."""
    return torch.where(mask > 0.5, torch.full_like(image, MASKED_VALUE), image)


def paste_known(
    generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Generated pixels where mask = 1 (fill), the original pixels exactly where mask = 0 (known).

    Shapes (B, C, H, W) or (C, H, W); the mask (B or nothing, 1, H, W) broadcasts over channels.
    A binary selection, not a blend, so known pixels are copied bit for bit."""
    return torch.where(mask > 0.5, generated, original)
