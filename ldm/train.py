"""Training entry: `run(cfg)` trains stage 1 (autoencoder), stage 2 (latent diffusion), or both.

Each stage gets its own Trainer and W&B run (one shared group). A stage-2 run starts from a stage-1
checkpoint: the best one of stage 1 under `stage=all`, or `autoencoder_ckpt=PATH`.

Resume (`ckpt_path`, see `resume_checkpoints`) continues a stopped stage exactly: Lightning restores
the weights, EMA, optimizers, LR schedulers and loop counters; `ExactResume` the global RNGs and
the position of the training data module's resumable loader (ldm.data.resumable).
`PreemptionCheckpoint` saves `checkpoints/<stage>/last.ckpt` and exits on SIGTERM, SIGUSR1 or
SIGUSR2.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ldm.callbacks.checkpoint_config import StoreConfigInCheckpoint
from ldm.callbacks.resume import ExactResume, PreemptionCheckpoint
from ldm.config import STAGES, stage_section
from ldm.data.folders import resolve_folder_labels
from ldm.data.latent_cache import latent_cache_datamodule
from ldm.models.loading import autoencoder_from_checkpoint, load_autoencoder
from ldm.modules.text import fill_vocab
from ldm.optim import build_lr_scheduler
from ldm.utils.checkpoint import load_checkpoint
from ldm.utils.errors import UserError, config_errors
from ldm.utils.instantiate import instantiate_callbacks, instantiate_loggers
from ldm.utils.launch import external_launcher
from ldm.utils.manifest import write_run_files
from ldm.utils.validation import (
    check_trainer_arguments,
    check_writable,
    validate_config,
    with_stage1_autoencoder,
)

log = logging.getLogger(__name__)

# ThroughputMonitor (conf/callbacks) reports images/s; FLOPs (MFU) are measured by bench/ instead.
warnings.filterwarnings(
    "ignore", message="When using the `ThroughputMonitor`, you need to define a `flops_per_batch`"
)
# Stage 2 keeps the frozen autoencoder in eval mode on purpose.
warnings.filterwarnings(
    "ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training"
)

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


def stage_checkpoint_dir(cfg: DictConfig, stage: str) -> Path:
    return Path(cfg.paths.output_dir) / "checkpoints" / stage


def resume_checkpoints(cfg: DictConfig) -> dict[str, str]:
    """Which stage resumes from which checkpoint: `{stage: path}` (empty: nothing resumes).

    - `ckpt_path=last`: the newest stage this run trains that has `checkpoints/<stage>/last.ckpt`
      in this run's dir (`hydra.run.dir=RUN`): diffusion before autoencoder. None found: the run
      starts from scratch, so a job that is requeued can always pass `ckpt_path=last`.
    - `ckpt_path=PATH`: the stage stored in the checkpoint resumes from it. Under `stage=all`, a
      stage-2 checkpoint skips stage 1 (the autoencoder comes from the checkpoint itself).
    """
    ckpt_path = cfg.get("ckpt_path")
    stages = ("autoencoder", "diffusion") if cfg.stage == "all" else (cfg.stage,)
    if ckpt_path is None:
        return {}
    if ckpt_path == "last":
        for stage in reversed(stages):
            last = stage_checkpoint_dir(cfg, stage) / "last.ckpt"
            if last.is_file():
                log.info("ckpt_path=last: resuming stage %s from %s", stage, last)
                return {stage: str(last)}
        where = Path(cfg.paths.output_dir) / "checkpoints"
        log.info("ckpt_path=last: no last.ckpt under %s; starting from scratch", where)
        return {}
    stage = load_checkpoint(ckpt_path, mmap=True)["ldm"]["stage"]
    if stage not in stages:
        hint = ""
        if stage == "autoencoder":
            hint = "; to train stage 2 on this autoencoder use autoencoder_ckpt=PATH"
        raise UserError(
            f"ckpt_path={ckpt_path!r} is a {stage} checkpoint but stage={cfg.stage} trains "
            f"{' and '.join(stages)}{hint}"
        )
    return {stage: str(ckpt_path)}


def autoencoder_from_diffusion_checkpoint(path: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(frozen autoencoder, its config) from the stage-1 weights a stage-2 checkpoint carries."""
    ckpt = load_checkpoint(path, expected_stage="diffusion")
    prefix = "autoencoder."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    autoencoder = autoencoder_from_checkpoint({"ldm": ckpt["ldm"], "state_dict": state}, path)
    return autoencoder, ckpt["ldm"]["config"]["model"]["autoencoder"]


def sweep_dir() -> Path | None:
    """The sweep dir when this process runs a job of a Hydra multirun, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def check_multirun_launch(cfg: DictConfig) -> None:
    """Lightning's DDP launcher starts the other ranks by re-running the command line; in a local
    multirun each of them would run the whole sweep. Ranks must come from srun (SLURM launcher)."""
    if sweep_dir() is None or external_launcher(os.environ):
        return
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    strategy = str(cfg.trainer.get("strategy", "auto"))
    processes = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else 1
    if processes > 1 and not strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        raise UserError(
            f"trainer.devices={devices} x trainer.num_nodes={nodes} processes in a local multirun: "
            "Lightning would re-run the whole sweep in every rank; sweep with hydra/launcher=slurm "
            "(ranks from srun) or run each job alone (trainer=ddp_cpu, torchrun)"
        )


def fit_stage(
    stage: str,
    cfg: DictConfig,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    group: str,
    manifest: dict[str, Any] | None = None,
    ckpt_path: str | None = None,
) -> dict[str, Any]:
    """Train one stage with its own Trainer (resuming from `ckpt_path` if given); returns its
    checkpoints and final metrics.

    The loggers get the resolved config and the run manifest as the run's hyperparameters.
    `trainer.auto_requeue` is not a Trainer argument: under SLURM it makes a SIGUSR1 requeue the job
    after the preemption checkpoint is saved.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trainer_cfg = stage_section(cfg, stage, "trainer")
    auto_requeue = bool(trainer_cfg.pop("auto_requeue", False))
    callbacks = stage_callbacks(cfg, stage)
    if not any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
        # Lightning would add its own into the run dir, shared by both stages (`-v1` names); the
        # final weights are saved below instead.
        trainer_cfg["enable_checkpointing"] = False
    callbacks.append(StoreConfigInCheckpoint(stage, resolved))
    callbacks.append(ExactResume())
    preemption = PreemptionCheckpoint(stage_checkpoint_dir(cfg, stage), requeue=auto_requeue)
    callbacks.append(preemption)
    loggers = instantiate_loggers(cfg.get("logger"), name=f"{group}-{stage}", group=group)
    trainer: pl.Trainer = hydra.utils.instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False
    )
    for logger in loggers:
        logger.log_hyperparams(
            {
                **resolved,
                "trained_stage": stage,
                "manifest": manifest or {},
                "data/num_skipped": getattr(datamodule, "num_skipped", 0),
            }
        )

    log.info("stage %s: fitting %s", stage, type(model).__name__)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - started
    preemption.exit_if_signalled()
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule)

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    last = ckpt_cb.last_model_path if ckpt_cb is not None else ""
    if not (best or last):
        # No checkpoint callback configured: keep the final weights so stage 2 can use them.
        last = str(stage_checkpoint_dir(cfg, stage) / "final.ckpt")
        trainer.save_checkpoint(last)
    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if torch.is_tensor(v) and v.numel() == 1
    }
    finish_wandb()
    return {
        "best_checkpoint": best or last,
        "last_checkpoint": last or best,
        "metrics": metrics,
        "trainer": trainer,
        "fit_seconds": fit_seconds,
    }


def use_autoencoder_config(cfg: DictConfig, ae_config: dict[str, Any]) -> None:
    """Make cfg.model.autoencoder describe the stage-1 model actually loaded (its stored config),
    so interpolations such as the UNet's latent channels and stage-2 checkpoints agree with it."""
    with open_dict(cfg):
        cfg.model.autoencoder = OmegaConf.create(ae_config)


@rank_zero_only
def save_final_grid(
    model: pl.LightningModule, datamodule: pl.LightningDataModule, cfg: DictConfig
) -> Path:
    """Sample one grid from the final (EMA) model: one column per class (or a row per prompt of a
    text model) with the validation grid's guidance scale (`model.diffusion.val_guidance_scale`); an
    image-to-image model's grid shows 16 validation inputs, its outputs and the originals."""
    from ldm.modules.conditioning import even_class_labels

    num_classes = model.num_classes
    generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    path = Path(cfg.paths.output_dir) / "final_samples.png"
    if getattr(model.conditioner, "task", None):  # image-to-image: inputs | ours | originals
        from ldm.metrics.img2img import img2img_grid

        save_image(img2img_grid(model, datamodule.val_dataset, 16, generator), path)
        return path
    if model.takes_prompts:
        nrow = 8
        prompts = [p for p in model.validation_prompts(8, datamodule) for _ in range(nrow)]
        images = model.sample(
            len(prompts),
            prompts=prompts,
            generator=generator,
            guidance_scale=model.hparams.val_guidance_scale,
        )
    elif num_classes:
        labels = even_class_labels(8 * num_classes, num_classes, model.device)  # 8 per class
        images = model.sample(
            len(labels),
            class_labels=labels,
            generator=generator,
            guidance_scale=model.hparams.val_guidance_scale,
        )
        nrow = num_classes  # column k: class k
    else:
        images = model.sample(64, generator=generator)
        nrow = 8
    save_image(make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=2), path)
    return path


@rank_zero_only
def print_summary(results: dict[str, dict[str, Any]], grid: Path | None) -> None:
    lines = ["", "=== ldm run summary ==="]
    for stage, result in results.items():
        lines.append(
            f"{stage} checkpoint (best): {result['best_checkpoint']} "
            f"(fit: {result['fit_seconds']:.0f} s wall)"
        )
        shown = {
            k: v for k, v in result["metrics"].items() if k.startswith(("val/", "ref/", "test/"))
        }
        lines.append(
            f"{stage} metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
        )
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


def stage_datamodule(cfg: DictConfig, stage: str) -> pl.LightningDataModule:
    """The data module of one stage: `data` refined by `<stage>.data` (e.g. its batch size)."""
    return hydra.utils.instantiate(stage_section(cfg, stage, "data"))


def stage_callbacks(cfg: DictConfig, stage: str) -> list[pl.Callback]:
    """`callbacks.common` and `callbacks.<stage>` (`callbacks=null` leaves none)."""
    callbacks_cfg = cfg.get("callbacks") or {}
    return instantiate_callbacks(callbacks_cfg.get("common")) + instantiate_callbacks(
        callbacks_cfg.get(stage)
    )


def build_diffusion_model(cfg: DictConfig, autoencoder: torch.nn.Module) -> pl.LightningModule:
    """The stage-2 LightningModule of `model.diffusion` around a (frozen) autoencoder."""
    diffusion_cfg = OmegaConf.to_container(cfg.model.diffusion, resolve=True)
    module_cfg = {k: v for k, v in diffusion_cfg.items() if k not in DIFFUSION_RUN_KEYS}
    return hydra.utils.instantiate(module_cfg, autoencoder=autoencoder)


def stages_to_train(cfg: DictConfig) -> tuple[str, ...]:
    return STAGES if cfg.stage == "all" else (cfg.stage,)


# a stand-in step budget for the preflight's lr scheduler build (a cosine's T_max=null needs one)
PREFLIGHT_STEPS = 1000


def preflight(cfg: DictConfig) -> None:
    """Every check either stage can fail, made before anything trains: the config itself
    (`validate_config`), the launch, the dirs, and a dry build, with untrained weights, of what
    each stage builds: its data module, Trainer arguments and callbacks, and stage 2's model and
    samplers (for stage=diffusion around the architecture stored in autoencoder_ckpt)."""
    resolve_folder_labels(cfg)  # data.labels=folders: data.num_classes/class_names from the folders
    validate_config(cfg)
    check_multirun_launch(cfg)
    check_writable(cfg.paths.output_dir)
    check_writable(cfg.paths.cache_dir, what="cache dir (paths.cache_dir)")
    for stage in stages_to_train(cfg):
        with config_errors(f"{stage} stage"):
            stage_datamodule(cfg, stage)
            check_trainer_arguments(stage_section(cfg, stage, "trainer"), stage)
            stage_callbacks(cfg, stage)
    if "diffusion" in stages_to_train(cfg):
        prepare_conditioner(cfg, stage_datamodule(cfg, "diffusion"))
        effective = with_stage1_autoencoder(cfg) if cfg.stage == "diffusion" else cfg
        with config_errors("model"):
            model = build_diffusion_model(
                effective, hydra.utils.instantiate(effective.model.autoencoder)
            )
            model.configured_sampler()
            if OmegaConf.select(cfg, "fid.sampler_steps") is not None:
                model.configured_sampler(steps=cfg.fid.sampler_steps)
        with config_errors("model.diffusion optimizer / lr_scheduler"):
            # built here, not only when stage 2 starts: `optimizer.lr=abc` must not cost a stage 1
            lr = getattr(model.optimizer_factory, "keywords", {}).get("lr")
            if isinstance(lr, bool) or not isinstance(lr, int | float | None):
                raise UserError(f"model.diffusion.optimizer.lr={lr!r} must be a number")
            optimizer = model.optimizer_factory(list(model.unet.parameters()))
            if model.lr_scheduler_factory is not None:
                build_lr_scheduler(model.lr_scheduler_factory, optimizer, PREFLIGHT_STEPS)


def train_autoencoder(
    cfg: DictConfig, group: str, manifest: dict[str, Any] | None, ckpt_path: str | None
) -> dict[str, Any]:
    autoencoder = hydra.utils.instantiate(cfg.model.autoencoder)
    datamodule = stage_datamodule(cfg, "autoencoder")
    return fit_stage("autoencoder", cfg, autoencoder, datamodule, group, manifest, ckpt_path)


def train_diffusion(
    cfg: DictConfig,
    datamodule: pl.LightningDataModule,
    autoencoder_ckpt: str | None,
    group: str,
    manifest: dict[str, Any] | None,
    ckpt_path: str | None,
) -> tuple[dict[str, Any], Path | None]:
    """Stage 2 on the frozen autoencoder of `autoencoder_ckpt`, or without one (stage=all resuming
    stage 2) on the autoencoder that the stage-2 checkpoint `ckpt_path` carries; returns its
    results and the final sample grid."""
    if autoencoder_ckpt:
        autoencoder, ae_config = load_autoencoder(autoencoder_ckpt)
    else:
        autoencoder_ckpt = ckpt_path
        autoencoder, ae_config = autoencoder_from_diffusion_checkpoint(ckpt_path)
    use_autoencoder_config(cfg, ae_config)
    model = build_diffusion_model(cfg, autoencoder)
    stage_data = datamodule
    if cfg.model.diffusion.get("latent_cache"):
        cache_dir = Path(cfg.paths.cache_dir) / "latents"
        stage_data = latent_cache_datamodule(autoencoder, autoencoder_ckpt, datamodule, cache_dir)
    result = fit_stage("diffusion", cfg, model, stage_data, group, manifest, ckpt_path)
    return result, save_final_grid(model, datamodule, cfg)


def prepare_conditioner(cfg: DictConfig, datamodule: pl.LightningDataModule) -> None:
    """Text conditioning: build the tokenizer's vocabulary from the training captions when the
    config leaves it null, and store it in the config (so the checkpoint carries it). Runs before
    stage 1, so data without captions fails at once."""
    conditioner = OmegaConf.select(cfg, "model.diffusion.conditioner")
    try:
        vocab = fill_vocab(conditioner, datamodule)
    except ValueError as err:
        raise UserError(str(err)) from err
    if vocab is not None:
        log.info("text conditioner: %d-token vocabulary from the training captions", len(vocab))
        with open_dict(cfg):
            cfg.model.diffusion.conditioner.vocab = vocab


def run(cfg: DictConfig) -> float | None:
    """Train the stages `cfg.stage` names; returns `cfg.optimized_metric` (for sweeps)."""
    preflight(cfg)
    output_dir = Path(cfg.paths.output_dir)
    resume = resume_checkpoints(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = stage_datamodule(cfg, "diffusion")
    manifest = None
    if rank_zero_only.rank == 0:
        manifest = write_run_files(output_dir, cfg, datamodule.fingerprint())
    group = f"{cfg.task_name}-{(sweep_dir() or output_dir).name}"  # both stages, all sweep jobs

    results: dict[str, dict[str, Any]] = {}
    grid = None
    try:
        autoencoder_ckpt = cfg.get("autoencoder_ckpt")
        if cfg.stage == "autoencoder" or (cfg.stage == "all" and "diffusion" not in resume):
            results["autoencoder"] = train_autoencoder(
                cfg, group, manifest, resume.get("autoencoder")
            )
            autoencoder_ckpt = results["autoencoder"]["best_checkpoint"]
        if cfg.stage in ("all", "diffusion"):
            results["diffusion"], grid = train_diffusion(
                cfg,
                datamodule,
                autoencoder_ckpt,
                group,
                manifest,
                resume.get("diffusion"),
            )
        print_summary(results, grid)
        return metric_value(results, cfg.get("optimized_metric"))
    finally:
        finish_wandb()
