"""How much does stage 1 cost the digits? (issue 21, bench/README.md section 12)

For each stage-1 checkpoint: the project's FID classifier (the CAS judge) reads the validation and
train digits, and the same digits after the autoencoder's round trip (encode, decode), and the
script prints how often each is read as its label, with the reconstructions' mean squared error.
Generated images cannot be read right more often than the reconstructions of real ones, so this is
the ceiling stage 1 puts on a stage-2 model's CAS.

    python bench/autoencoder_readability.py AE_CKPT [AE_CKPT ...] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.config import stage_section
from ldm.metrics.fid import build_extractor
from ldm.metrics.train_classifier import accuracy, collect_images
from ldm.models.loading import autoencoder_from_checkpoint
from ldm.utils.checkpoint import load_checkpoint
from ldm.utils.instantiate import safe_instantiate


@torch.no_grad()
def round_trip(autoencoder, images: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)): KL the posterior mode, VQ quantized, as stage 2 sees the latents."""
    return torch.cat([autoencoder(x).clamp(-1.0, 1.0) for x in images.split(250)])  # (N, C, H, W)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.ckpts:
        ckpt = load_checkpoint(path, expected_stage="autoencoder")
        autoencoder = autoencoder_from_checkpoint(ckpt, path)
        stored = OmegaConf.create(ckpt["ldm"]["config"])
        datamodule = safe_instantiate(
            stage_section(stored, "autoencoder", "data"), where=f"checkpoint {path!r} (data)"
        )
        datamodule.setup("fit")
        _, classifier = build_extractor(
            "classifier", datamodule, stored.paths.cache_dir, verbose=False
        )
        judge = classifier.classifier  # scored with its own held-out accuracy (images in [-1, 1])
        run = Path(path).parent.parent.parent.name  # <run dir>/checkpoints/autoencoder/x.ckpt
        splits = (("val", datamodule.val_dataset), ("train", datamodule.train_dataset))
        for split, dataset in splits:
            images, labels = collect_images(dataset)
            rec = round_trip(autoencoder, images)
            mse = ((rec - images) ** 2).mean()
            print(
                f"{run} {split} (N={len(labels)}): real read right "
                f"{accuracy(judge, images, labels):.3f}, reconstructions "
                f"{accuracy(judge, rec, labels):.3f}, MSE {mse:.4f}"
            )


if __name__ == "__main__":
    main()
