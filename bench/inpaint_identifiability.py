"""How much do the known pixels of an inpainting mask say about the digit? A model-free bound.

For each validation image of an inpainting run (the same masks its metrics use: the run's own
data config, task seed and split), the training digits are ranked by squared distance over the
known pixels only. Printed: how often the majority label of the k nearest is the true digit (a
classifier that sees only the known pixels) and the mean share of the k nearest that carry the
true digit (roughly the CAS of a sampler that draws completions in proportion to how well they fit
the known pixels), beside k-NN on whole images.

`--cnn-epochs N` also trains a small CNN on the training digits with fresh masks of the run's
mask distribution every epoch (input: masked image + mask) and prints its accuracy on the same
validation masks: a learned classifier of the known pixels, a tighter bound than k-NN.

    python bench/inpaint_identifiability.py logs/mnist_inpaint/runs/RUN [--cnn-epochs 30]
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


def masked_digit_cnn() -> torch.nn.Module:
    """Input (B, 2, H, W): masked image and mask; output 10 logits."""
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(), nn.MaxPool2d(2)]  # fmt: skip

    return nn.Sequential(*block(2, 32), *block(32, 64), nn.Conv2d(64, 128, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(128, 10))  # fmt: skip


def cnn_bound(cfg, train_x, train_y, val_x, val_y, val_mask, epochs: int) -> list[float]:
    """Validation accuracy after each epoch of a CNN trained on masked training digits (fresh
    masks from the run's task.mask every epoch, seeded)."""
    import torch.nn.functional as F

    from ldm.data.degradations import mask_image

    masks = hydra.utils.instantiate(cfg.task.mask)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = masked_digit_cnn()
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    side = train_x.shape[-1]

    def inputs(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.cat([mask_image(x, m), m], dim=1)

    accuracies = []
    for epoch in range(epochs):
        m = torch.stack([masks.make_mask(side, g) for _ in range(len(train_x))])
        order = torch.randperm(len(train_x), generator=g)
        net.train()
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(net(inputs(train_x[idx], m[idx])), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        net.eval()
        with torch.no_grad():
            acc = (net(inputs(val_x, val_mask)).argmax(1) == val_y).float().mean().item()
        accuracies.append(acc)
        print(f"CNN on the known pixels, epoch {epoch + 1}/{epochs}: {acc:.3f}", flush=True)
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an inpainting run (its config_resolved.yaml)")
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 15])
    parser.add_argument("--cnn-epochs", type=int, default=0, help="0: k-NN only")
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
    if args.cnn_epochs:
        images = stack(val, "image")
        train_images = stack(train, "image")
        acc = cnn_bound(cfg, train_images, bank_y, images, y, stack(val, "mask"), args.cnn_epochs)
        print(f"CNN on the known pixels, last epoch: {acc[-1]:.3f} (best {max(acc):.3f})")


if __name__ == "__main__":
    main()
