"""Image-grid logging shared by both stages: one call sends a grid to every logger that takes
images (W&B, TensorBoard) and always saves a PNG under the run's log dir; `save_png` writes one
image as an 8-bit PNG (sample.py's per-sample files)."""

from pathlib import Path

import torch
import torchvision
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger


def to_display_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] display space, clamped."""
    return ((images.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)


def log_image_grid(trainer: Trainer, key: str, grid: torch.Tensor, step: int) -> Path | None:
    """Log `grid` (C, H, W) float in [0, 1] (e.g. from torchvision.utils.make_grid) under `key`.

    Must be called on every rank: `trainer.log_dir` is a collective under DDP. Only global rank
    zero writes. The PNG goes to `<trainer.log_dir or default_root_dir>/images/<key>_<step>.png`
    (slashes in `key` become underscores); its path is returned on rank zero, None elsewhere.
    CSV and other loggers without image support are skipped (the PNG is their artefact)."""
    if grid.dim() != 3 or grid.shape[0] not in (1, 3):
        raise ValueError(f"grid of shape {tuple(grid.shape)} must be (C, H, W) with C in (1, 3)")
    root = trainer.log_dir or trainer.default_root_dir
    if not trainer.is_global_zero:
        return None
    grid = grid.detach().float().clamp(0.0, 1.0).cpu()
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            hwc = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, C)
            logger.log_image(key=key, images=[hwc], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
    path = Path(root) / "images" / f"{key.replace('/', '_')}_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, path)
    return path


def log_prompt_table(
    trainer: Trainer, key: str, prompts: list[str], images: torch.Tensor, step: int
) -> None:
    """A W&B table (prompt, image) of samples (N, C, H, W) in [-1, 1], on global rank zero; other
    loggers are skipped (the grid PNG of `log_image_grid` is their record)."""
    if not trainer.is_global_zero:
        return
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    hwc = (to_display_range(images.detach().float().cpu()).permute(0, 2, 3, 1) * 255).round()
    hwc = hwc.to(torch.uint8).numpy()  # (N, H, W, C)
    import wandb  # present: a WandbLogger exists

    rows = [[p, wandb.Image(img, caption=p)] for p, img in zip(prompts, hwc, strict=True)]
    for logger in loggers:
        logger.log_table(
            key=key,
            columns=["prompt", "image"],
            data=rows,
            step=step,
        )


def save_labelled_grid(
    images: torch.Tensor, row_labels: list[str], nrow: int, path: str | Path
) -> None:
    """Images (N, C, H, W) in [-1, 1] as a PNG grid of `nrow` per row, each row's text label (a
    prompt) written to its left."""
    from PIL import Image, ImageDraw, ImageFont

    grid = torchvision.utils.make_grid(to_display_range(images.float()), nrow=nrow, padding=2)
    hwc = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    picture = Image.fromarray(hwc).convert("RGB")
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    width = max((int(draw.textlength(t, font=font)) for t in row_labels), default=0) + 8
    canvas = Image.new("RGB", (picture.width + width, picture.height), (0, 0, 0))
    canvas.paste(picture, (width, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = images.shape[-2] + 2
    for r, text in enumerate(row_labels):
        draw.text(
            (4, 2 + r * row_height + row_height // 2 - 6), text, fill=(255, 255, 255), font=font
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """One image (C, H, W) in [-1, 1] as an 8-bit PNG: grayscale for C=1 (torchvision's save_image
    would write 3 channels), RGB for C=3, rounded the way save_image rounds. No timestamp or other
    metadata, so equal pixels give equal bytes."""
    from PIL import Image

    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image of shape {tuple(image.shape)} must be (C, H, W) with C in (1, 3)")
    pixels = to_display_range(image).mul(255).add(0.5).clamp(0, 255).byte().cpu()  # (C, H, W) uint8
    array = (
        pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    )  # (H, W[, 3])
    Image.fromarray(array).save(path)
