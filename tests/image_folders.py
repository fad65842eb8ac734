"""Image folders drawn procedurally for the tests (no photos are shipped): one look per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("discs", "stripes", "squares")


def draw(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An (size, size, 3) uint8 image: a red-ish disc on dark blue, green-ish diagonal stripes,
    or a bright square on a noisy gray texture; position, size, colour and phase vary."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    jitter = rng.integers(-20, 21, 3)
    if kind == "discs":
        img = np.zeros((size, size, 3), np.float32) + np.array([10, 20, 90])
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.15, 0.3) * size
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = np.array([220, 40, 30]) + jitter
    elif kind == "stripes":
        period = rng.uniform(4, 8)
        wave = (np.sin((xx + yy + rng.uniform(0, 10)) * 2 * np.pi / period) > 0)[..., None]
        img = np.where(wave, np.array([40, 200, 60]) + jitter, np.array([230, 230, 200]))
    elif kind == "squares":
        img = rng.normal(128, 25, (size, size, 1)).repeat(3, axis=2)
        s = int(rng.uniform(0.3, 0.5) * size)
        top, left = rng.integers(0, size - s, 2)
        img[top : top + s, left : left + s] = np.array([250, 240, 30]) + jitter
    else:
        raise ValueError(kind)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_class_folders(
    root: Path,
    per_class: int = 12,
    size: int = 24,
    classes: tuple[str, ...] = CLASSES[:2],
    seed: int = 0,
    fmt: str = "png",
) -> Path:
    """root/<class>/<i>.<fmt> for each class (a name of CLASSES draws that look, any other name
    the look of its position); returns root."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        kind = name if name in CLASSES else CLASSES[k % len(CLASSES)]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw(kind, size, rng)).save(root / name / f"{i:04d}.{fmt}")
    return root


def make_flat_folder(root: Path, n: int = 24, size: int = 24, seed: int = 0) -> Path:
    """n images of all kinds directly in root (unlabeled); returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(draw(CLASSES[i % len(CLASSES)], size, rng)).save(root / f"{i:04d}.png")
    return root
