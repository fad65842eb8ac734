"""LatentDiffusion: stage 2 of an LDM, a UNet denoiser trained in a frozen autoencoder's latent
space.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models", arXiv
2112.10752, Sec. 3.2 and Eq. 2): L = E_{z0 = s * E(x), eps, t} || target - f(z_t, t, y) ||^2, with
z_t = q_sample(z0, t, eps) (Ho et al. 2020, Eq. 4), the target given by the schedule's prediction
type (eps / x0 / v, Salimans & Ho 2022), optional min-SNR weighting (Hang et al. 2023), and
labels replaced by the null class with probability `cond_drop_prob` so one network learns both
the conditional and the unconditional model for classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchvision.utils import make_grid

from ldm.diffusion.samplers import check_guidance
from ldm.diffusion.schedules import LOSS_WEIGHTINGS
from ldm.diffusion.sdedit import sdedit
from ldm.modules.conditioning import ClassConditioner, even_class_labels
from ldm.modules.image_conditioning import build_conditioner
from ldm.optim import build_lr_scheduler
from ldm.utils.images import log_image_grid, log_prompt_table, to_display_range


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (sha256), so related streams (epoch, batch, rank) do not
    collide."""
    digest = hashlib.sha256("-".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class LatentDiffusion(pl.LightningModule):
    """Denoising diffusion on `scale_factor * autoencoder.encode(x)` latents.

    Args:
        unet: the denoiser `unet(x_t, t, **cond) -> prediction` (ldm.modules.unet.UNet), `cond`
            the conditioner's output (`class_labels`, or `context` + `context_mask`).
        autoencoder: a trained stage-1 model with `encode`, `decode`, `scale_factor`,
            `latent_channels`, `downsample_factor`. Frozen here: eval mode, no gradients, not
            optimised; its weights are part of this module's checkpoint (self-contained).
        schedule: NoiseSchedule (an nn.Module, so its buffers move and are saved with the model);
            `schedule.prediction_type` is what the UNet predicts.
        sampler: `sampler(schedule=...) -> Sampler` (the Hydra `_partial_` of build_sampler); kept
            unbuilt and built on demand against `self.schedule`.
        optimizer: `optimizer(params) -> Optimizer` (Hydra `_partial_`), applied to the UNet and
            the conditioner's trainable parameters (a jointly trained text encoder).
        lr_scheduler: optional `lr_scheduler(optimizer)` (Hydra `_partial_`), stepped every step.
        loss_weighting: "uniform" or "min_snr"; min_snr_gamma: gamma of min-SNR weighting.
        cond_drop_prob: probability of replacing a condition by the null one in training (the null
            class, the empty caption), for classifier-free guidance.
        conditioner: maps a batch to the UNet's conditioning inputs (ldm.modules.conditioning; the
            config group `conditioning`). None: class labels when the UNet has a class embedding
            (`unet.num_classes`, the behaviour and layout of checkpoints made before conditioners
            existed), else unconditional.
        image_size: pixel size of the (square) images; the latent grid is
            image_size // autoencoder.downsample_factor (set from `${data.image_size}` in yaml, so a
            checkpoint knows its latent shape without a datamodule).
        num_val_samples: size of the sample grid logged each validation epoch (0: none).
        val_guidance_scale: classifier-free guidance scale of that grid (conditional models).
        val_seed: seed of the validation noise, t and grid noise (same seed -> comparable runs).
        val_prompts: captions of the validation grid of a text-conditioned model (None: the
            captions of the first validation batch).
        guidance_interval: [sigma_lo, sigma_hi] or None: where guidance applies when sampling
            (Kynkaenniemi et al. 2024; Sampler.__call__); None: at every step.
        guidance_rescale: CFG rescale phi in [0, 1] (Lin et al. 2023; guided_prediction); 0: off.
            Both are the defaults of `sample()` (grids, FID, sample.py), which can override them.
    """

    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        schedule: nn.Module,
        sampler: Callable[..., Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        cond_drop_prob: float = 0.1,
        conditioner: nn.Module | None = None,
        *,
        image_size: int,
        num_val_samples: int = 16,
        val_guidance_scale: float = 1.0,
        val_seed: int = 0,
        val_prompts: list[str] | None = None,
        guidance_interval: list[float | None] | None = None,
        guidance_rescale: float = 0.0,
    ):
        super().__init__()
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"loss_weighting={loss_weighting!r} is not one of {list(LOSS_WEIGHTINGS)}"
            )
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob={cond_drop_prob} must be in [0, 1]")
        if unet.in_channels != autoencoder.latent_channels:
            raise ValueError(
                f"model.diffusion.unet.in_channels={unet.in_channels} but the autoencoder has "
                f"latent_channels={autoencoder.latent_channels}; they must be equal"
            )
        if unet.out_channels != unet.in_channels:
            raise ValueError(
                f"model.diffusion.unet.out_channels={unet.out_channels} must equal "
                f"in_channels={unet.in_channels} (the UNet predicts a latent-shaped target)"
            )
        if image_size % autoencoder.downsample_factor:
            raise ValueError(
                f"image_size={image_size} is not divisible by the autoencoder's "
                f"downsample_factor={autoencoder.downsample_factor}"
            )
        if num_val_samples < 0:
            raise ValueError(f"num_val_samples={num_val_samples} must be >= 0")
        check_guidance(guidance_interval, guidance_rescale)
        # Only plain data goes to hparams, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            ignore=[
                *("unet", "autoencoder", "schedule", "sampler", "optimizer", "lr_scheduler"),
                "conditioner",
            ]
        )
        conditioner = build_conditioner(conditioner, autoencoder)  # a factory gets the autoencoder
        if conditioner is None and unet.num_classes is not None:
            conditioner = ClassConditioner(unet.num_classes)
        concat = getattr(conditioner, "concat_channels", 0)
        if concat != getattr(unet, "concat_channels", 0):
            raise ValueError(
                f"the conditioner concatenates {concat} channels to the latents but "
                f"model.diffusion.unet.concat_channels={getattr(unet, 'concat_channels', 0)}"
            )
        context_dim = getattr(conditioner, "context_dim", None)
        if context_dim != getattr(unet, "context_dim", None):
            raise ValueError(
                f"the conditioner makes a context of width {context_dim} but "
                f"model.diffusion.unet.context_dim={getattr(unet, 'context_dim', None)}"
            )
        pooled_dim = getattr(conditioner, "pooled_dim", None)
        if pooled_dim != getattr(unet, "pooled_dim", None):
            raise ValueError(
                f"the conditioner makes a pooled vector of width {pooled_dim} but "
                f"model.diffusion.unet.pooled_dim={getattr(unet, 'pooled_dim', None)}: set "
                "both (conditioner.pooled=true with unet.pooled_dim=conditioner.dim) or neither"
            )
        self.unet = unet
        self.conditioner = conditioner
        self.autoencoder = autoencoder
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()
        self.schedule = schedule
        self.sampler_factory = sampler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    # ----------------------------------------------------------------- frozen stage 1
    def train(self, mode: bool = True) -> LatentDiffusion:
        """Lightning calls .train() at every fit/validation switch; the autoencoder stays in
        eval."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    @property
    def num_classes(self) -> int | None:
        return self.unet.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of one latent: the autoencoder's channels at image_size / downsample_factor."""
        size = self.hparams.image_size // self.autoencoder.downsample_factor
        return (self.autoencoder.latent_channels, size, size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, h, w) (`encode_latents`)."""
        return self.autoencoder.encode_latents(images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, C, H, W) clamped to [-1, 1]."""
        return self.autoencoder.decode(latents / self.autoencoder.scale_factor).clamp(-1.0, 1.0)

    def batch_latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scaled latents of a batch: `batch["latent"]` (cache, already scaled) or encoded
        images."""
        if "latent" in batch:
            return batch["latent"]
        if "image" not in batch:
            raise ValueError(f"batch has keys {sorted(batch)}; expected 'latent' or 'image'")
        return self.encode(batch["image"])

    def condition(
        self, batch: dict[str, Any], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The UNet's conditioning kwargs for a batch ({} when unconditional); rows where `drop`
        (B,) is True get the null condition."""
        if self.conditioner is None:
            return {}
        key = self.conditioner.input_key
        if key not in batch:
            raise ValueError(
                f"the model is conditioned on '{key}' ({type(self.conditioner).__name__}) but the "
                f"batch has keys {sorted(batch)}; use data with '{key}' or another conditioning="
            )
        return self.conditioner(batch, drop)

    # ----------------------------------------------------------------- objective
    def model_fn(self, x_t: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """The denoiser as samplers see it: (B, c, h, w), (B,), UNet kwargs -> (B, c, h, w)."""
        return self.unet(x_t, t, **cond)

    def diffusion_loss(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Weighted MSE between the UNet output at x_t = q_sample(x0, t, noise) and the target;
        `cond`: the UNet's conditioning kwargs (`condition(batch)`)."""
        x_t = self.schedule.q_sample(x0, t, noise)  # (B, c, h, w)
        pred = self.unet(x_t, t, **(cond or {}))  # (B, c, h, w)
        target = self.schedule.training_target(x0, noise, t)  # (B, c, h, w)
        mse = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        weight = self.schedule.loss_weight(
            t, weighting=self.hparams.loss_weighting, min_snr_gamma=self.hparams.min_snr_gamma
        )  # (B,)
        return (weight * mse).mean()

    def training_generator(self, batch_idx: int) -> torch.Generator:
        """Noise, t and label dropout of a training batch depend only on (seed, epoch, batch, rank).

        A resumed run therefore draws exactly what the uninterrupted run drew, whatever the global
        RNG state; ranks draw independent noise. (UNet dropout still uses the global RNG.)
        """
        seed = derive_seed(torch.initial_seed(), self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0 = self.batch_latents(batch)  # (B, c, h, w)
        b = x0.shape[0]
        g = self.training_generator(batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=g, device=self.device)
        noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        cond = {}
        if self.conditioner is not None:
            drop = torch.rand(b, generator=g, device=self.device) < self.hparams.cond_drop_prob
            cond = self.condition(batch, drop)  # null condition where drop (B,) is True
        loss = self.diffusion_loss(x0, t, noise, cond)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def fixed_noise_loss(
        self, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> tuple[torch.Tensor, int]:
        """(loss, batch size) at t spread evenly over [0, T-1] with noise seeded by
        val_seed + batch_idx, drawn on the CPU so the number is comparable across runs and
        devices."""
        x0 = self.batch_latents(batch)  # (B, c, h, w)
        cond = self.condition(batch)
        b = x0.shape[0]
        g = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        noise = torch.randn(x0.shape, generator=g).to(device=self.device, dtype=x0.dtype)
        t = (
            torch.linspace(0, self.schedule.num_timesteps - 1, b).round().long().to(self.device)
        )  # (B,)
        return self.diffusion_loss(x0, t, noise, cond), b

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, b = self.fixed_noise_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=b)
        return loss

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, b = self.fixed_noise_loss(batch, batch_idx)
        self.log("test/loss", loss, sync_dist=True, batch_size=b)
        return loss

    def on_validation_epoch_start(self) -> None:
        """Sample the grid here, not at epoch end: Lightning runs callback hooks before the
        module's, so an EMA callback (WeightAveraging) has swapped the averaged weights in at epoch
        start and swaps them out again in its on_validation_epoch_end, before this module's hook
        would run.

        Every rank samples the same grid (cheap, and `log_image_grid` must be called on all ranks);
        rank zero writes it. Classes run along the rows: column k shows label k. A text model's
        grid has one row per prompt (`val_prompts`, else the first validation captions).
        """
        n = self.hparams.num_val_samples
        if n == 0 or self.trainer.sanity_checking:
            return
        if getattr(self.conditioner, "task", None):  # image-to-image: inputs | ours | originals
            from ldm.metrics.img2img import img2img_grid

            g = torch.Generator().manual_seed(self.hparams.val_seed)
            grid = img2img_grid(self, self.trainer.datamodule.val_dataset, n, g)
            log_image_grid(self.trainer, "val/samples", grid, self.global_step)
            return
        labels, scale, nrow = None, 1.0, math.ceil(math.sqrt(n))
        prompts = None
        if self.takes_prompts:
            shown = self.validation_prompts(max(1, n // 4))
            nrow = max(1, n // len(shown))
            prompts = [p for p in shown for _ in range(nrow)]  # one row per prompt
            n, scale = len(prompts), self.hparams.val_guidance_scale
        elif self.num_classes is not None:
            labels = even_class_labels(n, self.num_classes, self.device)  # (n,)
            scale, nrow = self.hparams.val_guidance_scale, min(n, self.num_classes)
        g = torch.Generator().manual_seed(self.hparams.val_seed)
        images = self.sample(
            n, class_labels=labels, guidance_scale=scale, generator=g, prompts=prompts
        )  # (n, C, H, W)
        grid = make_grid(to_display_range(images), nrow=nrow, padding=2)  # (C, H', W') in [0, 1]
        log_image_grid(self.trainer, "val/samples", grid, self.global_step)
        if prompts is not None:
            log_prompt_table(self.trainer, "val/prompts", prompts, images, self.global_step)

    def validation_prompts(self, num: int, datamodule: Any = None) -> list[str]:
        """Prompts of the validation grid: `val_prompts`, else the first `num` distinct captions of
        the validation set (of `datamodule`, default the trainer's)."""
        if self.hparams.val_prompts:
            return list(self.hparams.val_prompts)
        datamodule = datamodule or self.trainer.datamodule
        dataset = datamodule.val_dataset
        captions: list[str] = []
        for i in range(len(dataset)):
            caption = dataset[i]["caption"]
            if caption not in captions:
                captions.append(caption)
            if len(captions) == num:
                break
        return captions

    # ----------------------------------------------------------------- sampling
    def configured_sampler(self, **overrides: Any) -> Any:
        """The configured sampler built on this module's schedule (`overrides`, e.g. steps=20)."""
        return self.sampler_factory(schedule=self.schedule, **overrides)

    def check_labels(self, num_samples: int, class_labels: int | torch.Tensor) -> torch.Tensor:
        """Labels (num_samples,) on self.device; rejects labels the model cannot take."""
        if not self.takes_labels:
            raise ValueError(
                f"class_labels given but the model is {self.conditioning_name()}; "
                + ("pass prompts" if self.takes_prompts else "pass class_labels=None")
            )
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device)
        if labels.ndim == 0:
            labels = labels.expand(num_samples)
        if labels.shape != (num_samples,):
            raise ValueError(
                f"class_labels has shape {tuple(labels.shape)}; expected ({num_samples},)"
            )
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(
                f"class label {bad[0].item()} is outside the model's classes "
                f"0..{self.num_classes - 1}"
            )
        return labels

    @property
    def takes_labels(self) -> bool:
        """True for a class-conditional model, or an image-to-image one also told the class
        (conditioning=hybrid: a HybridConditioner around a ClassConditioner)."""
        context = getattr(self.conditioner, "context", self.conditioner)
        return isinstance(context, ClassConditioner)

    @property
    def takes_prompts(self) -> bool:
        """True for a text-conditioned model (its conditioner reads batch["caption"])."""
        context = getattr(self.conditioner, "context", self.conditioner)  # a hybrid's context
        return getattr(context, "input_key", None) == "caption"

    def conditioning_name(self) -> str:
        if self.conditioner is None:
            return "unconditional (conditioning=none)"
        if isinstance(self.conditioner, ClassConditioner):
            return f"class-conditional (conditioning=class, {self.num_classes} classes)"
        return f"conditioned on '{self.conditioner.input_key}' ({type(self.conditioner).__name__})"

    def sample_conditions(
        self,
        num_samples: int,
        class_labels: int | torch.Tensor | None,
        prompts: str | list[str] | None,
        guidance_scale: float,
    ) -> dict[str, Any] | None:
        """The batch-like condition of `sample` (`{"label": (N,)}`, `{"caption": [N str]}`) or None
        (unconditional); one-line errors for a condition the model cannot take."""
        if class_labels is not None and prompts is not None:
            raise ValueError("pass class_labels or prompts, not both")
        conditions = None
        if class_labels is not None:
            conditions = {"label": self.check_labels(num_samples, class_labels)}
        elif prompts is not None:
            if not self.takes_prompts:
                raise ValueError(
                    f"prompts given but the model is {self.conditioning_name()}; it takes no text"
                    + (" (pass class_labels)" if self.num_classes else "")
                )
            prompts = [prompts] * num_samples if isinstance(prompts, str) else list(prompts)
            if len(prompts) != num_samples:
                raise ValueError(f"{len(prompts)} prompts for num_samples={num_samples}")
            conditions = {"caption": prompts}
        if conditions is not None:
            self.conditioner.check_conditions(conditions)
        elif guidance_scale != 1.0:
            wanted = "prompts" if self.takes_prompts else "class_labels"
            raise ValueError(
                f"guidance_scale={guidance_scale} needs {wanted} (guidance pushes towards a "
                f"condition); the model is {self.conditioning_name()}"
            )
        return conditions

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        class_labels: int | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        sampler: Any | None = None,
        callback: Callable[..., Any] | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        prompts: str | list[str] | None = None,
        guidance_interval: list[float | None] | None = None,
        guidance_rescale: float | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Generate images (num_samples, C, H, W) in [-1, 1] by reverse diffusion in latent space.

        class_labels: None (unconditional: the null class on a conditional model), an int for all,
            or a LongTensor (num_samples,). prompts: a caption for all or one per sample (a
            text-conditioned model; None: the empty caption). guidance_scale: classifier-free
            guidance pred = uncond + s * (cond - uncond) (Ho & Salimans 2022, Eq. 6), s=1 is plain
            conditional sampling. generator: seeds x_T (drawn on the generator's device, so a CPU
            generator gives the same start noise on any device) and the sampler's noise.
            sampler: a built Sampler (default: the configured one, `configured_sampler()`).
            latent_shape: (c, h, w), default `self.latent_shape`.
            guidance_interval, guidance_rescale: see Sampler.__call__; None: the model's own
            (`model.diffusion.guidance_interval` / `guidance_rescale`). [null, null] guides at
            every step whatever the model's setting.
            inputs: the image condition of an image-to-image model, batch-like (N, ...) tensors:
                `{"lowres"}` (task=superres) or `{"masked_image", "mask"}` (task=inpaint).
            init_images / strength: SDEdit (ldm.diffusion.sdedit): start from init_images
                (num_samples, C, H, W) in [-1, 1], encoded and noised to the sampler's step
                matching strength in (0, 1], instead of from noise (any model, with guidance).
        """
        if num_samples <= 0:
            raise ValueError(f"num_samples={num_samples} must be positive")
        conditions = self.sample_conditions(num_samples, class_labels, prompts, guidance_scale)
        sampler = sampler if sampler is not None else self.configured_sampler()
        # .get: checkpoints made before these options have no such hparams
        if guidance_interval is None:
            guidance_interval = self.hparams.get("guidance_interval")
        if guidance_rescale is None:
            guidance_rescale = self.hparams.get("guidance_rescale", 0.0)
        if inputs:
            conditions = {**(conditions or {}), **inputs}
        shape = (num_samples, *(latent_shape or self.latent_shape))
        noise_device = generator.device if generator is not None else self.device
        if init_images is not None:
            if init_images.ndim != 4 or init_images.shape[0] != num_samples:
                raise ValueError(
                    f"init_images has shape {tuple(init_images.shape)}; expected "
                    f"({num_samples}, C, H, W)"
                )
            z_init = self.encode(init_images.to(self.device))  # (N, c, h, w)
        else:
            x_T = torch.randn(shape, generator=generator, device=noise_device).to(
                self.device
            )  # (N, c, h, w)
        was_training = self.training
        self.eval()  # UNet and conditioner (a text encoder's dropout)
        try:
            cond = uncond = None
            if conditions is not None:
                cond = self.condition(conditions)
                drop = torch.ones(num_samples, dtype=torch.bool, device=self.device)
                uncond = self.condition(conditions, drop)
            elif self.conditioner is not None:
                cond = self.conditioner.unconditional(num_samples, self.device)
            guide = {
                "cond": cond,
                "uncond": uncond,
                "guidance_scale": guidance_scale,
                "guidance_interval": guidance_interval,
                "guidance_rescale": guidance_rescale,
                "generator": generator,
                "callback": callback,
            }
            if init_images is not None:
                z0 = sdedit(sampler, self.model_fn, z_init, strength, **guide)  # (N, c, h, w)
            else:
                z0 = sampler(self.model_fn, x_T, **guide)  # (N, c, h, w)
        finally:
            self.train(was_training)
        return self.decode(z0)  # (N, C, H, W)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        params = list(self.unet.parameters())
        if self.conditioner is not None:  # a jointly trained text encoder; frozen ones are skipped
            params += [p for p in self.conditioner.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        # training batches (inf without a budget, or outside a Trainer: only a cosine with
        # T_max=null needs the number, and says so)
        trainer = self._trainer
        total = trainer.estimated_stepping_batches if trainer is not None else math.inf
        total = max(1, int(total)) if math.isfinite(total) else total
        scheduler = build_lr_scheduler(self.lr_scheduler_factory, optimizer, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
