"""Image-to-image inputs: degradations deterministic per seed, masks cover the configured area,
pasting keeps known pixels exactly, the data module serves the task's inputs."""

import pytest
import torch

from ldm.data import ImageDataModule, TensorImageDataset
from ldm.data.degradations import (
    Inpainting,
    SuperResolution,
    bicubic_resize,
    gaussian_blur,
    item_seed,
    paste_known,
)
from ldm.data.img2img import Img2ImgDataModule


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 4, c: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=gen(0)) * 2 - 1


@pytest.mark.parametrize("factor", [2, 4])
def test_superres_shape_and_plain_bicubic(factor):
    image = images(1)[0]
    out = SuperResolution(factor=factor)(image, gen(0))["lowres"]
    assert out.shape == (1, 32 // factor, 32 // factor)
    # without blur and noise it is exactly the antialiased bicubic downscale
    assert torch.equal(out, bicubic_resize(image[None], 32 // factor)[0])


def test_superres_deterministic_per_seed():
    sr = SuperResolution(factor=4, blur_sigma=[0.5, 1.5], noise_std=[0.0, 0.2])
    image = images(1)[0]
    a, b, c = (sr(image, gen(s))["lowres"] for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_blur_keeps_mean_and_smooths():
    x = images(1)
    y = gaussian_blur(x, 1.0)
    assert y.shape == x.shape
    assert y.std() < x.std()
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 8, 8), 0.3), 1.0), torch.tensor(0.3))


@pytest.mark.parametrize("kind", ["box", "stroke", "mixed"])
def test_masks_cover_configured_fraction(kind):
    task = Inpainting(kind=kind, area=[0.25, 0.5])
    fractions = [task.make_mask(32, gen(s)).mean().item() for s in range(40)]
    # boxes: exact up to rounding; strokes: at least the area, at most one segment more
    assert min(fractions) >= 0.22
    assert max(fractions) <= 0.62
    assert sum(fractions) / len(fractions) == pytest.approx(0.39, abs=0.06)


def test_box_area_fixed_fraction():
    task = Inpainting(kind="box", area=0.3)
    for s in range(20):
        assert task.make_mask(32, gen(s)).mean().item() == pytest.approx(0.3, abs=0.03)


def test_inpainting_masks_deterministic_and_binary():
    task = Inpainting()
    image = images(1)[0]
    a, b = task(image, gen(3)), task(image, gen(3))
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["masked_image"], b["masked_image"])
    assert not torch.equal(a["mask"], task(image, gen(4))["mask"])
    assert set(a["mask"].unique().tolist()) <= {0.0, 1.0}
    known = a["mask"][0] == 0
    assert torch.equal(a["masked_image"][0][known], image[0][known])
    assert (a["masked_image"][0][~known] == 0).all()


def test_paste_keeps_known_pixels_exactly():
    original, generated = images(2, c=3), images(2, c=3).flip(0) + 0.123
    mask = Inpainting()(original[0], gen(1))["mask"].expand(2, 1, 32, 32)
    out = paste_known(generated, original, mask)
    known = mask.expand_as(out) == 0
    assert torch.equal(out[known], original[known])
    assert torch.equal(out[~known], generated[~known])


def test_bad_task_settings_are_errors():
    with pytest.raises(ValueError, match="factor"):
        SuperResolution(factor=3)
    with pytest.raises(ValueError, match="area"):
        Inpainting(area=[0.6, 0.2])
    with pytest.raises(ValueError, match="kind"):
        Inpainting(kind="circle")


class _Source:
    name, num_classes = "fake", 10

    def build(self):
        return TensorImageDataset(images(20), torch.arange(20) % 10)

    def fingerprint(self, dataset):
        return "fake"


def datamodule(task, cls=Img2ImgDataModule, **kw):
    dm = cls(
        source=_Source(), name="fake", image_size=32, num_channels=1, num_classes=10,
        batch_size=4, val_fraction=0.2, task=task, **kw,
    )  # fmt: skip
    dm.setup()
    return dm


def test_datamodule_serves_task_inputs_fixed_on_val_varying_on_train():
    dm = datamodule(Inpainting())
    val = dm.val_dataset[0]
    assert set(val) == {"image", "label", "mask", "masked_image"}
    assert torch.equal(val["mask"], dm.val_dataset[0]["mask"])  # fixed per item
    assert torch.equal(val["mask"], datamodule(Inpainting()).val_dataset[0]["mask"])  # and run
    assert not torch.equal(
        val["mask"], datamodule(Inpainting(), task_seed=1).val_dataset[0]["mask"]
    )
    loader = dm.train_dataloader()
    first = dm.train_dataset[0]["mask"]
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, dm.train_dataset[0]["mask"])  # a new mask each epoch
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask"].shape == (4, 1, 32, 32) and batch["masked_image"].shape == (4, 1, 32, 32)
    sr = datamodule(SuperResolution(factor=4)).val_dataset[0]
    assert set(sr) == {"image", "label", "lowres"} and sr["lowres"].shape == (1, 8, 8)


def test_fingerprint_is_the_plain_datas():
    """Latent caches and FID statistics of the plain data are reused by the task's runs."""
    plain = ImageDataModule(
        source=_Source(), name="fake", image_size=32, num_channels=1, num_classes=10,
        batch_size=4, val_fraction=0.2,
    )  # fmt: skip
    assert datamodule(Inpainting()).fingerprint() == plain.fingerprint()


def test_item_seed_streams_differ():
    assert item_seed(0, 1) != item_seed(1, 0) and item_seed(0, 1, 0) != item_seed(0, 1)
