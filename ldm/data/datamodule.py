"""ImageDataModule: one LightningDataModule over any Source, with a deterministic train/val
split."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ldm.data.resumable import ResumableDataLoader, ResumableSampler
from ldm.data.sources import Source

# What the 1-channel or RGB "images" are: pictures, or mel spectrograms of audio clips
# (data=spoken_digits); stored in every checkpoint's data config, checked where it matters.
MODALITIES = ("image", "audio")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random permutation cut into (train, val) index lists: disjoint and reproducible."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    return perm[n_val:], perm[:n_val]


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    """The number of images in a batch of images or cached latents (Lightning's
    ThroughputMonitor)."""
    return len(batch["image"] if "image" in batch else batch["latent"])


class ImageDataModule(pl.LightningDataModule):
    """Serves dict batches `{"image": (B, C, H, W) in [-1, 1], "label": (B,)}` from one Source.

    `num_channels`, `image_size` and `num_classes` are declared in the data config (so model configs
    can interpolate them before any data is read) and checked against the data at `setup()`.
    `root` and `download` are the user-facing keys of file-based sources (`data.root=...`,
    `data.download=true`); their configs interpolate them into the source.
    `modality`: "audio" when the images are mel spectrograms (the source has a `frontend`).
    `indices`: fixed (train, val) index lists (a latents module takes its image module's split);
    otherwise the source's own `split()` if it has one, else a seeded random split.
    `image_datamodule`: for a module serving latents, the module of the images they were encoded
    from (FID compares generated images against those).
    Image folders (ldm.data.folders): `labels`, `load_size`, `preprocessed_cache` are user-facing
    keys that the source config interpolates; `class_names` (set from the class folders by
    `resolve_folder_labels`) must match the folders the source reads. `random_flip` and
    `crop=center|random` augment training batches only (`train_dataloader`), never `train_dataset`
    itself, which FID reads as the real images.
    """

    def __init__(
        self,
        source: Source,
        name: str,
        image_size: int,
        num_channels: int,
        num_classes: int | None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = True,
        root: str | None = None,
        download: bool = False,
        skip_corrupt: bool = False,
        image_datamodule: ImageDataModule | None = None,
        modality: str = "image",
        indices: tuple[list[int], list[int]] | None = None,
        labels: str = "none",
        class_names: list[str] | None = None,
        random_flip: bool = False,
        crop: str = "center",
        load_size: int | None = None,
        preprocessed_cache: bool = False,
    ):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"data.modality={modality!r} is not one of {list(MODALITIES)}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        self.source, self.name, self.modality = source, name, modality
        self.indices = indices
        self.root, self.download, self.skip_corrupt = root, download, skip_corrupt
        self.image_datamodule = image_datamodule
        self.image_size, self.num_channels, self.num_classes = image_size, num_channels, num_classes
        self.batch_size, self.val_fraction, self.split_seed = batch_size, val_fraction, split_seed
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self.persistent_workers = persistent_workers and num_workers > 0
        self.labels, self.load_size, self.preprocessed_cache = labels, load_size, preprocessed_cache
        self.class_names = list(class_names) if class_names is not None else None
        self.random_flip, self.crop = bool(random_flip), crop
        self.full_dataset: Dataset | None = None
        self.train_dataset: Subset | None = None
        self.val_dataset: Subset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.full_dataset is not None:
            return
        full = self.source.build()
        self.check_declared_shape(full)
        if self.indices is not None:
            train_idx, val_idx = (list(i) for i in self.indices)
        elif hasattr(self.source, "split"):  # the source's own split (spoken digits: by voice)
            train_idx, val_idx = self.source.split(full, self.val_fraction, self.split_seed)
        else:
            train_idx, val_idx = split_indices(len(full), self.val_fraction, self.split_seed)
        self.full_dataset = full
        self.train_dataset, self.val_dataset = Subset(full, train_idx), Subset(full, val_idx)

    def check_declared_shape(self, dataset: Dataset) -> None:
        """Fail early, naming the config key, when the data disagrees with the declared shape."""
        item = dataset[0]
        x = item.get("image", item.get("latent"))
        if "image" in item:
            if x.shape[0] != self.num_channels:
                raise ValueError(
                    f"data.num_channels={self.num_channels} "
                    f"but the images have {x.shape[0]} channels"
                )
            if tuple(x.shape[1:]) != (self.image_size, self.image_size):
                raise ValueError(
                    f"data.image_size={self.image_size} but the images are {tuple(x.shape[1:])}"
                )
        has_labels = "label" in item
        if has_labels != (self.num_classes is not None):
            raise ValueError(
                f"data.num_classes={self.num_classes} "
                f"but the source {'has' if has_labels else 'has no'} labels"
            )
        found = getattr(self.source, "class_names", None)
        if found is not None and (
            len(found) != self.num_classes
            or (self.class_names is not None and self.class_names != found)
        ):
            raise ValueError(
                f"data.num_classes={self.num_classes}, data.class_names={self.class_names} but the "
                f"class folders are {found}"
            )
        if found is not None and self.class_names is None:
            self.class_names = list(found)

    @property
    def num_skipped(self) -> int:
        """Unreadable files the source dropped (image_folder with data.skip_corrupt=true), else
        0."""
        return getattr(self.source, "num_skipped", 0)

    def fingerprint(self) -> str:
        """Identifies the exact data and split (used to key caches: FID statistics, latents)."""
        self.setup()
        return (
            f"{self.source.fingerprint(self.full_dataset)}-v{self.val_fraction}-s{self.split_seed}"
        )

    def loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled in an order fixed by (seed, epoch), sharded across DDP ranks, and resumable
        mid-epoch (ldm.data.resumable). The seed is the run's: `seed_everything(seed)` sets it."""
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        )
        dataset = self.train_dataset
        if self.random_flip or self.crop != "center":
            from ldm.data.folders import Augmented

            dataset = Augmented(dataset, self.random_flip, self.crop)
        sampler = ResumableSampler(
            dataset, num_replicas=world, rank=rank, seed=torch.initial_seed()
        )
        return ResumableDataLoader(
            dataset,
            sampler=sampler,
            batch_size=self.batch_size,
            drop_last=self.drop_last and len(self.train_dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
