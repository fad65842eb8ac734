"""Start-up checks: a bad config or an unusable output dir fails in one line before anything trains.

`validate_config(cfg)` checks the composed run config (missing values, settings that cannot work
together, the stage-1 checkpoint that stage 2 would use); `check_writable(path)` checks a directory
can take files and has room. Each raises `UserError` naming the setting and what it should be.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ldm.config import stage_section
from ldm.utils.errors import UserError
from ldm.utils.rundir import claim_dir, first_process

STAGES = ("all", "autoencoder", "diffusion")
IMAGE_FOLDER_MODE_CHANNELS = {"RGB": 3, "L": 1}
MIN_FREE_MB = 100


def validate_config(cfg: DictConfig) -> None:
    """Reject a run config that cannot train, before any data is read or model built.

    For `stage=diffusion` the stage-1 checkpoint's stored config is read (tensors memory-mapped,
    not loaded) and checked against `data`, and the UNet is checked against the autoencoder that
    checkpoint describes, which is the one stage 2 will use.
    """
    # each feature checks its own settings; imported here, not at module level, because Hydra
    # loads this module (OutputDirCheck) before `--help` answers
    from ldm.data.img2img import check_task_config

    if cfg.get("stage") not in STAGES:
        raise UserError(f"stage={cfg.get('stage')!r} is not one of {'|'.join(STAGES)}")
    check_missing(cfg)
    check_task_config(cfg)
    check_resolvable(cfg)
    check_run_keys(cfg)
    check_wandb(cfg)
    check_data(cfg.data)
    check_modality(cfg)
    check_fid(cfg)
    if cfg.stage == "diffusion":
        cfg = with_stage1_autoencoder(cfg)
    autoencoder = OmegaConf.to_container(cfg.model.autoencoder, resolve=True)
    check_downsampling(cfg.data.image_size, autoencoder)
    if cfg.stage in ("all", "autoencoder"):
        check_autoencoder_stage_trainer(cfg)
    if cfg.stage in ("all", "diffusion"):
        check_unet(cfg, autoencoder)
        check_guidance_settings(cfg)


def check_guidance_settings(cfg: DictConfig) -> None:
    """Guidance interval / rescale of the model (sample()'s defaults) and of the FID callback."""
    from ldm.diffusion.samplers import check_guidance

    for prefix, node in (("model.diffusion", cfg.model.diffusion), ("fid", cfg.get("fid"))):
        if node is None:
            continue
        interval, rescale = node.get("guidance_interval"), node.get("guidance_rescale")
        interval = OmegaConf.to_container(interval) if OmegaConf.is_config(interval) else interval
        try:
            check_guidance(interval, 0.0 if rescale is None else rescale)
        except (TypeError, ValueError) as err:
            raise UserError(f"{prefix}.{err}") from None


def find_missing(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is a literal `???`, found without resolving interpolations
    (OmegaConf's own missing_keys resolves them, and fails on the hydra node)."""
    found = []
    for key in node.keys() if OmegaConf.is_dict(node) else range(len(node)):
        full = f"{prefix}.{key}" if OmegaConf.is_dict(node) else f"{prefix}[{key}]"
        full = full.lstrip(".")
        if OmegaConf.is_interpolation(node, key):
            continue
        if OmegaConf.is_missing(node, key):
            found.append(full)
        elif OmegaConf.is_config(node[key]):
            found += find_missing(node[key], full)
    return found


def check_wandb(cfg: DictConfig) -> None:
    """Ask the W&B server now (bounded by `logger.wandb.init_timeout`; the answer is kept for the
    loggers), so that `logger.wandb.require_online=true` fails before anything trains."""
    from ldm.utils.instantiate import wandb_offline

    for lg_conf in (cfg.get("logger") or {}).values():
        if OmegaConf.is_dict(lg_conf) and str(lg_conf.get("_target_", "")).endswith("WandbLogger"):
            wandb_offline(lg_conf)


def check_missing(cfg: DictConfig) -> None:
    """A `???` value left unset (e.g. `data=image_folder` without `data.root`)."""
    missing = [k for k in find_missing(cfg) if not k.startswith("hydra.")]
    if missing:
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise UserError(
            f"{missing[0]} is required but not set{more}: "
            f"add {missing[0]}=VALUE to the command line"
        )


def check_resolvable(cfg: DictConfig) -> None:
    """Every interpolation resolves (a dangling `${...}` would otherwise fail mid-run)."""
    try:
        OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
        )
    except OmegaConfBaseException as err:
        where = getattr(err, "full_key", None) or "config"
        raise UserError(f"{where}: {str(err).splitlines()[0]}") from err


def check_run_keys(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed={seed!r} must be an integer")
    ckpt_path, ae_ckpt = cfg.get("ckpt_path"), cfg.get("autoencoder_ckpt")
    if ckpt_path not in (None, "last") and not Path(ckpt_path).is_file():
        raise UserError(
            f"ckpt_path={ckpt_path!r} does not exist; give a checkpoint file, `last`, or null"
        )
    if cfg.stage == "diffusion" and not ae_ckpt:
        raise UserError("stage=diffusion needs autoencoder_ckpt=PATH (a stage-1 checkpoint)")
    if cfg.stage == "diffusion" and not Path(ae_ckpt).is_file():
        raise UserError(
            f"autoencoder_ckpt={ae_ckpt!r} does not exist; give a stage-1 checkpoint file"
        )
    if cfg.stage != "diffusion" and ae_ckpt:
        raise UserError(
            f"autoencoder_ckpt={ae_ckpt!r} is used only with stage=diffusion; stage={cfg.stage} "
            "trains a new autoencoder (drop autoencoder_ckpt or set stage=diffusion)"
        )


def check_data(data: DictConfig) -> None:
    if data.get("name") == "image_folder":
        from ldm.data.folders import check_folder_config

        check_folder_config(data)
    mode = OmegaConf.select(data, "source.mode")
    if (
        mode in IMAGE_FOLDER_MODE_CHANNELS
        and data.get("num_channels") != IMAGE_FOLDER_MODE_CHANNELS[mode]
    ):
        raise UserError(
            f"data.num_channels={data.get('num_channels')} but data.source.mode={mode} gives "
            f"{IMAGE_FOLDER_MODE_CHANNELS[mode]}; "
            f"set data.num_channels={IMAGE_FOLDER_MODE_CHANNELS[mode]}"
        )


def modality(data: Any) -> str:
    """The kind of data a data config describes: "image", or "audio" (mel spectrograms); configs
    without the key are images."""
    return (data or {}).get("modality", "image") or "image"


def check_modality(cfg: DictConfig) -> None:
    """Audio data (mel spectrograms) is judged by the spectrogram classifier: the Inception
    extractor is for photographs and refuses it."""
    extractor = cfg.get("fid") and cfg.fid.get("extractor")
    if extractor == "auto":  # fid=auto: the classifier on labeled data (ldm.metrics.fid)
        extractor = "classifier" if cfg.data.get("num_classes") is not None else "contrastive"
    if modality(cfg.data) == "audio" and extractor and extractor != "classifier":
        raise UserError(
            f"fid.extractor={extractor} is for images; data={cfg.data.name} is audio, "
            "judged by the project's spectrogram classifier (fid=classifier)"
        )


def check_fid(cfg: DictConfig) -> None:
    """The FID extractor fits the data: the classifier needs labels (fid=auto picks for you)."""
    fid = cfg.get("fid")
    if fid is None or cfg.stage == "autoencoder":
        return
    every = OmegaConf.select(cfg, "callbacks.diffusion.fid.every_n_epochs", default=None)
    if OmegaConf.select(cfg, "callbacks.diffusion.fid", default=None) is None or every == 0:
        return
    from ldm.metrics.fid import EXTRACTORS  # torch: imported only when needed

    name = fid.get("extractor")
    if name not in EXTRACTORS:
        raise UserError(f"fid.extractor={name!r} is not one of {'|'.join(EXTRACTORS)}")
    if name == "classifier" and cfg.data.get("num_classes") is None:
        raise UserError(
            f"fid.extractor=classifier needs labeled data, but data.name={cfg.data.get('name')} "
            "has no labels (data.num_classes=null); use fid=auto (self-supervised features for "
            "unlabeled data), fid=inception fid.inception_weights=PATH, or fid.every_n_epochs=0"
        )


def downsample_factor(autoencoder: dict[str, Any]) -> int:
    """f = 2 ** (len(encoder.ch_mult) - 1): the encoder halves H and W after every level but the
    last."""
    return 2 ** (len(autoencoder["encoder"]["ch_mult"]) - 1)


def check_downsampling(image_size: int, autoencoder: dict[str, Any]) -> None:
    f = downsample_factor(autoencoder)
    if image_size % f:
        sizes = ", ".join(
            str(s) for s in range(f * (image_size // f), image_size + 2 * f, f) if s > 0
        )
        raise UserError(
            f"data.image_size={image_size} is not divisible by the autoencoder's downsampling "
            f"factor {f} (its encoder.ch_mult has {len(autoencoder['encoder']['ch_mult'])} "
            "levels); "
            f"use a multiple of {f}, e.g. {sizes}"
        )


def check_autoencoder_stage_trainer(cfg: DictConfig) -> None:
    """Lightning rejects gradient_clip_val for manual optimization (the autoencoder's GAN steps)
    only when stage 1 starts; say so up front and name the setting that does apply."""
    clip = stage_section(cfg, "autoencoder", "trainer").get("gradient_clip_val")
    if clip:
        raise UserError(
            f"autoencoder.trainer.gradient_clip_val={clip} does not apply to the autoencoder (it "
            f"steps its own optimizers); set model.autoencoder.grad_clip={clip} instead "
            "(trainer.gradient_clip_val sets both stages)"
        )


# Trainer arguments that are counts or fractions: a string there fails deep inside Lightning, once
# the stage has started; checked before anything trains instead.
TRAINER_NUMBERS = {
    **dict.fromkeys(
        (
            "max_epochs",
            "min_epochs",
            "max_steps",
            "min_steps",
            "check_val_every_n_epoch",
            "log_every_n_steps",
            "accumulate_grad_batches",
            "num_nodes",
            "num_sanity_val_steps",
        ),
        (int,),
    ),
    **dict.fromkeys(
        (
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
            "limit_predict_batches",
            "val_check_interval",
            "gradient_clip_val",
            "overfit_batches",
        ),
        (int, float),
    ),
}


def check_trainer_arguments(trainer_cfg: dict[str, Any], stage: str) -> None:
    """Every key of a stage's merged trainer config is a Trainer argument (or ours:
    auto_requeue)."""
    import inspect

    from pytorch_lightning import Trainer

    accepted = set(inspect.signature(Trainer.__init__).parameters) | {"_target_", "auto_requeue"}
    for key in trainer_cfg:
        if key not in accepted:
            raise UserError(
                f"{stage}.trainer.{key} (or trainer.{key}) is not an argument of "
                "pytorch_lightning.Trainer; check the spelling"
            )
        value, kinds = trainer_cfg[key], TRAINER_NUMBERS.get(key)
        if (
            kinds
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, kinds))
        ):
            what = "an integer" if kinds == (int,) else "a number"
            raise UserError(f"{stage}.trainer.{key} (or trainer.{key})={value!r} must be {what}")
    accelerator = trainer_cfg.get("accelerator")
    if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():  # else Lightning fails later, with a traceback
            raise UserError(
                f"{stage}.trainer.accelerator (or trainer.accelerator)={accelerator!r} but torch "
                "sees no CUDA GPU here; use trainer.accelerator=auto (or cpu)"
            )


def check_unet(cfg: DictConfig, autoencoder: dict[str, Any]) -> None:
    """The UNet denoises latents: its channels, depth and classes must fit the autoencoder and
    data."""
    unet = OmegaConf.select(cfg, "model.diffusion.unet")
    if unet is None:
        return
    unet = OmegaConf.to_container(unet, resolve=True)
    latent_channels = autoencoder["latent_channels"]
    for key in ("in_channels", "out_channels"):
        if key in unet and unet[key] != latent_channels:
            raise UserError(
                f"model.diffusion.unet.{key}={unet[key]} but the autoencoder has latent_channels="
                f"{latent_channels}; set model.diffusion.unet.{key}={latent_channels}"
            )
    groups, width = unet.get("norm_num_groups"), unet.get("model_channels")
    narrowest = width * min(unet.get("channel_mult", [1])) if width else None
    if groups is not None and narrowest == groups:
        # one channel a group is instance norm: every norm removes each feature map's spatial
        # mean, so the UNet cannot see the low-frequency part of its noise and samples saturate
        raise UserError(
            f"model.diffusion.unet.norm_num_groups={groups} on {narrowest} channels is one channel "
            f"a group (instance norm; samples saturate); use at most {groups // 2}, e.g. "
            f"model.diffusion.unet.norm_num_groups={max(1, groups // 4)}"
        )
    f = downsample_factor(autoencoder)
    latent_size, unet_f = cfg.data.image_size // f, 2 ** (len(unet.get("channel_mult", [1])) - 1)
    if latent_size % unet_f:
        raise UserError(
            f"model.diffusion.unet.channel_mult={unet['channel_mult']} halves the {latent_size}x"
            f"{latent_size} latents {len(unet['channel_mult']) - 1} times, which needs a multiple "
            f"of {unet_f}; use fewer levels or a data.image_size that is a multiple of {unet_f * f}"
        )
    num_classes, data_classes = unet.get("num_classes"), cfg.data.get("num_classes")
    if num_classes is not None and data_classes is None:
        raise UserError(
            f"model.diffusion.unet.num_classes={num_classes} but "
            f"data.name={cfg.data.get('name')} has no labels; "
            "set model.diffusion.unet.num_classes=null"
        )
    if num_classes is not None and num_classes != data_classes:
        raise UserError(
            f"model.diffusion.unet.num_classes={num_classes} but data.num_classes={data_classes}; "
            f"set model.diffusion.unet.num_classes={data_classes}"
        )


def with_stage1_autoencoder(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` whose model.autoencoder is the one stored in `autoencoder_ckpt` (as ldm.train
    uses it), after checking that checkpoint was trained on data of this size and channel count."""
    # torch and Lightning: imported only when needed
    from ldm.utils.checkpoint import load_checkpoint
    from ldm.utils.instantiate import upgrade_stored_config

    path = cfg.autoencoder_ckpt
    stored = load_checkpoint(path, expected_stage="autoencoder", mmap=True)["ldm"]["config"]
    stored_data = stored.get("data", {})
    if modality(stored_data) != modality(cfg.data):
        raise UserError(
            f"autoencoder_ckpt={str(path)!r} was trained on {modality(stored_data)} data "
            f"(data={stored_data.get('name')}) but data={cfg.data.get('name')} is "
            f"{modality(cfg.data)} data; use a stage-1 checkpoint of the same kind or train one"
        )
    size, channels = stored_data.get("image_size"), stored_data.get("num_channels")
    if (size, channels) != (cfg.data.image_size, cfg.data.num_channels):
        raise UserError(
            f"autoencoder_ckpt={str(path)!r} was trained on {size}x{size} images with {channels} "
            f"channel(s), but data.image_size={cfg.data.image_size} and data.num_channels="
            f"{cfg.data.num_channels}; set data.image_size={size} data.num_channels={channels} "
            "or train a new stage 1"
        )
    effective = copy.deepcopy(cfg)
    with open_dict(effective):
        # the architecture as the code of today names it (a checkpoint may predate a rename)
        effective.model.autoencoder = OmegaConf.create(
            upgrade_stored_config(stored["model"]["autoencoder"])
        )
    return effective


def check_writable(
    path: str | Path, min_free_mb: float = MIN_FREE_MB, what: str = "output dir"
) -> Path:
    """Create `path`, write, fsync and delete a probe file in it, and require `min_free_mb` free.

    Run at start-up so a read-only, missing-parent or full disk fails now, not at the first
    checkpoint after an epoch of training.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ldm-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"{what} {str(path)!r} is not writable ({reason}); choose a writable directory"
        ) from err
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < min_free_mb:
        raise UserError(
            f"{what} {str(path)!r} has {free_mb:.0f} MiB free, less than the {min_free_mb:g} MiB "
            "needed for checkpoints and logs; free space or choose another directory"
        )
    return path


class OutputDirCheck(HydraCallback):
    """Hydra callback: claim and check the run (or sweep) directory before Hydra creates it and
    writes its `.hydra/` files there: a dir a live run owns, or one that cannot be written, would
    otherwise be shared or fail with a traceback. Exits 2 with one line.

    conf/hydra/default.yaml:
    `callbacks: {output_dir_check: {_target_: ldm.utils.validation.OutputDirCheck}}`
    """

    def __init__(self, min_free_mb: float = MIN_FREE_MB):
        self.min_free_mb = min_free_mb

    def check(self, path: str, what: str) -> None:
        try:
            check_writable(path, self.min_free_mb, what)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from err  # not an Exception: Hydra does not wrap it in a traceback

    @staticmethod
    def resolve(config: DictConfig, key: str) -> str:
        # Hydra calls these hooks before it sets HydraConfig, and the default dirs interpolate
        # `${hydra:runtime.cwd}`: set it for the lookup, then put the previous one back.
        holder = HydraConfig.instance()
        previous = holder.cfg
        holder.set_config(copy.deepcopy(config))  # set_config marks its argument read-only
        try:
            return str(OmegaConf.select(config, key, throw_on_missing=True))
        finally:
            holder.cfg = previous

    def claim(self, path: str, what: str) -> None:
        """The run's first process creates and locks its dir (ldm.utils.rundir); a dir that a live
        run holds is refused in one line, exit 2."""
        if not first_process():
            return
        try:
            claim_dir(path, what)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from err

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = self.resolve(config, "hydra.run.dir")
        self.claim(path, "hydra.run.dir")
        self.check(path, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = self.resolve(config, "hydra.sweep.dir")
        self.claim(path, "hydra.sweep.dir")
        self.check(path, "hydra.sweep.dir")
