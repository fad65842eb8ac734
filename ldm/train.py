"""Training entry: `run(cfg)` trains stage 1 (autoencoder), stage 2 (latent diffusion), or both.

Each stage gets its own Trainer and W&B run (one shared group). A stage-2 run starts from a stage-1
checkpoint: the best one of stage 1 under `stage=all`, or `autoencoder_ckpt=PATH`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ldm.callbacks.checkpoint_config import StoreConfigInCheckpoint
from ldm.models.loading import load_autoencoder
from ldm.utils.errors import UserError
from ldm.utils.instantiate import instantiate_callbacks, instantiate_loggers
from ldm.utils.manifest import write_run_files
from ldm.utils.validation import check_writable, validate_config

log = logging.getLogger(__name__)

# Keys of model/diffusion that configure the run, not the LightningModule's constructor.
DIFFUSION_RUN_KEYS = ("latent_cache",)


def finish_wandb() -> None:
    """Close the active W&B run, if any (each stage logs to its own run)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


def resolve_ckpt_path(cfg: DictConfig, stage: str) -> str | None:
    """`ckpt_path=last` means this run's `checkpoints/<stage>/last.ckpt` (None if absent)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = Path(cfg.paths.output_dir) / "checkpoints" / stage / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path={ckpt_path!r} does not exist")
    return str(ckpt_path)


def fit_stage(
    stage: str,
    cfg: DictConfig,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    group: str,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one stage with its own Trainer; returns its checkpoints and final metrics.

    The loggers get the resolved config and the run manifest as the run's hyperparameters.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    callbacks = instantiate_callbacks(cfg.callbacks.get("common"))
    callbacks += instantiate_callbacks(cfg.callbacks.get(stage))
    callbacks.append(StoreConfigInCheckpoint(stage, resolved))
    loggers = instantiate_loggers(cfg.get("logger"), name=f"{group}-{stage}", group=group)
    trainer_cfg = OmegaConf.merge(
        OmegaConf.to_container(cfg.trainer, resolve=True), cfg.stage_trainer.get(stage) or {}
    )
    trainer: pl.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams({**resolved, "trained_stage": stage, "manifest": manifest or {}})

    log.info("stage %s: fitting %s", stage, type(model).__name__)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg, stage))
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule)

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    last = ckpt_cb.last_model_path if ckpt_cb is not None else ""
    if not (best or last):
        # No checkpoint callback configured: keep the final weights so stage 2 can use them.
        last = str(Path(cfg.paths.output_dir) / "checkpoints" / stage / "final.ckpt")
        trainer.save_checkpoint(last)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    finish_wandb()
    return {"best_checkpoint": best or last, "last_checkpoint": last or best, "metrics": metrics, "trainer": trainer}


def use_autoencoder_config(cfg: DictConfig, ae_config: dict[str, Any]) -> None:
    """Make cfg.model.autoencoder describe the stage-1 model actually loaded (its stored config),
    so interpolations such as the UNet's latent channels and stage-2 checkpoints agree with it."""
    with open_dict(cfg):
        cfg.model.autoencoder = OmegaConf.create(ae_config)


@rank_zero_only
def save_final_grid(model: pl.LightningModule, datamodule: pl.LightningDataModule, cfg: DictConfig) -> Path:
    """Sample one grid from the final (EMA) model: one row per class when conditional."""
    num_classes = getattr(datamodule, "num_classes", None)
    generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    if num_classes:
        per_class = 8
        labels = torch.arange(num_classes, device=model.device).repeat_interleave(per_class)
        images = model.sample(len(labels), class_labels=labels, generator=generator)
        nrow = per_class
    else:
        images = model.sample(64, generator=generator)
        nrow = 8
    path = Path(cfg.paths.output_dir) / "final_samples.png"
    save_image(make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=2), path)
    return path


@rank_zero_only
def print_summary(results: dict[str, dict[str, Any]], grid: Path | None) -> None:
    lines = ["", "=== ldm run summary ==="]
    for stage, result in results.items():
        lines.append(f"{stage} checkpoint (best): {result['best_checkpoint']}")
        shown = {k: v for k, v in result["metrics"].items() if k.startswith(("val/", "ref/", "test/"))}
        lines.append(f"{stage} metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
    if grid is not None:
        lines.append(f"final sample grid: {grid}")
    print("\n".join(lines))


def metric_value(results: dict[str, dict[str, Any]], name: str | None) -> float | None:
    """The value for sweepers: `optimized_metric` from the last stage, else its val/loss."""
    if not results or not name:
        return None
    metrics = list(results.values())[-1]["metrics"]
    for key in (name, "val/loss", "val/rec_loss"):
        if key in metrics and math.isfinite(metrics[key]):
            if key != name:
                log.warning("optimized_metric %s was not logged; returning %s", name, key)
            return metrics[key]
    return None


def run(cfg: DictConfig) -> float | None:
    """Train the stages `cfg.stage` names; returns `cfg.optimized_metric` (for sweeps)."""
    validate_config(cfg)
    output_dir = check_writable(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    manifest = write_run_files(output_dir, cfg, datamodule.fingerprint()) if rank_zero_only.rank == 0 else None
    group = f"{cfg.task_name}-{output_dir.parent.name if output_dir.name.isdigit() else output_dir.name}"

    results: dict[str, dict[str, Any]] = {}
    grid = None
    try:
        autoencoder_ckpt = cfg.get("autoencoder_ckpt")
        if cfg.stage in ("all", "autoencoder"):
            autoencoder = hydra.utils.instantiate(cfg.model.autoencoder)
            results["autoencoder"] = fit_stage("autoencoder", cfg, autoencoder, datamodule, group, manifest)
            autoencoder_ckpt = results["autoencoder"]["best_checkpoint"]
        if cfg.stage in ("all", "diffusion"):
            autoencoder, ae_config = load_autoencoder(autoencoder_ckpt)
            use_autoencoder_config(cfg, ae_config)
            diffusion_cfg = OmegaConf.to_container(cfg.model.diffusion, resolve=True)
            module_cfg = {k: v for k, v in diffusion_cfg.items() if k not in DIFFUSION_RUN_KEYS}
            model = hydra.utils.instantiate(module_cfg, autoencoder=autoencoder)
            stage_data = datamodule
            if cfg.model.diffusion.get("latent_cache"):
                from ldm.data.latent_cache import latent_cache_datamodule

                stage_data = latent_cache_datamodule(autoencoder, autoencoder_ckpt, datamodule, Path(cfg.paths.cache_dir) / "latents")
            results["diffusion"] = fit_stage("diffusion", cfg, model, stage_data, group, manifest)
            grid = save_final_grid(model, datamodule, cfg)
        print_summary(results, grid)
        return metric_value(results, cfg.get("optimized_metric"))
    finally:
        finish_wandb()
