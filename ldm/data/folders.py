"""Image folders: class labels from subfolders, a preprocessed uint8 cache, train-time augmentation.

- Labels (`data.labels=folders`): torchvision's `ImageFolder` convention. Every non-hidden
  subfolder of `data.root` is one class (sorted names -> indices 0..K-1); its images are found
  recursively. `resolve_folder_labels(cfg)` reads the class names before anything is built, so
  `data.num_classes` (which the UNet interpolates) and `data.class_names` (stored in every
  checkpoint's config) follow the folders.
- Preprocessed cache (`data.preprocessed_cache=true`): every file is decoded, oriented, converted
  and resized once into one memory-mapped uint8 array (N, C, L, L) under
  `<cache dir>/<key>.u8` (+ `.json`), keyed by the folder's fingerprint (paths, sizes, mtimes) and
  the decoding settings; later epochs and runs read pixels from it without decoding a JPEG.
- Augmentation (training batches only, never the FID reals): `data.random_flip` (horizontal) and
  `data.crop=center|random` (a random image_size crop of the load_size square).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ldm.utils.cache_lock import cache_lock
from ldm.utils.errors import UserError

log = logging.getLogger(__name__)

LABEL_MODES = ("none", "folders")
CROP_MODES = ("center", "random")


def is_image_file(path: Path) -> bool:
    from ldm.data.sources import IMAGE_EXTENSIONS

    return path.suffix.lower() in IMAGE_EXTENSIONS


def class_folders(root: str | Path) -> list[Path]:
    """The class subfolders of `root` (sorted by name; hidden ones such as `.ipynb_checkpoints`
    skipped), each holding at least one image file; a UserError names what is wrong otherwise."""
    from ldm.data.sources import IMAGE_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.root={str(root)!r} is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = sum(1 for p in root.iterdir() if p.is_file() and is_image_file(p))
        raise UserError(
            f"data.labels=folders but data.root={str(root)!r} has no subfolders (one per class; "
            f"{loose} images lie directly in it); drop data.labels=folders to train unlabeled"
        )
    if len(folders) < 2:
        raise UserError(
            f"data.labels=folders needs at least 2 class subfolders in data.root={str(root)!r}, "
            f"found 1 ({folders[0].name!r}); drop data.labels=folders to train unlabeled"
        )
    for folder in folders:
        if not any(p.is_file() and is_image_file(p) for p in folder.rglob("*")):
            raise UserError(
                f"class folder {str(folder)!r} holds no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
    return folders


def resolve_folder_labels(cfg: Any) -> None:
    """With `data.labels=folders`, set `data.num_classes` and `data.class_names` from the class
    subfolders of `data.root` (before any model config interpolates them). A `data.num_classes`
    or `data.class_names` the user gave must agree with the folders."""
    from omegaconf import OmegaConf, open_dict

    data = cfg.get("data")
    if data is None or "labels" not in data:
        return
    labels = data.get("labels")
    if labels not in LABEL_MODES:
        raise UserError(f"data.labels={labels!r} is not one of {'|'.join(LABEL_MODES)}")
    if labels != "folders" or OmegaConf.is_missing(data, "root"):
        return
    names = [p.name for p in class_folders(data.root)]
    declared = data.get("num_classes")
    if declared is not None and declared != len(names):
        raise UserError(
            f"data.num_classes={declared} but data.root={data.root!r} has {len(names)} class "
            f"folders ({', '.join(names)}); drop data.num_classes (it follows the folders)"
        )
    given = data.get("class_names")
    if given is not None and list(given) != names:
        raise UserError(
            f"data.class_names={list(given)} but the class folders of data.root={data.root!r} are "
            f"{names}; drop data.class_names (it follows the folders)"
        )
    with open_dict(cfg):
        cfg.data.num_classes = len(names)
        cfg.data.class_names = names


def list_labelled_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, class index per file, class names) under the class subfolders of `root`."""
    folders = class_folders(root)
    loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
    if loose:
        log.warning(
            "data.labels=folders: %d image(s) directly in %s belong to no class and are ignored "
            "(first: %s)",
            len(loose),
            root,
            loose[0].name,
        )
    files, labels = [], []
    for k, folder in enumerate(folders):
        found = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
        files += found
        labels += [k] * len(found)
    return files, labels, [f.name for f in folders]


def listing_hash(root: Path, paths: Sequence[Path], labels: Sequence[int] | None = None) -> str:
    """Hash of relative paths, sizes, mtimes (and labels): changes when any file changes."""
    digest = hashlib.sha256()
    for i, p in enumerate(paths):
        stat = p.stat()
        digest.update(f"{p.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if labels is not None:
            digest.update(f":{labels[i]}".encode())
    return digest.hexdigest()[:16]


# ---- preprocessed cache -------------------------------------------------------------------------


class PreprocessedImages(Dataset):
    """Items of an image folder read from a preprocessed uint8 memmap (N, C, L, L).

    Same items as `ImageFolderDataset` (the same `pixels` and `__getitem__`), without decoding.
    The memmap is opened lazily in each process (DataLoader workers get a path, not the array).
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, int, int, int],
        paths: list[Path],
        labels: list[int] | None,
        image_size: int,
    ):
        self.path, self.shape, self.paths, self.image_size = (
            Path(path),
            tuple(shape),
            paths,
            image_size,
        )
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.captions: list[str] | None = None  # one per item (ImageFolder with captions)
        self._array: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def pixels(self, index: int) -> torch.Tensor:
        """(C, L, L) uint8 as stored."""
        return torch.from_numpy(np.array(self.array[index]))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = folder_item(self.pixels(index), self.image_size, self.labels, index)
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


def folder_item(
    pixels: torch.Tensor, image_size: int, labels: torch.Tensor | None, index: int
) -> dict[str, torch.Tensor]:
    """The evaluation view of a stored (C, L, L) uint8 image: center crop to image_size, [-1, 1]."""
    from ldm.data.sources import to_unit_range

    item = {"image": to_unit_range(center_crop(pixels, image_size), 255.0)}
    if labels is not None:
        item["label"] = labels[index]
    return item


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def build_preprocessed_cache(
    dataset: Any, cache_dir: str | Path, key: str, skip_corrupt: bool
) -> tuple[PreprocessedImages, list[tuple[Path, str]]]:
    """Decode every file of an `ImageFolderDataset` once into `cache_dir/<key>.u8` (reused when it
    exists); returns the cached dataset and the skipped (path, reason) pairs.

    Files are decoded by threads (PIL decodes outside the GIL) and written in order; a broken file
    is an error naming it, or with `skip_corrupt` is left out. Written under a temporary name and
    renamed, so an interrupted build never leaves a half-filled cache that looks complete.
    """
    cache_dir = Path(cache_dir)
    data_path, meta_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"

    def cached() -> tuple[PreprocessedImages, list[tuple[Path, str]]]:
        meta = json.loads(meta_path.read_text())
        root = Path(meta["root"])
        kept = [root / p for p in meta["files"]]
        skipped = [(root / p, reason) for p, reason in meta["skipped"]]
        log.info("preprocessed cache: reusing %s (%d images)", data_path, len(kept))
        images = PreprocessedImages(
            data_path, meta["shape"], kept, meta["labels"], dataset.image_size
        )
        return images, skipped

    if data_path.is_file() and meta_path.is_file():
        return cached()
    # Runs that start together (a sweep) build it once: the others wait, then read it.
    with cache_lock(data_path, "preprocessed image cache"):
        if data_path.is_file() and meta_path.is_file():
            return cached()
        return write_preprocessed_cache(dataset, data_path, meta_path, skip_corrupt)


def write_preprocessed_cache(
    dataset: Any, data_path: Path, meta_path: Path, skip_corrupt: bool
) -> tuple[PreprocessedImages, list[tuple[Path, str]]]:
    """Decode every file of `dataset` into `data_path` and `meta_path` (see the caller)."""
    cache_dir = data_path.parent
    key = data_path.stem
    labels = None if dataset.labels is None else dataset.labels.tolist()
    cache_dir.mkdir(parents=True, exist_ok=True)
    n, size = len(dataset.paths), dataset.load_size
    channels = 3 if dataset.mode == "RGB" else 1
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(n, 1), channels, size, size))

    def decode(path: Path) -> torch.Tensor | str:
        try:
            return dataset.decode(path)
        except UserError as err:
            if not skip_corrupt:
                raise
            return str(err)

    kept_idx, skipped = [], []
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(decode, dataset.paths)
            for i, result in enumerate(
                tqdm(results, total=n, desc=f"preprocessing {n} images", unit="img", disable=None)
            ):
                if isinstance(result, str):
                    skipped.append((dataset.paths[i], result))
                    continue
                out[len(kept_idx)] = result.numpy()
                kept_idx.append(i)
        out.flush()
        del out
        if not kept_idx:
            raise UserError(
                f"data.root={str(dataset.root)!r} holds no readable images: all {n} files failed "
                f"(first: {skipped[0][1]})"
            )
        shape = (len(kept_idx), channels, size, size)
        os.truncate(tmp, int(np.prod(shape)))
        meta = {
            "root": str(dataset.root),
            "shape": list(shape),
            "files": [str(dataset.paths[i].relative_to(dataset.root)) for i in kept_idx],
            "labels": None if labels is None else [labels[i] for i in kept_idx],
            "skipped": [[str(p.relative_to(dataset.root)), r] for p, r in skipped],
        }
        meta_path.write_text(json.dumps(meta))
        os.replace(tmp, data_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("preprocessed cache: wrote %d images %s to %s", len(kept_idx), shape[1:], data_path)
    kept = [dataset.paths[i] for i in kept_idx]
    return (
        PreprocessedImages(data_path, shape, kept, meta["labels"], dataset.image_size),
        skipped,
    )


# ---- augmentation -------------------------------------------------------------------------------


class Augmented(Dataset):
    """Training view of a dataset: random horizontal flips and (folders) random crops.

    For folder datasets the crop is taken from the stored (C, L, L) uint8 pixels (`pixels(i)`), so
    `crop=random` picks an image_size square anywhere in the load_size square; for in-memory
    sources only the flip applies. Randomness comes from torch's RNG of the process (DataLoader
    workers are seeded per epoch by the resumable loader).
    """

    def __init__(self, dataset: Dataset, random_flip: bool = False, crop: str = "center"):
        if crop not in CROP_MODES:
            raise UserError(f"data.crop={crop!r} is not one of {'|'.join(CROP_MODES)}")
        self.dataset, self.random_flip, self.crop = dataset, random_flip, crop
        base, self.indices = dataset, None
        if isinstance(dataset, torch.utils.data.Subset):
            base, self.indices = dataset.dataset, list(dataset.indices)
        self.base = base
        if crop == "random" and not hasattr(base, "pixels"):
            raise UserError("data.crop=random applies to data=image_folder only")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from ldm.data.sources import to_unit_range

        i = self.indices[index] if self.indices is not None else index
        if hasattr(self.base, "pixels"):
            pixels = self.base.pixels(i)  # (C, L, L) uint8
            size = self.base.image_size
            if self.crop == "random":
                h, w = pixels.shape[-2:]
                top = int(torch.randint(0, h - size + 1, ()))
                left = int(torch.randint(0, w - size + 1, ()))
                pixels = pixels[..., top : top + size, left : left + size]
            else:
                pixels = center_crop(pixels, size)
            item = {"image": to_unit_range(pixels, 255.0)}
            labels = getattr(self.base, "labels", None)
            if labels is not None:
                item["label"] = labels[i]
            captions = getattr(self.base, "captions", None)
            if captions is not None:
                item["caption"] = captions[i]
        else:
            item = dict(self.base[i])
        if self.random_flip and bool(torch.rand(()) < 0.5):
            flipped = getattr(self.base, "flipped", None)
            if flipped is not None:  # a latent cache with the latents of the mirrored images
                item[self.base.key] = flipped[i]
            elif "image" in item:
                item["image"] = item["image"].flip(-1)
        return item


def check_folder_config(data: Any) -> None:
    """data=image_folder's labels, crop and load_size, checked before anything trains."""
    labels = data.get("labels", "none")
    if labels not in LABEL_MODES:
        raise UserError(f"data.labels={labels!r} is not one of {'|'.join(LABEL_MODES)}")
    if labels == "folders" and data.get("num_classes") is None:
        raise UserError(
            "data.labels=folders but data.num_classes is null: the class folders were not read "
            "(ldm.data.folders.resolve_folder_labels runs before validate_config)"
        )
    crop = data.get("crop", "center")
    if crop not in CROP_MODES:
        raise UserError(f"data.crop={crop!r} is not one of {'|'.join(CROP_MODES)}")
    size, load = data.get("image_size"), data.get("load_size")
    if load is not None and load < size:
        raise UserError(
            f"data.load_size={load} is smaller than data.image_size={size}; use >= {size} or null"
        )
    if crop == "random" and (load is None or load <= size):
        raise UserError(
            f"data.crop=random needs data.load_size > data.image_size={size} (the square it crops "
            f"from), e.g. data.load_size={size + size // 8}"
        )
