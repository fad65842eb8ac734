"""Can the text encoder tell which digit goes left? (issue 17, README "Text-to-image")

The mnist_text preset's encoder (`TextConditioner`, dim 64, depth 2, 4 heads) plus two learned
queries that read its output by cross-attention, as the UNet's SpatialTransformers do, trained
with cross-entropy to name the left and the right digit of the preset's two-digit captions ("a 3
left of a 7", "seven right of the digit three", ...): a random 90 / 10 split of those captions,
held-out accuracy of both digits in their places, and of both in swapped places (equal digits
count as both). If this learns the order and the diffusion-trained encoder does not, the encoder's
capacity is not what fails.

    python bench/text_order_probe.py [--steps 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.captions import MNIST5kCaptions
from ldm.modules.text import TextConditioner, train_vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = MNIST5kCaptions(image_size=32, seed=0, composition_fraction=0.4).build()
    pairs = [i for i in range(len(data.captions)) if int(data.second[i]) >= 0]
    random.Random(args.seed).shuffle(pairs)  # the source is sorted by digit: split at random
    captions = [data.captions[i] for i in pairs]
    targets = torch.stack([data.labels[pairs], data.second[pairs]], 1)  # (N, 2): left, right
    n_train = int(0.9 * len(pairs))
    held_out = list(range(n_train, len(pairs)))

    torch.manual_seed(args.seed)
    encoder = TextConditioner(train_vocab(data.captions), max_length=16, dim=64, depth=2)
    queries = nn.Parameter(torch.randn(2, 64) * 0.02)  # "left", "right"
    read = nn.MultiheadAttention(64, 4, batch_first=True)
    head = nn.Linear(64, 10)
    params = [*encoder.parameters(), queries, *read.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def logits(rows: list[int]) -> torch.Tensor:
        out = encoder.encode([captions[i] for i in rows])
        ctx, mask = out["context"], out["context_mask"]
        slots, _ = read(queries.expand(len(rows), -1, -1), ctx, ctx, key_padding_mask=~mask)
        return head(slots)  # (B, 2, 10)

    start = time.process_time()
    for step in range(args.steps + 1):
        rows = torch.randint(0, n_train, (64,)).tolist()
        loss = F.cross_entropy(logits(rows).flatten(0, 1), targets[rows].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                pred = logits(held_out).argmax(-1)  # (N, 2)
            truth = targets[held_out]
            both = (pred == truth).all(1).float().mean().item()
            swapped = (pred == truth.flip(1)).all(1).float().mean().item()
            print(
                f"step {step:4d}  train loss {loss.item():.3f}  held-out ({len(held_out)}): "
                f"both right {both:.3f}  swapped {swapped:.3f}  "
                f"({time.process_time() - start:.0f} CPU-s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
