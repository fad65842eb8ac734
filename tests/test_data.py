"""Data sources and the ImageDataModule on real embedded data (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import (
    ImageDataModule,
    ImageFolder,
    LatentTensors,
    MNIST5k,
    SklearnDigits,
    TorchvisionSource,
    split_indices,
)
from ldm.utils.errors import UserError


def make_dm(source, **kw) -> ImageDataModule:
    defaults = dict(
        name="t", image_size=32, num_channels=1, num_classes=10, batch_size=16, val_fraction=0.1
    )
    defaults.update(kw)
    dm = ImageDataModule(source, **defaults)
    dm.setup()
    return dm


def test_mnist5k_shapes_range_labels():
    dm = make_dm(MNIST5k(image_size=32))
    assert len(dm.train_dataset) == 4500 and len(dm.val_dataset) == 500
    batch = next(iter(dm.train_dataloader()))
    x, y = batch["image"], batch["label"]
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    # Padding keeps the 28x28 digit intact in the center with a black border.
    full = dm.full_dataset.images
    assert torch.all(full[:, :, :2, :] == -1.0) and torch.all(full[:, :, -2:, :] == -1.0)
    # Every class is present with 500 examples in the embedded set.
    assert torch.bincount(dm.full_dataset.labels).tolist() == [500] * 10


def test_mnist5k_resize_mode_and_bad_mode():
    dm = make_dm(MNIST5k(image_size=16, resize="resize"), image_size=16)
    assert dm.full_dataset.images.shape[-2:] == (16, 16)
    with pytest.raises(ValueError, match="resize='crop'"):
        MNIST5k(image_size=32, resize="crop")


def test_digits_upsampled():
    dm = make_dm(SklearnDigits(image_size=32))
    x = dm.full_dataset.images
    assert x.shape == (1797, 1, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.3


def test_split_deterministic_and_disjoint():
    a_train, a_val = split_indices(100, 0.2, seed=3)
    b_train, b_val = split_indices(100, 0.2, seed=3)
    _, c_val = split_indices(100, 0.2, seed=4)
    assert a_train == b_train and a_val == b_val
    assert (
        set(a_train).isdisjoint(a_val)
        and len(set(a_train) | set(a_val)) == 100
        and len(a_val) == 20
    )
    assert a_val != c_val
    with pytest.raises(ValueError, match=r"val_fraction=1\.5"):
        split_indices(10, 1.5, 0)


def test_declared_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"data\.num_channels=3"):
        make_dm(MNIST5k(image_size=32), num_channels=3)
    with pytest.raises(ValueError, match=r"data\.num_classes=None"):
        make_dm(MNIST5k(image_size=32), num_classes=None)


def test_fingerprint_changes_with_data_and_split():
    a = make_dm(MNIST5k(image_size=32)).fingerprint()
    assert a == make_dm(MNIST5k(image_size=32)).fingerprint()
    assert a != make_dm(MNIST5k(image_size=32), split_seed=1).fingerprint()
    assert a != make_dm(MNIST5k(image_size=16, resize="resize"), image_size=16).fingerprint()


def write_images(root, n=6):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8)
        folder = root / "sub" if i % 2 else root
        Image.fromarray(arr).save(folder / f"img{i}.png")
    Image.fromarray(np.full((48, 48), 255, dtype=np.uint8), mode="L").save(root / "gray.png")
    (root / "notes.txt").write_text("not an image")


def test_image_folder_rgb_and_gray(tmp_path):
    write_images(tmp_path)
    dm = make_dm(
        ImageFolder(str(tmp_path), image_size=32, mode="RGB"),
        num_channels=3,
        num_classes=None,
        batch_size=4,
        val_fraction=0.25,
    )
    assert len(dm.full_dataset) == 7  # recursive, .txt ignored
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image"} and batch["image"].shape == (4, 3, 32, 32)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    gray = make_dm(
        ImageFolder(str(tmp_path), image_size=16, mode="L"),
        image_size=16,
        num_classes=None,
        batch_size=2,
    )
    white = [
        item["image"]
        for item in (gray.full_dataset[i] for i in range(len(gray.full_dataset)))
        if item["image"].min() == 1.0
    ]
    assert len(white) == 1 and white[0].shape == (1, 16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolder(str(tmp_path / "missing"), 32).build()
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(str(tmp_path), 32).build()
    with pytest.raises(ValueError, match="mode='CMYK'"):
        ImageFolder(str(tmp_path), 32, mode="CMYK")


def test_latents_source(tmp_path):
    latents, labels = torch.randn(20, 4, 8, 8), torch.arange(20) % 10
    torch.save({"latents": latents, "labels": labels}, tmp_path / "lat.pt")
    dm = make_dm(LatentTensors(str(tmp_path / "lat.pt"), num_classes=10), batch_size=5)
    batch = next(iter(dm.val_dataloader()))
    assert batch["latent"].shape == (2, 4, 8, 8) and batch["label"].dtype == torch.int64
    assert torch.equal(dm.full_dataset.images, latents)
    with pytest.raises(FileNotFoundError, match="no latents file"):
        LatentTensors(str(tmp_path / "nope.pt")).build()


def test_torchvision_missing_files_error(tmp_path):
    source = TorchvisionSource("mnist", root=str(tmp_path), image_size=32, download=False)
    with pytest.raises(UserError, match=r"data\.download=true"):  # one line, exit 2 in train.py
        source.build()
    with pytest.raises(ValueError, match="name='svhn'"):
        TorchvisionSource("svhn", root=str(tmp_path), image_size=32)
