"""Make a folder of real-photo crops for image-folder training: one class subfolder per photo.

Photos that packages ship (nothing is downloaded): scikit-learn's `load_sample_images()` (china,
flower; 640x427) and, if scikit-image is installed, the colour photos of `skimage.data` that its
wheel carries (astronaut, coffee, chelsea, rocket, ...; missing ones are skipped). From each photo
it cuts `--per-class` random squares (side uniform in [--min-crop, --max-crop] pixels, anywhere in
the photo), resizes them to `--size` and writes `DIR/<photo>/<i>.jpg` (quality 95).

    python bench/make_photo_folder.py DIR                      # 2 x 500 crops, 80x80
    python train.py data=image_folder data.root=DIR data.labels=folders experiment=folder_64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def shipped_photos(use_skimage: bool = True) -> dict[str, np.ndarray]:
    """{name: (H, W, 3) uint8} of the photos the installed packages ship."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    photos = {Path(f).stem: img for f, img in zip(data.filenames, data.images, strict=True)}
    if use_skimage:
        try:
            import skimage.data as skd
        except ImportError:
            return photos
        for name in SKIMAGE_PHOTOS:
            try:
                img = np.asarray(getattr(skd, name)())
            except Exception:  # a photo missing from this skimage version: skip it
                continue
            if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
                photos[name] = img
    return photos


def make_folder(
    root: Path,
    per_class: int = 500,
    size: int = 80,
    min_crop: int = 96,
    max_crop: int = 224,
    seed: int = 0,
    use_skimage: bool = True,
) -> dict[str, int]:
    """Write the crops; returns {class: number of files}."""
    rng = np.random.default_rng(seed)
    counts = {}
    for name, photo in sorted(shipped_photos(use_skimage).items()):
        h, w = photo.shape[:2]
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        hi = min(max_crop, h, w)
        for i in range(per_class):
            side = int(rng.integers(min(min_crop, hi), hi + 1))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            crop.resize((size, size), Image.Resampling.LANCZOS).save(
                out / f"{i:04d}.jpg", quality=95
            )
        counts[name] = per_class
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--size", type=int, default=80, help="side of the saved crops (>= 64)")
    parser.add_argument("--min-crop", type=int, default=96)
    parser.add_argument("--max-crop", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-skimage", action="store_true", help="scikit-learn's 2 photos only")
    args = parser.parse_args()
    counts = make_folder(
        args.root,
        args.per_class,
        args.size,
        args.min_crop,
        args.max_crop,
        args.seed,
        not args.no_skimage,
    )
    total = sum(counts.values())
    print(f"wrote {total} crops ({args.size}x{args.size}) to {args.root}: {counts}")


if __name__ == "__main__":
    main()
