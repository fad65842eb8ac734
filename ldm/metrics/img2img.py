"""Image-to-image evaluation: run a super-resolution / inpainting model over validation items and
score it beside the trivial baseline, in one table.

Super-resolution (Rombach et al. 2022, Sec. 4.4, Table 5 reports FID and IS with PSNR/SSIM):
rows `bicubic` (the low-res input upscaled bicubically) and `ours`; columns PSNR and SSIM against
the originals, FID/KID of the outputs against the real training images, CAS (the dataset
classifier reads the true label). A diffusion SR model samples a plausible image, not the
posterior mean, so it is expected to lose PSNR to bicubic while winning FID (Saharia et al. 2021,
SR3, Sec. 4.2).

Inpainting (Sec. 4.5): rows `masked input` (the baseline: what a classifier reads with the hole
left grey) and `ours` (pasted: known pixels copied back); `known_err` is the mean absolute error
of the known pixels before pasting (what the decoder changed there; 0 after pasting, checked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.utils import make_grid, save_image

from ldm.data.degradations import bicubic_resize, paste_known
from ldm.metrics.fid import compute_metrics

TASKS = ("superres", "inpaint")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of images in [-1, 1], measured on the [0, 1] range."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) (Wang et al. 2004; Gaussian window 11, sigma 1.5) on [0, 1]."""
    x01, y01 = ((x.float() + 1) / 2).clamp(0, 1), ((y.float() + 1) / 2).clamp(0, 1)
    return structural_similarity_index_measure(x01, y01, data_range=1.0, reduction="none")


def model_task(model: Any) -> str:
    """`superres` or `inpaint` from the model's conditioner (a one-line error otherwise)."""
    conditioner = getattr(model, "conditioner", None)
    task = getattr(conditioner, "task", None)
    if task not in TASKS:
        raise ValueError(
            "the model is not an image-to-image model (train it with task=superres or "
            f"task=inpaint); its conditioner is {type(conditioner).__name__}"
        )
    return task


def task_inputs(task: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a batch a task's model is conditioned on."""
    keys = ("lowres",) if task == "superres" else ("masked_image", "mask")
    return {k: batch[k] for k in keys}


@torch.no_grad()
def run_img2img(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    sampler: Any = None,
    paste: bool = True,
    use_labels: bool = True,
) -> dict[str, torch.Tensor]:
    """Outputs of a super-resolution or inpainting model for a batch of its inputs.

    A model that is also told the class (`conditioning=hybrid`: `model.takes_labels`) gets the
    batch's "label" when `use_labels`, with the model's `val_guidance_scale`; otherwise the null
    class, unguided.
    Returns {"output"} (pasted for inpainting when `paste`: the known pixels are the input's) plus
    {"raw"} (inpainting: the decoded sample before pasting) and {"baseline"} (bicubic upscale /
    the masked input). Images (B, C, H, W) in [-1, 1] on the CPU."""
    task = model_task(model)
    inputs = {k: v.to(model.device) for k, v in task_inputs(task, batch).items()}
    n = len(next(iter(inputs.values())))
    labels, guidance = None, 1.0
    if use_labels and getattr(model, "takes_labels", False) and "label" in batch:
        labels = batch["label"].long().to(model.device)
        guidance = float(model.hparams.get("val_guidance_scale", 1.0))
    out = (
        model.sample(
            n,
            class_labels=labels,
            guidance_scale=guidance,
            inputs=inputs,
            generator=generator,
            sampler=sampler,
        )
        .float()
        .cpu()
    )
    if task == "superres":
        size = model.hparams.image_size
        return {"output": out, "baseline": bicubic_resize(batch["lowres"].float().cpu(), size)}
    mask, masked = batch["mask"].cpu(), batch["masked_image"].float().cpu()
    # The known pixels: the original's where it is given (validation), else the masked input's.
    known = batch["image"].float().cpu() if "image" in batch else masked
    return {
        "output": paste_known(out, known, mask) if paste else out,
        "raw": out,
        "baseline": masked,
    }


def _row(
    images: torch.Tensor,
    originals: torch.Tensor,
    labels: torch.Tensor | None,
    fid_args: dict[str, Any],
) -> dict[str, float]:
    row = {
        "psnr": float(psnr(images, originals).mean()),
        "ssim": float(ssim(images, originals).mean()),
    }
    if fid_args.get("extractor") is not None:
        scores = compute_metrics(images, fake_labels=labels, **fid_args)
        row.update({k: float(v) for k, v in scores.items() if k in ("fid", "kid", "cas")})
    return row


UNLABELED_ROW = "ours without label"


@torch.no_grad()
def evaluate_img2img(
    model: Any,
    dataset: Dataset,
    *,
    num_samples: int = 500,
    batch_size: int = 250,
    seed: int = 0,
    extractor: Any = None,
    classifier: Any = None,
    reals: Any = None,
    real_cache: Path | None = None,
    sampler: Any = None,
    paste: bool = True,
    grid_items: int = 8,
) -> dict[str, Any]:
    """Score the model on the first `num_samples` items of `dataset` (validation items with
    "image", the task's inputs and optionally "label").

    Returns {"task", "num_samples", "rows": {row: {metric: value}}, "grid": (C, H', W') in [0, 1]}
    where the grid has one row per item: inputs | baseline | ours | original (inpainting: masked
    | ours | original). FID/KID/CAS need `extractor` (+ `reals` or a `real_cache` file; CAS needs
    `classifier` and labels)."""
    task = model_task(model)
    n = min(num_samples, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    unlabeled_generator = torch.Generator().manual_seed(seed)
    outs: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        result = run_img2img(model, batch, generator=generator, sampler=sampler, paste=paste)
        if getattr(model, "takes_labels", False):  # the same model, not told the class
            result["unlabeled"] = run_img2img(
                model,
                batch,
                generator=unlabeled_generator,
                sampler=sampler,
                paste=paste,
                use_labels=False,
            )["output"]
        result["original"] = batch["image"].float()
        if "label" in batch:
            result["label"] = batch["label"]
        if task == "inpaint":
            result["mask"] = batch["mask"]
        else:
            result["lowres"] = batch["lowres"].float()
        for k, v in result.items():
            outs.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in outs.items()}
    originals, labels = cat["original"], cat.get("label")
    fid_args = {
        "extractor": extractor,
        "classifier": classifier if labels is not None else None,
        "reals": reals,
        "real_cache": real_cache,
        "kid_subset_size": min(1000, n),
        "seed": seed,
    }
    baseline_name = "bicubic" if task == "superres" else "masked input"
    rows = {
        baseline_name: _row(cat["baseline"], originals, labels, fid_args),
        "ours": _row(cat["output"], originals, labels, fid_args),
    }
    if "unlabeled" in cat:
        rows[UNLABELED_ROW] = _row(cat["unlabeled"], originals, labels, fid_args)
    if task == "inpaint":
        known = (cat["mask"] < 0.5).expand_as(originals)
        raw_err = (cat["raw"] - originals).abs()[known].mean() / 2  # in [0, 1] units
        out_err = (cat["output"] - originals).abs()[known].mean() / 2
        rows["ours"]["known_err"] = float(out_err)  # exactly 0 when pasted
        rows["ours (before paste)"] = {"known_err": float(raw_err)}
        rows["ours"]["hole_fraction"] = float(cat["mask"].mean())
    grid = comparison_grid(task, {k: v[:grid_items] for k, v in cat.items()})
    return {"task": task, "num_samples": n, "rows": rows, "grid": grid}


def grid_columns(task: str, labeled: bool = False) -> list[str]:
    """The comparison grid's columns, left to right."""
    if task == "superres":
        return ["low-res (nearest)", "bicubic", "ours", "original"]
    return ["masked", "ours", *([UNLABELED_ROW] if labeled else []), "original"]


def comparison_grid(task: str, cat: dict[str, torch.Tensor]) -> torch.Tensor:
    """(C, H', W') in [0, 1], one row per item, columns `grid_columns`: low-res (nearest) |
    bicubic | ours | original (super-resolution) or masked | ours | original (inpainting; a model
    told the class adds the same model without the label before the original)."""
    originals = cat["original"]
    if task == "superres":
        lowres_up = F.interpolate(cat["lowres"], size=originals.shape[-2:], mode="nearest")
        columns = [lowres_up, cat["baseline"], cat["output"], originals]
    else:
        unlabeled = [cat["unlabeled"]] if "unlabeled" in cat else []
        columns = [cat["baseline"], cat["output"], *unlabeled, originals]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (k * columns, C, H, W), item-major
    return make_grid(((tiles + 1) / 2).clamp(0, 1), nrow=len(columns), padding=2)


@torch.no_grad()
def img2img_grid(
    model: Any, dataset: Dataset, num_items: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The comparison grid of the model on the first `num_items` items of `dataset` (the
    validation grid and final_samples.png of image-to-image runs)."""
    task = model_task(model)
    items = [dataset[i] for i in range(min(num_items, len(dataset)))]
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    cat = run_img2img(model, batch, generator=generator)
    cat["original"] = batch["image"].float()
    if task == "superres":
        cat["lowres"] = batch["lowres"].float()
    return comparison_grid(task, cat)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the rows (metrics as columns), N in the header line."""
    rows = result["rows"]
    metrics = [m for m in ("psnr", "ssim", "fid", "kid", "cas", "known_err", "hole_fraction")
               if any(m in r for r in rows.values())]  # fmt: skip
    lines = [
        f"{result['task']} on {result['num_samples']} validation images",
        "",
        "| | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name, row in rows.items():
        cells = [f"{row[m]:.4g}" if m in row else "" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_result(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """`img2img_metrics.json`, `img2img_metrics.md` and `img2img_grid.png` in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "img2img_metrics.json",
        "table": out / "img2img_metrics.md",
        "grid": out / "img2img_grid.png",
    }
    payload = {k: result[k] for k in ("task", "num_samples", "rows")}
    labeled = UNLABELED_ROW in result["rows"]
    payload["grid_columns"] = " | ".join(grid_columns(result["task"], labeled))
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["table"].write_text(format_table(result) + "\n")
    save_image(result["grid"], paths["grid"])
    return paths
