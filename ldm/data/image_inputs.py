"""Reading the input images of image-to-image sampling (sample.py input= / mask= / init_image=):
a file or a directory of images -> a tensor in [-1, 1], with one-line errors (UserError) for a
missing path, an unreadable file, or an image of the wrong size, channel count or mode.

Modes are not converted silently: a grayscale model takes 8-bit grayscale (`L`) images, an RGB
model `RGB` images; anything else (RGBA, palette, 16-bit, CMYK) is refused with the conversion to
make. Masks are grayscale or 1-bit images: white (>= 128) = fill, black = keep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldm.utils.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CHANNEL_MODES = {1: "L", 3: "RGB"}


def list_images(path: str | Path, key: str) -> list[Path]:
    """The image file `path`, or the image files in directory `path` (sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"{key}={str(path)!r} is a directory without images")
        return files
    if not p.is_file():
        raise UserError(f"{key}={str(path)!r} does not exist")
    return [p]


def _open(path: Path, key: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{key}: {path} is not a readable image ({err})") from err
    return img


def read_image(path: Path, key: str, channels: int, size: int) -> torch.Tensor:
    """One image file -> (C, size, size) float in [-1, 1]; the mode must match `channels`."""
    img = _open(path, key)
    mode = CHANNEL_MODES[channels]
    if img.mode != mode:
        raise UserError(
            f"{key}: {path} has mode {img.mode} but the model takes {channels}-channel images "
            f"(mode {mode}); convert it, e.g. PIL: Image.open(p).convert({mode!r}).save(p)"
        )
    if img.size != (size, size):
        raise UserError(
            f"{key}: {path} is {img.size[0]}x{img.size[1]} but the model takes {size}x{size} here"
        )
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W) or (H, W, 3)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)  # (C, H, W)
    return pixels.float() / 127.5 - 1.0


def read_images(
    path: str | Path, key: str, channels: int, size: int
) -> tuple[torch.Tensor, list[Path]]:
    """A file or directory -> (N, C, size, size) in [-1, 1] and the files, in order."""
    files = list_images(path, key)
    return torch.stack([read_image(f, key, channels, size) for f in files]), files


def read_mask(path: str | Path, size: int, key: str = "mask") -> torch.Tensor:
    """A mask file (mode L or 1, white = fill) -> (1, size, size) float in {0, 1}."""
    files = list_images(path, key)
    if len(files) != 1:
        raise UserError(f"{key}={str(path)!r} must be one image file")
    img = _open(files[0], key)
    if img.mode not in ("L", "1"):
        raise UserError(
            f"{key}: {files[0]} has mode {img.mode}; a mask is a grayscale (L) or 1-bit image, "
            "white = fill"
        )
    if img.size != (size, size):
        raise UserError(
            f"{key}: {files[0]} is {img.size[0]}x{img.size[1]} but the image is {size}x{size}"
        )
    pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    return torch.from_numpy(pixels >= 128).float()[None]
