"""Data: ImageDataModule over pluggable sources (embedded MNIST-5k, sklearn digits, torchvision,
folders, latents)."""

from ldm.data.captions import MNIST5kCaptions
from ldm.data.datamodule import ImageDataModule, split_indices
from ldm.data.sources import (
    ImageFolder,
    LatentTensors,
    MNIST5k,
    SklearnDigits,
    TensorImageDataset,
    TorchvisionSource,
)

__all__ = [
    "ImageDataModule",
    "ImageFolder",
    "LatentTensors",
    "MNIST5k",
    "MNIST5kCaptions",
    "SklearnDigits",
    "TensorImageDataset",
    "TorchvisionSource",
    "split_indices",
]
