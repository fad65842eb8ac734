"""Latent cache: encode a dataset once with the frozen stage-1 encoder and train stage 2 from it.

The file `cache_dir/<key>.pt` holds `{"latents": (N, c, h, w) float32, "labels": (N,) long}`
("labels" only when the data has labels), already multiplied by the autoencoder's scale factor,
in dataset order. The key names the stage-1 checkpoint (sha256 prefix), the split and the dataset
fingerprint, so a new stage-1 checkpoint or other data gives a new file (the cache is "rebuilt");
old files are left alone because concurrent runs (sweeps) may share the cache dir.
The `latents` data source (ldm.data.LatentTensors) reads these files.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ldm.data.datamodule import ImageDataModule
from ldm.data.img2img import Img2ImgDataModule
from ldm.data.sources import LatentTensors
from ldm.utils.cache_lock import cache_lock
from ldm.utils.checkpoint import atomic_write, file_sha256

log = logging.getLogger(__name__)


def latent_cache_key(autoencoder_ckpt: str | Path, split: str, fingerprint: str) -> str:
    """`<sha256(stage-1 checkpoint)[:16]>-<split>-<dataset fingerprint>`, safe as a file name."""
    raw = f"{file_sha256(autoencoder_ckpt)[:16]}-{split}-{fingerprint}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)


@torch.no_grad()
def build_latent_cache(
    autoencoder: nn.Module,
    dataloader: DataLoader,
    cache_dir: str | Path,
    key: str,
    hflip: bool = False,
) -> Path:
    """Encode every batch of `dataloader` (in its order) to scaled latents and save them under
    `cache_dir/<key>.pt`; an existing file for `key` is reused as is. Returns the file's path.
    `hflip`: also the latents of the mirrored images (`latents_hflip`), so that stage 2 on the
    cache keeps `data.random_flip` (an encoder is not mirror-equivariant: flipped latents would
    not do).

    The dataloader must not shuffle or augment: item i of the cache is item i of the dataset.
    Encoding runs in eval mode on the autoencoder's device; the file is written atomically
    (`atomic_write`), so an interrupted run never leaves a truncated cache behind.
    """
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        log.info("latent cache: reusing %s", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(autoencoder.parameters()).device
    was_training = autoencoder.training
    autoencoder.eval()
    latents, labels, flipped = [], [], []
    try:
        # disable=None: a bar on terminals, silent in log files
        for batch in tqdm(
            dataloader, desc=f"encoding latent cache {key[:24]}", leave=False, disable=None
        ):
            z = autoencoder.encode_latents(batch["image"].to(device))  # (B, c, h, w)
            latents.append(z.float().cpu())
            if hflip:
                zf = autoencoder.encode_latents(batch["image"].to(device).flip(-1))
                flipped.append(zf.float().cpu())
            if "label" in batch:
                labels.append(batch["label"].long().cpu())
    finally:
        autoencoder.train(was_training)
    if not latents:
        raise ValueError(f"latent cache {key!r}: the dataloader yielded no batches")
    if labels and len(labels) != len(latents):
        raise ValueError(f"latent cache {key!r}: some batches have labels and some do not")
    payload = {"latents": torch.cat(latents)}  # (N, c, h, w)
    if labels:
        payload["labels"] = torch.cat(labels)  # (N,)
    if flipped:
        payload["latents_hflip"] = torch.cat(flipped)  # (N, c, h, w) of the mirrored images
    atomic_write(path, lambda f: torch.save(payload, f))
    log.info(
        "latent cache: wrote %s latents %s to %s",
        len(payload["latents"]),
        tuple(payload["latents"].shape[1:]),
        path,
    )
    return path


def latent_cache_datamodule(
    autoencoder: nn.Module,
    autoencoder_ckpt: str | Path,
    datamodule: ImageDataModule,
    cache_dir: str | Path,
) -> ImageDataModule:
    """An ImageDataModule serving `{"latent", "label"}` batches from the cached latents of
    `datamodule`'s whole dataset (an Img2ImgDataModule's also carry its task's inputs).

    The whole dataset is cached in order and the new module takes `datamodule`'s train/val
    indices, so its split holds exactly the same items (also for a source's own split, by voice).
    """
    datamodule.setup()
    hflip = bool(getattr(datamodule, "random_flip", False)) and not isinstance(
        datamodule, Img2ImgDataModule
    )
    key = latent_cache_key(autoencoder_ckpt, "full", datamodule.fingerprint())
    key += "-hflip" if hflip else ""
    loader = datamodule.loader(datamodule.full_dataset, shuffle=False)
    # Runs that start together (sweep jobs, DDP ranks) encode it once; the others wait and reuse.
    with cache_lock(Path(cache_dir) / f"{key}.pt", "latent cache"):
        path = build_latent_cache(autoencoder, loader, cache_dir, key, hflip=hflip)
    kwargs = dict(
        source=LatentTensors(str(path), num_classes=datamodule.num_classes),
        name=f"latents-{datamodule.name}",
        image_size=datamodule.image_size,
        num_channels=datamodule.num_channels,
        num_classes=datamodule.num_classes,
        batch_size=datamodule.batch_size,
        val_fraction=datamodule.val_fraction,
        split_seed=datamodule.split_seed,
        num_workers=datamodule.num_workers,
        pin_memory=datamodule.pin_memory,
        persistent_workers=datamodule.persistent_workers,
        drop_last=datamodule.drop_last,
        image_datamodule=datamodule,
        modality=datamodule.modality,
        indices=(list(datamodule.train_dataset.indices), list(datamodule.val_dataset.indices)),
    )
    if isinstance(datamodule, Img2ImgDataModule):  # items keep their image-to-image inputs
        return Img2ImgDataModule(**kwargs, task=datamodule.task, task_seed=datamodule.task_seed)
    return ImageDataModule(**kwargs, random_flip=hflip)
