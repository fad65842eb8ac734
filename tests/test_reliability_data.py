"""Data faults in image folders: broken files, skip_corrupt, empty folders, small images, every PIL
mode."""

from __future__ import annotations

import io
import logging

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data import ImageFolder, LatentTensors
from ldm.utils.errors import UserError
from tests.conftest import CONF_DIR

RNG = np.random.default_rng(0)


def noise_png(size: int = 32) -> bytes:
    """A PNG of random pixels: incompressible, so a cut lands inside the image data."""
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def noise_jpeg(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def broken_files() -> dict[str, bytes]:
    png = noise_png()
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    return {
        "truncated.png": png[: int(len(png) * 0.6)],
        "truncated.jpg": noise_jpeg()[:300],
        "zero.png": b"",
        "text.png": b"this is not an image\n",
        "bitflip.png": bytes(flipped),
    }


def write_folder(root, good: int = 6, bad: dict[str, bytes] | None = None):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"good{i}.png").write_bytes(noise_png())
    for name, data in (bad or {}).items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name", sorted(broken_files()))
def test_broken_file_error_names_the_file(tmp_path, name):
    write_folder(tmp_path, good=0, bad={name: broken_files()[name]})
    dataset = ImageFolder(str(tmp_path), image_size=16).build()
    with pytest.raises(UserError) as err:
        dataset[0]
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"unreadable image file {str(tmp_path / name)!r}"
    )


def test_broken_file_named_through_a_dataloader_worker(tmp_path):
    write_folder(tmp_path, good=0, bad={"truncated.png": broken_files()["truncated.png"]})
    batches = iter(
        DataLoader(ImageFolder(str(tmp_path), image_size=16).build(), batch_size=1, num_workers=1)
    )
    try:
        with pytest.raises(
            UserError, match=r"unreadable image file '.*truncated\.png': image file is truncated"
        ):
            next(batches)
    finally:
        # now, not at a later garbage collection (which waits for the worker)
        batches._shutdown_workers()


def test_skip_corrupt_skips_counts_and_logs(tmp_path, caplog):
    write_folder(tmp_path, good=6, bad=broken_files())
    source = ImageFolder(str(tmp_path), image_size=16, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="ldm.data.sources"):
        dataset = source.build()
    assert len(dataset) == 6 and source.num_skipped == 5
    assert {p.name for p, _ in source.skipped} == set(broken_files())
    assert "skipped 5 of 11 image files" in caplog.text
    batch = next(iter(DataLoader(dataset, batch_size=6)))
    assert batch["image"].shape == (6, 3, 16, 16)
    assert (
        ImageFolder(str(tmp_path), image_size=16).build().paths != dataset.paths
    )  # default keeps all


def test_skip_corrupt_through_the_data_config(tmp_path):
    write_folder(tmp_path, good=4, bad={"zero.png": b""})
    cfg = OmegaConf.load(CONF_DIR / "data" / "image_folder.yaml")
    cfg.root, cfg.num_workers, cfg.image_size, cfg.batch_size = str(tmp_path), 0, 16, 2
    cfg.source.skip_corrupt = True
    datamodule = hydra.utils.instantiate(cfg)
    datamodule.setup()
    assert len(datamodule.full_dataset) == 4 and datamodule.source.num_skipped == 1


def test_all_files_corrupt_or_folder_empty(tmp_path):
    write_folder(tmp_path / "bad", good=0, bad=broken_files())
    with pytest.raises(
        UserError, match=r"holds no readable images: all 5 files failed \(first: unreadable"
    ):
        ImageFolder(str(tmp_path / "bad"), image_size=16, skip_corrupt=True).build()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    for skip in (False, True):
        with pytest.raises(ValueError, match=r"data.root='.*empty' holds no images"):
            ImageFolder(str(tmp_path / "empty"), image_size=16, skip_corrupt=skip).build()


def test_progress_bar_only_for_large_folders(tmp_path, capsys, monkeypatch):
    write_folder(tmp_path, good=4)
    ImageFolder(str(tmp_path), image_size=16, skip_corrupt=True).build()
    assert "checking images" not in capsys.readouterr().err
    monkeypatch.setattr(ImageFolder, "PROGRESS_ABOVE", 3)
    ImageFolder(str(tmp_path), image_size=16, skip_corrupt=True).build()
    assert "checking images" in capsys.readouterr().err


def test_small_images_upscaled_with_a_warning_or_rejected(tmp_path, caplog):
    Image.fromarray(np.full((6, 10, 3), 200, dtype=np.uint8)).save(tmp_path / "small.png")
    with caplog.at_level(logging.WARNING, logger="ldm.data.sources"):
        item = ImageFolder(str(tmp_path), image_size=16).build()[0]
    assert item["image"].shape == (3, 16, 16)
    assert torch.allclose(item["image"], torch.tensor(200 / 255 * 2 - 1), atol=1e-6)
    assert "is 10x6, smaller than data.image_size=16: upscaled" in caplog.text
    strict = ImageFolder(str(tmp_path), image_size=16, allow_upscale=False)
    with pytest.raises(UserError, match=r"'.*small\.png' is 10x6, .*allow_upscale=false forbids"):
        strict.build()[0]
    write_folder(tmp_path, good=2)
    strict = ImageFolder(str(tmp_path), image_size=16, allow_upscale=False, skip_corrupt=True)
    assert len(strict.build()) == 2 and strict.skipped[0][0].name == "small.png"


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    write_folder(tmp_path, good=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 // 4)  # the 32x32 file is now a "bomb"
    with pytest.raises(
        UserError, match=r"unreadable image file '.*good0\.png': Image size \(1024 pixels\)"
    ):
        ImageFolder(str(tmp_path), image_size=16).build()[0]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((8, 24, 3), dtype=np.uint8))  # 24 wide, 8 high
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "phone.jpg", exif=exif)
    dataset = ImageFolder(str(tmp_path), image_size=8).build()
    assert dataset.load_image(dataset.paths[0]).size == (8, 24)


def mode_files(root) -> dict[str, float]:
    """One file per PIL mode; value: the expected gray level (in [-1, 1]) of its top-left pixel in
    mode L."""
    root.mkdir()
    ones = np.ones((16, 16), dtype=np.uint8)
    Image.fromarray(ones * 255).save(root / "L.png")
    Image.fromarray(np.dstack([ones * 255, ones * 0, ones * 0])).save(root / "RGB.png")  # red
    rgba = np.dstack([ones * 255] * 3 + [ones * 0])  # white but fully transparent -> black
    Image.fromarray(rgba, mode="RGBA").save(root / "RGBA.png")
    Image.fromarray(np.dstack([ones * 255, ones * 255]), mode="LA").save(
        root / "LA.png"
    )  # opaque white
    pal = Image.fromarray(ones * 1, mode="P")
    pal.putpalette([0, 0, 255, 255, 255, 255] + [0] * 762)
    pal.save(root / "P.png", transparency=1)  # index 1 = white but transparent -> black
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(
        root / "I16.png"
    )  # 16-bit white
    Image.fromarray(ones.astype(bool)).save(root / "bilevel.png")
    Image.fromarray(np.dstack([ones * 0, ones * 0, ones * 0, ones * 255]), mode="CMYK").save(
        root / "CMYK.jpg"
    )
    luma_red = round(0.299 * 255) / 255 * 2 - 1
    return {
        "L": 1.0,
        "RGB": luma_red,
        "RGBA": -1.0,
        "LA": 1.0,
        "P": -1.0,
        "I16": 1.0,
        "bilevel": 1.0,
        "CMYK": -1.0,
    }


def test_every_mode_converted_explicitly(tmp_path):
    expected = mode_files(tmp_path / "modes")
    opened = {p.stem: Image.open(p).mode for p in (tmp_path / "modes").iterdir()}
    assert opened == {
        "L": "L",
        "RGB": "RGB",
        "RGBA": "RGBA",
        "LA": "LA",
        "P": "P",
        "I16": "I;16",
        "bilevel": "1",
        "CMYK": "CMYK",
    }
    gray = ImageFolder(str(tmp_path / "modes"), image_size=16, mode="L").build()
    rgb = ImageFolder(str(tmp_path / "modes"), image_size=16, mode="RGB").build()
    for i, path in enumerate(gray.paths):
        g, c = gray[i]["image"], rgb[i]["image"]
        assert g.shape == (1, 16, 16) and c.shape == (3, 16, 16)
        assert g[0, 0, 0].item() == pytest.approx(expected[path.stem], abs=2 / 255), path.stem
    red = rgb[[p.stem for p in rgb.paths].index("RGB")]["image"][:, 0, 0]
    assert red.tolist() == [1.0, -1.0, -1.0]
    gray16 = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(gray16).save(tmp_path / "ramp16.png")
    ramp = ImageFolder(str(tmp_path), image_size=16, mode="L").build()
    ramp.paths = [tmp_path / "ramp16.png"]
    values = ((ramp[0]["image"][0].flatten() + 1) / 2 * 255).round()
    assert (
        values.tolist() == np.round(gray16.flatten() / 65535 * 255).tolist()
    )  # rescaled, not clipped


def test_unsupported_mode_is_named(tmp_path):
    Image.fromarray(np.ones((16, 16), dtype=np.float32)).save(tmp_path / "float.tif")
    dataset = ImageFolder(str(tmp_path), image_size=16).build()
    with pytest.raises(UserError, match=r"'.*float\.tif': image mode 'F' is not supported"):
        dataset[0]


def test_truncated_latents_file(tmp_path):
    torch.save({"latents": torch.randn(64, 4, 8, 8)}, tmp_path / "lat.pt")
    data = (tmp_path / "lat.pt").read_bytes()
    (tmp_path / "lat.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        UserError, match=r"latents file '.*lat\.pt' is truncated or not a torch checkpoint"
    ):
        LatentTensors(str(tmp_path / "lat.pt")).build()
