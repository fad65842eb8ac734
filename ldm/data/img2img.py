"""Image-to-image data: any image data plus a degradation (super-resolution, inpainting).

`Img2ImgDataModule` is an `ImageDataModule` whose items gain the task's inputs:
`{"image", "label"?, "lowres"}` (super-resolution) or `{"image", "label"?, "mask", "masked_image"}`
(inpainting), made by `task(image, generator)` (ldm.data.degradations). The generator of item i is
seeded by (task_seed, i) on the validation split, so validation inputs are the same in every epoch
and run; on the training split also by the epoch, so the model sees new masks / noise every epoch,
reproducibly (a resumed run draws what the uninterrupted one drew). Served from a latent cache,
items also carry `"latent"` (the images still come from the image data).

Select it with `task=superres|inpaint` (conf/task), over any `data=` option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from ldm.data.datamodule import ImageDataModule
from ldm.data.degradations import item_seed
from ldm.utils.errors import UserError

Task = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


class PairedDataset(Dataset):
    """Item i of `base` plus `task(images[i]["image"], generator)`.

    `images` defaults to `base` (it must serve "image"); a latent `base` takes its images from the
    dataset the latents were encoded from (same order). `epoch_of`: a callable giving the current
    epoch (the training loader's sampler), None for inputs fixed per item (validation).
    """

    def __init__(
        self,
        base: Dataset,
        task: Task,
        seed: int,
        images: Dataset | None = None,
        epoch_of: Callable[[], int] | None = None,
    ):
        self.base, self.task, self.seed = base, task, int(seed)
        self.images = images if images is not None else base
        if len(self.images) != len(base):
            raise ValueError(f"{len(base)} items but {len(self.images)} images")
        self.epoch_of = epoch_of

    def __len__(self) -> int:
        return len(self.base)

    def generator(self, index: int) -> torch.Generator:
        parts = (self.seed, index) if self.epoch_of is None else (self.seed, index, self.epoch_of())
        return torch.Generator().manual_seed(item_seed(*parts))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[index])
        image = item["image"] if self.images is self.base else self.images[index]["image"]
        item["image"] = image
        item.update(self.task(image, self.generator(index)))
        return item


class Img2ImgDataModule(ImageDataModule):
    """An ImageDataModule (same arguments) whose batches carry the inputs of an image-to-image
    `task` (a callable `task(image (C, H, W), generator) -> dict`, e.g. SuperResolution or
    Inpainting); `task_seed` seeds them (validation inputs are fixed per item). `task=None`
    serves the plain data (the task configs use it for stage 1, which trains on images only)."""

    def __init__(self, *args: Any, task: Task | None, task_seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.task, self.task_seed = task, task_seed
        self._train_loader: DataLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.full_dataset is not None:
            return
        super().setup(stage)
        if self.task is None:  # plain data (stage 1 of an image-to-image run)
            return
        images = None
        if self.image_datamodule is not None:  # latents: images from the data they came from
            self.image_datamodule.setup()
            images = self.image_datamodule.full_dataset
        # full_dataset stays the plain data (fingerprints, latent caches); the splits gain inputs.
        base = self.full_dataset
        train_pairs = PairedDataset(base, self.task, self.task_seed, images, self.current_epoch)
        val_pairs = PairedDataset(base, self.task, self.task_seed, images)
        self.train_dataset = Subset(train_pairs, self.train_dataset.indices)
        self.val_dataset = Subset(val_pairs, self.val_dataset.indices)

    def current_epoch(self) -> int:
        """The epoch of the training loader's sampler (0 before the first pass)."""
        return int(self._train_loader.sampler.epoch) if self._train_loader is not None else 0

    def train_dataloader(self) -> DataLoader:
        self._train_loader = super().train_dataloader()
        return self._train_loader


def check_task_config(cfg: Any) -> None:
    """Image-to-image (task=superres|inpaint) and the concatenated condition come together: the
    task says which image the UNet's extra input channels (conditioning=concat|hybrid) receive."""
    task = cfg.get("task")
    unet = OmegaConf.select(cfg, "model.diffusion.unet") or {}
    concat = "concat_channels" in unet and (
        OmegaConf.is_interpolation(unet, "concat_channels") or unet.concat_channels
    )
    if task is None and concat:
        raise UserError(
            "conditioning=concat/hybrid concatenates a task's image to the latents; choose it with "
            "task=superres or task=inpaint"
        )
    if task is None:
        return
    if task.get("name") not in ("superres", "inpaint"):
        raise UserError(f"task.name={task.get('name')!r} is not one of superres|inpaint")
    if not concat:
        raise UserError(
            f"task={task.name} needs conditioning=concat or conditioning=hybrid (the UNet takes "
            "no image condition otherwise)"
        )
    context = OmegaConf.select(cfg, "model.diffusion.conditioner.context._target_") or ""
    if context.endswith("ClassConditioner") and cfg.data.get("num_classes") is None:
        raise UserError(
            f"conditioning=hybrid tells the model the class, but data={cfg.data.get('name')} has "
            "no labels (data.num_classes=null); use conditioning=concat"
        )
    factor = OmegaConf.select(task, "degradation.factor")
    if factor is not None and cfg.data.image_size % factor:
        raise UserError(
            f"task.degradation.factor={factor} does not divide data.image_size="
            f"{cfg.data.image_size}"
        )
