"""Image-to-image sampling for sample.py: super-resolution, inpainting and SDEdit from input files.

    python sample.py ckpt=SR.ckpt task=superres input=PATH|DIR          # upscaled images
    python sample.py ckpt=INP.ckpt task=inpaint input=PATH mask=PATH     # mask: white = fill
    python sample.py ckpt=ANY.ckpt init_image=PATH|DIR strength=0.6     # SDEdit, any model

`prepare(cfg, model)` reads and checks every input (one-line UserError for a missing file, a wrong
size, channel count or mode, a task the checkpoint was not trained for, a strength outside (0, 1])
before anything is written; `generate(...)` runs the model batch by batch from one seeded CPU
generator; `write(...)` saves one PNG per output (named after its input), and `grid.png` with a
row per input: low-res (nearest) | bicubic | ours (super-resolution), masked | ours (inpainting),
input | ours (SDEdit).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ldm.data.image_inputs import read_images, read_mask
from ldm.utils.errors import UserError

MODES = ("superres", "inpaint", "sdedit")


def model_task(model: Any) -> str | None:
    """`superres` / `inpaint` for a model trained with task=..., else None."""
    return getattr(getattr(model, "conditioner", None), "task", None)


def mode_of(cfg: DictConfig) -> str | None:
    """Which image-to-image mode the settings ask for (None: plain sampling)."""
    if cfg.get("init_image") is not None:
        if cfg.get("task") is not None:
            raise UserError("init_image= (SDEdit) and task= are separate modes; give one of them")
        return "sdedit"
    task = cfg.get("task")
    if task is None:
        for key in ("input", "mask"):
            if cfg.get(key) is not None:
                raise UserError(f"{key}= needs task=superres or task=inpaint")
        return None
    if task not in ("superres", "inpaint"):
        raise UserError(f"task={task!r} is not one of superres, inpaint")
    return task


def prepare(cfg: DictConfig, model: Any, stored: dict[str, Any]) -> dict[str, Any] | None:
    """Read and check the inputs of the requested mode; None for plain sampling. `stored`: the
    checkpoint's training config (its `task` gives the SR factor and the paste default)."""
    mode = mode_of(cfg)
    trained = model_task(model)
    if mode is None:
        if trained is not None:
            extra = " mask=PATH" if trained == "inpaint" else ""
            raise UserError(
                f"the checkpoint {cfg.ckpt} was trained with task={trained}: it needs its input "
                f"(task={trained} input=PATH{extra})"
            )
        return None
    for key in ("fid", "nfe_sweep", "trajectory"):
        if cfg.get(key):
            raise UserError(
                f"{key}= applies to sampling from noise, not to {mode}; image-to-image metrics "
                "come with training (img2img_metrics.md)"
            )
    channels, size = model.autoencoder.image_channels, model.hparams.image_size
    if mode == "sdedit":
        from ldm.diffusion.sdedit import check_strength

        if trained is not None:
            raise UserError(
                f"init_image= (SDEdit) needs a model without an image condition; this checkpoint "
                f"was trained with task={trained} (use task={trained} input=...)"
            )
        try:
            check_strength(cfg.strength)
        except ValueError as err:
            raise UserError(str(err)) from err
        images, files = read_images(cfg.init_image, "init_image", channels, size)
        return {"mode": mode, "files": files, "init_images": images, "inputs": {}}
    if trained != mode:
        what = f"task={trained}" if trained else "no image condition (plain sampling)"
        raise UserError(f"task={mode} but the checkpoint {cfg.ckpt} was trained with {what}")
    if cfg.get("input") is None:
        raise UserError(
            f"task={mode} needs input=PATH" + (" mask=PATH" if mode == "inpaint" else "")
        )
    task_cfg = stored.get("task") or {}
    if mode == "superres":
        factor = int((task_cfg.get("degradation") or {}).get("factor", 1))
        images, files = read_images(cfg.input, "input", channels, size // factor)
        return {"mode": mode, "files": files, "inputs": {"lowres": images}}
    if cfg.get("mask") is None:
        raise UserError("task=inpaint needs mask=PATH (white = fill)")
    images, files = read_images(cfg.input, "input", channels, size)
    mask = read_mask(cfg.mask, size).expand(len(images), 1, size, size)
    from ldm.data.degradations import mask_image

    paste = cfg.get("paste")
    return {
        "mode": mode,
        "files": files,
        "originals": images,
        "inputs": {"masked_image": mask_image(images, mask), "mask": mask},
        "paste": bool(task_cfg.get("paste", True) if paste is None else paste),
    }


def generate(
    model: Any,
    sampler: Any,
    cfg: DictConfig,
    job: dict[str, Any],
    device: torch.device,
    class_inputs: dict[str, Any],
) -> tuple[torch.Tensor, float]:
    """Outputs (N, C, H, W) in [-1, 1] on the CPU for the N inputs, and the seconds spent.
    Inpainting outputs keep the input's known pixels when `paste` (default: the checkpoint's
    task.paste). `class_inputs`: class labels or prompts for SDEdit with a conditional model, or
    for inpainting / super-resolution with a model also told the class (conditioning=hybrid)."""
    from ldm.data.degradations import paste_known

    generator = torch.Generator().manual_seed(cfg.seed)
    n = len(job["files"])
    bs = cfg.batch_size
    outputs = []
    start = time.perf_counter()
    for i in range(0, n, bs):
        kwargs: dict[str, Any] = {
            "inputs": {k: v[i : i + bs].to(device) for k, v in job["inputs"].items()} or None,
        }
        if job["mode"] == "sdedit":
            kwargs["init_images"] = job["init_images"][i : i + bs].to(device)
            kwargs["strength"] = cfg.strength
        # class labels or prompts (SDEdit; inpainting / super-resolution with conditioning=hybrid)
        kwargs.update(
            {
                k: v[i : i + bs].to(device) if isinstance(v, torch.Tensor) else v[i : i + bs]
                for k, v in class_inputs.items()
            }
        )
        kwargs["guidance_scale"] = cfg.guidance_scale if class_inputs else 1.0
        out = (
            model.sample(min(bs, n - i), generator=generator, sampler=sampler, **kwargs)
            .float()
            .cpu()
        )  # (B, C, H, W)
        outputs.append(out)
    images = torch.cat(outputs)
    if job["mode"] == "inpaint" and job["paste"]:
        images = paste_known(images, job["originals"], job["inputs"]["mask"])
    return images, time.perf_counter() - start


def grid_columns(job: dict[str, Any], outputs: torch.Tensor) -> list[torch.Tensor]:
    """The columns of grid.png, each (N, C, H, W) in [-1, 1]."""
    size = outputs.shape[-1]
    if job["mode"] == "superres":
        from ldm.data.degradations import bicubic_resize

        lowres = job["inputs"]["lowres"]
        nearest = torch.nn.functional.interpolate(lowres, size=(size, size), mode="nearest")
        return [nearest, bicubic_resize(lowres, size), outputs]
    if job["mode"] == "inpaint":
        return [job["inputs"]["masked_image"], outputs]
    return [job["init_images"], outputs]


GRID_HEADERS = {
    "superres": ["low-res (nearest)", "bicubic", "ours"],
    "inpaint": ["masked", "ours"],
    "sdedit": ["input", "ours"],
}


def write(job: dict[str, Any], outputs: torch.Tensor, out: Path, grid_images: int) -> list[str]:
    """One PNG per output named after its input (`<stem>.png`; numbered if stems repeat) and
    grid.png (a row per input, see GRID_HEADERS). Returns the files written."""
    from torchvision.utils import make_grid, save_image

    from ldm.utils.images import save_png, to_display_range

    stems = [f.stem for f in job["files"]]
    if len(set(stems)) != len(stems):
        stems = [f"{i:05d}_{s}" for i, s in enumerate(stems)]
    for stem, image in zip(stems, outputs, strict=True):
        save_png(image, out / f"{stem}.png")
    files = [f"{s}.png" for s in stems]
    if grid_images:
        k = min(grid_images, len(outputs))
        columns = [c[:k] for c in grid_columns(job, outputs)]
        tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (k * columns, C, H, W)
        save_image(
            make_grid(to_display_range(tiles), nrow=len(columns), padding=2), out / "grid.png"
        )
        files.append("grid.png")
    return files


def describe(job: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """The samples.json entry of an image-to-image run."""
    record = {
        "mode": job["mode"],
        "inputs": [str(f) for f in job["files"]],
        "grid_columns": GRID_HEADERS[job["mode"]],
    }
    if job["mode"] == "sdedit":
        record["strength"] = cfg.strength
    if job["mode"] == "inpaint":
        record.update(mask=str(cfg.mask), paste=job["paste"])
    return record


def images_per_second(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.inf
