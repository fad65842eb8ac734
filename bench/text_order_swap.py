"""Does a trained text-to-image model read word order? (issue 17, README "Text-to-image")

Samples each of a few composition prompts and the same prompt with its two digits swapped ("a 1
left of a 4" / "a 4 left of a 1"), and with the relation word flipped ("a 1 right of a 4"), from the
same noise, and prints the mean absolute pixel difference (images in [-1, 1]) between them, beside
the difference between two prompts naming other digits. A model that places the digits by the
caption gives swapped-prompt differences as large as the other-digit ones; a model that reads the
caption as a bag of words gives nearly identical images (difference near 0: cross-attention is
blind to token order when the context carries none).

    python bench/text_order_swap.py CKPT [--num 32] [--guidance 3] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from ldm.models.loading import load_latent_diffusion

PAIRS = [(1, 4), (2, 7), (0, 9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--num", type=int, default=32, help="samples per prompt")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_latent_diffusion(args.ckpt)

    @torch.no_grad()
    def draw(prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(args.seed)  # the same noise for every prompt
        return model.sample(
            args.num, prompts=[prompt] * args.num, guidance_scale=args.guidance, generator=g
        ).float()

    def diff(x: torch.Tensor, y: torch.Tensor) -> float:
        return (x - y).abs().mean().item()

    print(f"{args.ckpt}: mean |pixel difference|, {args.num} samples per prompt, same noise")
    print("| prompt | digits swapped | relation flipped | other digits |")
    print("|---|---|---|---|")
    rows = []
    for (a, b), (c, d) in zip(PAIRS, PAIRS[1:] + PAIRS[:1], strict=True):
        base = draw(f"a {a} left of a {b}")
        swapped = diff(base, draw(f"a {b} left of a {a}"))
        flipped = diff(base, draw(f"a {a} right of a {b}"))
        other = diff(base, draw(f"a {c} left of a {d}"))
        rows.append((swapped, flipped, other))
        print(f"| a {a} left of a {b} | {swapped:.3f} | {flipped:.3f} | {other:.3f} |")
    mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    print(f"| mean | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} |")


if __name__ == "__main__":
    main()
