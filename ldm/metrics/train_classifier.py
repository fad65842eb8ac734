"""Train (once) and cache the FID feature classifier of a dataset.

    python -m ldm.metrics.train_classifier data=mnist5k [fid.classifier.epochs=6] [--retrain]

composes conf/train.yaml like train.py does, trains on the data module's train split, measures
the accuracy on the held-out val split, and stores both under
`${fid.cache_dir}/fid/<dataset fingerprint>/classifier_<settings hash>.{pt,json}`. FID code calls
`get_or_train_classifier`, which does the same the first time features are needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ldm.metrics.classifier import FeatureClassifier
from ldm.metrics.classifier_config import ARCH_KEYS, DEFAULTS, TRAINING_KEYS
from ldm.utils.cache_lock import load_or_build
from ldm.utils.checkpoint import atomic_write, read_torch_file
from ldm.utils.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# The settings' names and defaults: ldm.metrics.classifier_config (also conf/fid/classifier.yaml's).
DEFAULT_TRAINING = {k: DEFAULTS[k] for k in TRAINING_KEYS}
DEFAULT_ARCH = {k: DEFAULTS[k] for k in ARCH_KEYS}


def iter_image_batches(
    source: torch.Tensor | Dataset | Iterable, batch_size: int = 500
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (images (B, C, H, W) in [-1, 1], labels (B,) or None) from an image tensor
    (N, C, H, W), a map-style Dataset of dict items, or any iterable of batches (dicts with
    "image"/"label", (image, label) pairs or tensors)."""
    if torch.is_tensor(source):
        for i in range(0, len(source), batch_size):
            yield source[i : i + batch_size], None
        return
    if isinstance(source, Dataset) and not isinstance(source, torch.utils.data.IterableDataset):
        source = DataLoader(source, batch_size=batch_size, shuffle=False)
    for batch in source:
        if isinstance(batch, Mapping):
            if "image" not in batch:
                raise ValueError(
                    f"batch keys {sorted(batch)} have no 'image' (FID needs images, not latents)"
                )
            yield batch["image"], batch.get("label")
        elif isinstance(batch, list | tuple):
            yield batch[0], batch[1] if len(batch) > 1 else None
        else:
            yield batch, None


def collect_images(
    source: Dataset | Iterable, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All images (N, C, H, W) and labels (N,) (or None) of a dataset or loader, on the CPU."""
    images, labels = [], []
    for x, y in iter_image_batches(source, batch_size):
        images.append(x.cpu())
        if y is not None:
            labels.append(y.cpu())
    return torch.cat(images), (torch.cat(labels).long() if labels else None)


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> float:
    """Top-1 accuracy of `model` on images in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(device))  # (B, K)
        correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / len(images)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate a batch by one random offset of up to `max_shift` pixels (edge-replicated)."""
    if max_shift <= 0:
        return x
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    return padded[..., dy : dy + h, dx : dx + w]


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    seed: int = DEFAULTS["seed"],
    max_shift: int = DEFAULTS["max_shift"],
    widths: tuple[int, int] | list[int] = tuple(DEFAULTS["widths"]),
    feature_dim: int = DEFAULTS["feature_dim"],
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[FeatureClassifier, dict[str, Any]]:
    """Train a FeatureClassifier with Adam and a one-cycle LR (Smith & Topin 2017) on images in
    [-1, 1].

    Runs inside a forked RNG so that training it in the middle of a run does not change the run's
    random stream, and with autograd on even when called from a no-grad/inference-mode hook.
    Returns the model (eval mode, on CPU) and a summary with `test_accuracy` (measured on the given
    val images, never trained on).
    """
    if epochs <= 0:
        raise UserError(f"fid.classifier.epochs={epochs} must be >= 1")
    # A small dataset (an image folder of a few dozen files) trains on all of it in one batch.
    batch_size = min(batch_size, len(train_images))
    if batch_size < 2:
        raise UserError(f"the FID classifier needs >= 2 training images, got {len(train_images)}")
    start = time.perf_counter()
    _, channels, height, width = train_images.shape
    if height != width:
        raise ValueError(f"the classifier needs square images, got {height}x{width}")
    # May run inside a validation hook (inference mode): training needs autograd and normal tensors.
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        train_images, train_labels = train_images.clone(), train_labels.clone()
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = FeatureClassifier(channels, num_classes, height, widths, feature_dim).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        steps_per_epoch = len(train_images) // batch_size
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
        )
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(train_images), generator=generator)
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size]
                x = random_shift(train_images[idx], max_shift, generator).to(device)  # (B, C, H, W)
                loss = F.cross_entropy(model(x), train_labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            if not math.isfinite(loss.item()):
                raise RuntimeError(
                    f"classifier training diverged (loss {loss.item()}) at epoch {epoch}; "
                    f"lower lr={lr}"
                )
            if log is not None:
                log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    model = model.cpu().eval()
    summary = {
        "test_accuracy": accuracy(model, val_images, val_labels),
        "test_split": "val",
        "num_train": len(train_images),
        "num_test": len(val_images),
        "seconds": round(time.perf_counter() - start, 2),
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "max_shift": max_shift,
        },
        "config": model.config(),
    }
    return model, summary


def settings_hash(settings: Mapping[str, Any]) -> str:
    """Short stable hash of the training + architecture settings (part of the cache file name)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def classifier_paths(
    cache_dir: str | Path, fingerprint: str, settings: Mapping[str, Any]
) -> tuple[Path, Path]:
    """(weights .pt, summary .json) of the classifier for one dataset and one set of settings."""
    stem = Path(cache_dir) / "fid" / fingerprint / f"classifier_{settings_hash(settings)}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def save_tensors(obj: Any, path: Path) -> None:
    """torch.save through the project's atomic write: readers never see half a file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: Path) -> None:
    atomic_write(
        path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
    )


def load_classifier(weights: Path, summary_path: Path) -> tuple[FeatureClassifier, dict[str, Any]]:
    """Rebuild a cached classifier from its summary's config; strict, tensors-only load."""
    summary = json.loads(summary_path.read_text())
    model = FeatureClassifier(**summary["config"])
    model.load_state_dict(read_torch_file(weights, what="FID classifier weights"))
    return model.eval(), summary


def get_or_train_classifier(
    datamodule: Any,
    cache_dir: str | Path,
    *,
    retrain: bool = False,
    device: str | torch.device = "cpu",
    verbose: bool = True,
    **settings: Any,
) -> tuple[FeatureClassifier, dict[str, Any]]:
    """The dataset's feature classifier: loaded from the cache, or trained on its train split now.

    `datamodule` is an ImageDataModule (labels required); `settings` override DEFAULT_TRAINING and
    DEFAULT_ARCH (epochs, batch_size, lr, seed, max_shift, widths, feature_dim). The cache is keyed
    by `datamodule.fingerprint()` and the settings, so a classifier trained with other settings
    (e.g. a one-epoch debug run) is never mistaken for this one. Returns (model, summary).
    """
    unknown = set(settings) - set(DEFAULT_TRAINING) - set(DEFAULT_ARCH)
    if unknown:
        raise UserError(
            f"unknown classifier settings {sorted(unknown)}; "
            f"valid: {sorted({**DEFAULT_TRAINING, **DEFAULT_ARCH})}"
        )
    settings = {**DEFAULT_TRAINING, **DEFAULT_ARCH, **settings}
    settings["widths"] = [int(w) for w in settings["widths"]]
    if getattr(datamodule, "num_classes", None) is None:
        raise UserError(
            "fid.extractor=classifier needs a labeled dataset (data.num_classes is null); use "
            "fid=auto (self-supervised features on unlabeled data) or fid=inception with "
            "fid.inception_weights=PATH"
        )
    datamodule.setup("fit")
    weights, summary_path = classifier_paths(cache_dir, datamodule.fingerprint(), settings)
    say = print if verbose else (lambda _msg: None)

    def cached() -> tuple[FeatureClassifier, dict[str, Any]]:
        model, summary = load_classifier(weights, summary_path)
        say(
            f"FID classifier: loaded {weights} (test accuracy {summary['test_accuracy']:.4f} "
            f"on {summary['num_test']} images)"
        )
        return model, summary

    return load_or_build(
        (weights, summary_path),
        "FID classifier",
        cached,
        lambda: train_and_save(datamodule, settings, weights, summary_path, device, say),
        retrain,
    )


def train_and_save(
    datamodule: Any,
    settings: dict[str, Any],
    weights: Path,
    summary_path: Path,
    device: str | torch.device,
    say: Callable[[str], Any],
) -> tuple[FeatureClassifier, dict[str, Any]]:
    """Train the classifier on the data module's train split and cache it (weights + summary)."""
    train_x, train_y = collect_images(datamodule.train_dataset)
    val_x, val_y = collect_images(datamodule.val_dataset)
    if train_y is None or val_y is None:
        raise ValueError(
            "the data module's items carry no 'label'; the FID classifier needs labels"
        )
    arch = {k: settings[k] for k in DEFAULT_ARCH}
    training = {k: settings[k] for k in DEFAULT_TRAINING}
    model, summary = train_classifier(
        train_x,
        train_y,
        val_x,
        val_y,
        datamodule.num_classes,
        **training,
        **arch,
        device=device,
        log=None,
    )
    summary["dataset"] = datamodule.fingerprint()
    save_tensors(model.state_dict(), weights)
    save_json(summary, summary_path)
    say(
        f"FID classifier: trained in {summary['seconds']:.1f}s, "
        f"test accuracy {summary['test_accuracy']:.4f} "
        f"on {summary['num_test']} held-out images; saved {weights}"
    )
    return model, summary


def cli_config(argv: list[str] | None) -> tuple[Any, Any, bool]:
    """(run config, stage 2's data module, --retrain) for the feature-network CLIs: conf/train.yaml
    composed with the given overrides, as train.py composes it (FID judges stage 2's data)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from ldm.config import stage_section
    from ldm.data.folders import resolve_folder_labels

    args = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in args if a != "--retrain"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)  # so paths.root_dir (the launch dir) resolves as under train.py
    resolve_folder_labels(cfg)
    datamodule = instantiate(stage_section(cfg, "diffusion", "data"))
    return cfg, datamodule, "--retrain" in args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: get (or with --retrain, retrain) the classifier of the configured data."""
    cfg, datamodule, retrain = cli_config(argv)
    settings = dict(cfg.fid.get("classifier") or {})
    _, summary = get_or_train_classifier(datamodule, cfg.fid.cache_dir, retrain=retrain, **settings)
    return summary


if __name__ == "__main__":
    main()
