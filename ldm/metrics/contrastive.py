"""A self-supervised FID feature network for unlabeled data, trained (once) on the dataset itself.

Inception weights cannot be downloaded offline and the project's classifier needs labels, so for
an unlabeled folder ldm trains a small CNN with SimCLR's contrastive objective (Chen et al. 2020,
"A Simple Framework for Contrastive Learning of Visual Representations"): two random augmentations
of each image (resized crop, flip, colour jitter, grayscale) must find each other among all views
of the batch (NT-Xent loss). Its pooled trunk activations (before the projection head, as in the
paper) are the FID features. Cached by dataset fingerprint and settings like the classifier:
`${fid.cache_dir}/fid/<fingerprint>/contrastive_<settings hash>.{pt,json}`.

    python -m ldm.metrics.contrastive data=image_folder data.root=DIR [fid.contrastive.epochs=20]
        [--retrain]

The summary reports `val_pair_accuracy`: on the held-out val split, the fraction of augmented views
whose nearest neighbour (cosine, in feature space) among all 2N views is the other view of the same
image, a sanity number (chance is 1 / (2N - 1)). FID with these features tracks a run; it is not
comparable with published (Inception) numbers or across datasets.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.metrics.train_classifier import (
    cli_config,
    collect_images,
    save_json,
    save_tensors,
    settings_hash,
)
from ldm.utils.cache_lock import load_or_build
from ldm.utils.checkpoint import read_torch_file
from ldm.utils.errors import UserError

DEFAULT_TRAINING = {
    "epochs": 15,
    "batch_size": 128,
    "lr": 2e-3,
    "temperature": 0.2,
    "seed": 0,
    "min_crop_scale": 0.3,
}
DEFAULT_ARCH = {"widths": [32, 64, 128], "input_size": 32, "proj_dim": 64}


class ContrastiveEncoder(nn.Module):
    """Conv trunk (per width: 3x3 conv stride 2 + BN + ReLU, then 3x3 conv + BN + ReLU), global
    average pool -> features (B, widths[-1]); an MLP projection head for the contrastive loss.
    Inputs: images in [-1, 1] of shape (B, in_channels, input_size, input_size)."""

    def __init__(
        self,
        in_channels: int = 3,
        input_size: int = 32,
        widths: list[int] | tuple[int, ...] = (32, 64, 128),
        proj_dim: int = 64,
    ):
        super().__init__()
        if input_size < 8:
            raise ValueError(f"input_size={input_size} must be >= 8")
        self.in_channels, self.input_size = in_channels, input_size
        self.widths, self.proj_dim = [int(w) for w in widths], proj_dim
        layers, c = [], in_channels
        for w in self.widths:
            layers += [
                nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            c = w
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, proj_dim))
        self.feature_dim = c
        # Set after training so the train images' features have unit mean variance per dimension:
        # FIDs then read on one scale whatever the network's activation sizes (noise ceilings in
        # the tens to hundreds, like the classifier's), not 1e-4.
        self.register_buffer("feature_scale", torch.ones(()))

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "input_size": self.input_size,
            "widths": list(self.widths),
            "proj_dim": self.proj_dim,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) pooled trunk activations (times feature_scale): the FID features."""
        return self.trunk(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, proj_dim) projections (the loss's embedding)."""
        return self.head(self.trunk(x))


def augment(
    x: torch.Tensor, size: int, generator: torch.Generator, min_scale: float = 0.3
) -> torch.Tensor:
    """SimCLR-style random views of a batch (B, C, H, W) in [-1, 1] -> (B, C, size, size).

    Per image: a resized crop (area scale in [min_scale, 1], aspect in [3/4, 4/3]) with a random
    horizontal flip, done by one affine grid sample; then with p=0.8 colour jitter (brightness
    +-0.4, contrast and saturation x[0.6, 1.4]) and with p=0.2 grayscale.
    """
    b, c = x.shape[:2]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    scale = uniform(min_scale, 1.0)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
    sx = (scale * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop half-width as a fraction
    sy = (scale / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx, ty = (1 - sx) * uniform(-1, 1), (1 - sy) * uniform(-1, 1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, (b, c, size, size), align_corners=False)
    out = F.grid_sample(
        x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False
    )
    jitter = (torch.rand(b, generator=generator) < 0.8).float().view(b, 1, 1, 1)
    brightness = uniform(-0.4, 0.4).view(b, 1, 1, 1)
    contrast = uniform(0.6, 1.4).view(b, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (out - mean) * contrast + mean + brightness
    if c == 3:
        gray = jittered.mean(dim=1, keepdim=True)
        saturation = uniform(0.6, 1.4).view(b, 1, 1, 1)
        jittered = gray + (jittered - gray) * saturation
    out = jitter * jittered + (1 - jitter) * out
    if c == 3:
        to_gray = (torch.rand(b, generator=generator) < 0.2).float().view(b, 1, 1, 1)
        out = to_gray * out.mean(dim=1, keepdim=True).expand_as(out) + (1 - to_gray) * out
    return out.clamp(-1.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized temperature-scaled cross entropy over 2B views (B positive pairs)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, d)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = len(z1)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


@torch.no_grad()
def pair_accuracy(
    model: ContrastiveEncoder, images: torch.Tensor, seed: int = 1, min_scale: float = 0.3
) -> float:
    """Fraction of 2N augmented views whose nearest other view (cosine, features) is their pair."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    images = images[:500]
    f1 = F.normalize(model.features(augment(images, model.input_size, generator, min_scale)), dim=1)
    f2 = F.normalize(model.features(augment(images, model.input_size, generator, min_scale)), dim=1)
    f = torch.cat([f1, f2])
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    n = len(images)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return float((sim.argmax(1) == target).float().mean())


def train_contrastive(
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    *,
    epochs: int = 15,
    batch_size: int = 128,
    lr: float = 2e-3,
    temperature: float = 0.2,
    seed: int = 0,
    min_crop_scale: float = 0.3,
    widths: list[int] | tuple[int, ...] = (32, 64, 128),
    input_size: int = 32,
    proj_dim: int = 64,
    log: Any = None,
) -> tuple[ContrastiveEncoder, dict[str, Any]]:
    """Train a ContrastiveEncoder on images (N, C, H, W) in [-1, 1] with Adam and a one-cycle LR.

    Inside a forked RNG (a run's random stream is untouched) with autograd on (it may be called
    from a validation hook). Returns the model (eval, CPU) and a summary with `val_pair_accuracy`.
    """
    if epochs <= 0:
        raise UserError(f"fid.contrastive.epochs={epochs} must be >= 1")
    batch_size = min(batch_size, len(train_images))
    if batch_size < 2:
        raise UserError(
            f"the contrastive FID network needs >= 2 training images, got {len(train_images)}"
        )
    start = time.perf_counter()
    channels = train_images.shape[1]
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        train_images = train_images.clone()
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = ContrastiveEncoder(channels, input_size, widths, proj_dim)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        steps_per_epoch = len(train_images) // batch_size
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
        )
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(train_images), generator=generator)
            for step in range(steps_per_epoch):
                x = train_images[order[step * batch_size : (step + 1) * batch_size]]
                v1 = augment(x, input_size, generator, min_crop_scale)  # (B, C, S, S)
                v2 = augment(x, input_size, generator, min_crop_scale)
                loss = nt_xent(model(v1), model(v2), temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            if not math.isfinite(loss.item()):
                raise RuntimeError(
                    f"contrastive training diverged (loss {loss.item()}) at epoch {epoch}; "
                    f"lower lr={lr}"
                )
            if log is not None:
                log(f"contrastive epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    model = model.eval()
    with torch.no_grad():
        feats = torch.cat(
            [model.trunk(train_images[i : i + 500]) for i in range(0, len(train_images), 500)]
        )
        model.feature_scale.fill_(float(feats.var(dim=0).mean().clamp_min(1e-12).rsqrt()))
    summary = {
        "val_pair_accuracy": pair_accuracy(model, val_images, min_scale=min_crop_scale),
        "chance_pair_accuracy": 1 / max(1, 2 * min(len(val_images), 500) - 1),
        "final_loss": round(float(loss.item()), 4),
        "num_train": len(train_images),
        "num_val": len(val_images),
        "seconds": round(time.perf_counter() - start, 2),
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "temperature": temperature,
            "seed": seed,
            "min_crop_scale": min_crop_scale,
        },
        "config": model.config(),
    }
    return model, summary


def contrastive_paths(
    cache_dir: str | Path, fingerprint: str, settings: dict[str, Any]
) -> tuple[Path, Path]:
    stem = Path(cache_dir) / "fid" / fingerprint / f"contrastive_{settings_hash(settings)}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def load_contrastive(
    weights: Path, summary_path: Path
) -> tuple[ContrastiveEncoder, dict[str, Any]]:
    summary = json.loads(summary_path.read_text())
    model = ContrastiveEncoder(**summary["config"])
    model.load_state_dict(read_torch_file(weights, what="contrastive FID network weights"))
    return model.eval(), summary


def get_or_train_contrastive(
    datamodule: Any,
    cache_dir: str | Path,
    *,
    retrain: bool = False,
    verbose: bool = True,
    **settings: Any,
) -> tuple[ContrastiveEncoder, dict[str, Any]]:
    """The dataset's contrastive feature network: from the cache, or trained on its train split
    now (labels, if any, are not used). Keyed by `datamodule.fingerprint()` and the settings."""
    unknown = set(settings) - set(DEFAULT_TRAINING) - set(DEFAULT_ARCH)
    if unknown:
        raise UserError(
            f"unknown fid.contrastive settings {sorted(unknown)}; valid: "
            f"{sorted({**DEFAULT_TRAINING, **DEFAULT_ARCH})}"
        )
    settings = {**DEFAULT_TRAINING, **DEFAULT_ARCH, **settings}
    settings["widths"] = [int(w) for w in settings["widths"]]
    datamodule.setup("fit")
    weights, summary_path = contrastive_paths(cache_dir, datamodule.fingerprint(), settings)
    say = print if verbose else (lambda _msg: None)

    def cached() -> tuple[ContrastiveEncoder, dict[str, Any]]:
        model, summary = load_contrastive(weights, summary_path)
        say(
            f"FID contrastive network: loaded {weights} (val pair accuracy "
            f"{summary['val_pair_accuracy']:.3f}, chance {summary['chance_pair_accuracy']:.4f})"
        )
        return model, summary

    return load_or_build(
        (weights, summary_path),
        "FID contrastive network",
        cached,
        lambda: train_and_save(datamodule, settings, weights, summary_path, say),
        retrain,
    )


def train_and_save(
    datamodule: Any, settings: dict[str, Any], weights: Path, summary_path: Path, say: Any
) -> tuple[ContrastiveEncoder, dict[str, Any]]:
    train_x, _ = collect_images(datamodule.train_dataset)
    val_x, _ = collect_images(datamodule.val_dataset)
    model, summary = train_contrastive(train_x, val_x, **settings)
    summary["dataset"] = datamodule.fingerprint()
    save_tensors(model.state_dict(), weights)
    save_json(summary, summary_path)
    say(
        f"FID contrastive network: trained in {summary['seconds']:.1f}s on {summary['num_train']} "
        f"images, val pair accuracy {summary['val_pair_accuracy']:.3f} (chance "
        f"{summary['chance_pair_accuracy']:.4f}); saved {weights}"
    )
    return model, summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: get (or with --retrain, retrain) the contrastive network of the configured data."""
    cfg, datamodule, retrain = cli_config(argv)
    settings = dict(cfg.fid.get("contrastive") or {})
    _, summary = get_or_train_contrastive(
        datamodule, cfg.fid.cache_dir, retrain=retrain, **settings
    )
    return summary


if __name__ == "__main__":
    main()
