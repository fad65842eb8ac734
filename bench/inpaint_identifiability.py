"""How much do the known pixels of an inpainting mask say about the digit? A model-free bound.

For each validation image of an inpainting run (the same masks its metrics use: the run's own
data config, task seed and split), the training digits are ranked by squared distance over the
known pixels only. Printed: how often the majority label of the k nearest is the true digit (a
classifier that sees only the known pixels) and the mean share of the k nearest that carry the
true digit (roughly the CAS of a sampler that draws completions in proportion to how well they fit
the known pixels), beside k-NN on whole images.

    python bench/inpaint_identifiability.py logs/mnist_inpaint/runs/RUN
"""

from __future__ import annotations

import argparse
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

import ldm  # noqa: F401  (resolvers)
from ldm.train import stage_section


def stack(items: list[dict], key: str) -> torch.Tensor:
    return torch.stack([torch.as_tensor(item[key]) for item in items])


def masked_sq_dist(x: torch.Tensor, known: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(N, M) sum over the known pixels of each query of (x - bank)^2; inputs flattened."""
    return (known * x * x).sum(1, keepdim=True) - 2 * (known * x) @ bank.T + known @ (bank * bank).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an inpainting run (its config_resolved.yaml)")
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 15])
    args = parser.parse_args()

    cfg = OmegaConf.load(args.run_dir / "config_resolved.yaml")
    if "mask" not in (cfg.get("task") or {}):
        raise SystemExit(f"{args.run_dir} is not an inpainting run (task.mask missing)")
    data = hydra.utils.instantiate(stage_section(cfg, "diffusion", "data"))
    data.setup()
    val = [data.val_dataset[i] for i in range(min(args.num_val, len(data.val_dataset)))]
    x, y = stack(val, "image").flatten(1), stack(val, "label").long()
    known = 1 - stack(val, "mask").flatten(1)  # mask: 1 = hole
    train = [data.full_dataset[i] for i in data.train_dataset.indices]
    bank = stack(train, "image").flatten(1)
    bank_y = stack(train, "label").long()

    dist = masked_sq_dist(x, known, bank)
    whole = masked_sq_dist(x, torch.ones_like(known), bank)
    print(
        f"{len(val)} validation images, {len(train)} training digits, "
        f"mean hole fraction {1 - known.mean().item():.3f}"
    )
    print("| k | majority right (known) | share right (known) | majority right (whole) |")
    print("|---|---|---|---|")
    for k in args.k:
        near, near_whole = dist.topk(k, largest=False).indices, whole.topk(k, largest=False).indices
        majority = (bank_y[near].mode(dim=1).values == y).float().mean().item()
        share = (bank_y[near] == y[:, None]).float().mean().item()
        majority_whole = (bank_y[near_whole].mode(dim=1).values == y).float().mean().item()
        print(f"| {k} | {majority:.3f} | {share:.3f} | {majority_whole:.3f} |")


if __name__ == "__main__":
    main()
