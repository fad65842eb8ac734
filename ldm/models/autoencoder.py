"""Stage-1 autoencoders (LightningModules): KL- and VQ-regularised, optional PatchGAN.

Rombach et al. 2022 (LDM, arXiv 2112.10752) Sec. 3.1: a perceptual-compression autoencoder,
regularised either by a small KL penalty towards N(0, I) ("KL-reg.") or by a vector-quantisation
layer ("VQ-reg."), trained with a reconstruction loss and optionally the patch-based adversarial
objective of Esser et al. 2021 (Taming Transformers, Eq. 5-7). The LPIPS perceptual term of the
paper is left out (its weights do not ship offline).

Interface used by stage 2 (see the contract):
    z = ae.encode(x)                     # unscaled latents (KL: posterior mode; VQ: quantized)
    x = ae.decode(z)                     # images in about [-1, 1]
    ae.scale_factor                      # buffer, 1/std of the latents; diffuse z * scale_factor
    ae.latent_channels, ae.downsample_factor, ae.image_channels
"""

import abc
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from ldm.modules.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss
from ldm.modules.distributions import DiagonalGaussian
from ldm.modules.encoder_decoder import Decoder, Encoder
from ldm.modules.quantizer import VectorQuantizer, codebook_perplexity
from ldm.optim import SchedulerFactory, build_lr_scheduler
from ldm.utils.images import log_image_grid, to_display_range

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # a Hydra `_partial_` optimizer

_REC_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}
_MODULE_ARGS = [
    *("encoder", "decoder", "optimizer", "discriminator", "disc_optimizer", "quantizer"),
    "lr_scheduler",
]


class AutoencodeOutput(NamedTuple):
    x_rec: torch.Tensor  # (B, C, H, W) reconstruction
    z: torch.Tensor  # (B, c, h, w) latent as `encode` returns it (for the scale factor)
    reg_loss: torch.Tensor  # () weighted regulariser (KL or VQ losses)
    logs: dict[str, torch.Tensor]  # extra scalars to log, without the "train/"/"val/" prefix


class Autoencoder(pl.LightningModule, abc.ABC):
    """Common base: reconstruction + regulariser + optional PatchGAN under manual optimization.

    Args:
        encoder, decoder: built `Encoder` / `Decoder`.
        optimizer: `_partial_` optimizer factory for the autoencoder parameters.
        latent_channels, image_channels: checked against encoder/decoder (the yaml's top-level
            keys, interpolated into them).
        rec_loss: "l1" or "l2", mean over pixels.
        discriminator: a built `NLayerDiscriminator`, or None for no GAN (the default).
        disc_optimizer: `_partial_` optimizer for the discriminator; None reuses `optimizer`.
        disc_weight: scale of the adaptive GAN weight; 0 turns the GAN off.
        disc_start: training batch index from which the GAN terms are on (counted in batches,
            not in `global_step`, which under manual optimization counts both optimizers).
        grad_clip: max gradient norm per optimizer step, or None (Trainer.gradient_clip_val is
            not available under manual optimization).
        lr_scheduler: `_partial_` torch scheduler (see `build_lr_scheduler`), one per optimizer,
            stepped after each of its optimizer's steps (manual optimization: Lightning does not
            step them); None: constant lr. The yaml's default: linear warm-up, then a half cosine
            to 0 over `trainer.estimated_stepping_batches` (Loshchilov & Hutter 2017).
        num_log_images: inputs/reconstructions shown in the validation grid.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        optimizer: OptimizerFactory,
        latent_channels: int,
        image_channels: int,
        rec_loss: str = "l1",
        discriminator: nn.Module | None = None,
        disc_optimizer: OptimizerFactory | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        grad_clip: float | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        num_log_images: int = 8,
    ):
        super().__init__()
        if rec_loss not in _REC_LOSSES:
            raise ValueError(f"rec_loss={rec_loss!r} is not one of {sorted(_REC_LOSSES)}")
        if encoder.in_channels != image_channels or decoder.out_channels != image_channels:
            raise ValueError(
                f"image_channels={image_channels} but encoder.in_channels={encoder.in_channels}, "
                f"decoder.out_channels={decoder.out_channels}"
            )
        if encoder.downsample_factor != decoder.upsample_factor:
            raise ValueError(
                f"encoder downsamples by {encoder.downsample_factor} but decoder upsamples by "
                f"{decoder.upsample_factor}; give both the same ch_mult length"
            )
        if disc_weight < 0 or disc_start < 0:
            raise ValueError(f"disc_weight={disc_weight} and disc_start={disc_start} must be >= 0")
        self.automatic_optimization = False
        self.encoder = encoder
        self.decoder = decoder
        self.optimizer_factory = optimizer
        if discriminator is not None and disc_weight == 0:
            rank_zero_info("disc_weight=0: the discriminator is not used.")
            discriminator = None
        self.discriminator = discriminator
        self.disc_optimizer_factory = disc_optimizer if disc_optimizer is not None else optimizer
        self.latent_channels = latent_channels
        self.image_channels = image_channels
        self.downsample_factor = encoder.downsample_factor
        self.rec_loss_fn = _REC_LOSSES[rec_loss]
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.grad_clip = grad_clip
        self.lr_scheduler_factory = lr_scheduler
        self.num_log_images = num_log_images
        # 1/std of the latents; set at the end of every validation epoch (before ModelCheckpoint
        # saves) or by `compute_scale_factor`. Persistent, so checkpoints carry it.
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self._latent_stats = torch.zeros(3, dtype=torch.float64)  # sum, sum of squares, count

    # -- interface -------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> unscaled latents (B, c, H/f, W/f)."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, c, h, w) -> images (B, C, h*f, w*f) in about [-1, 1]."""

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, h, w) of about unit variance:
        scale_factor * encode(x) (LDM Sec. 4.3.2 / App. G; KL: the posterior mode, VQ: quantized).
        The one definition of stage 2's latents: LatentDiffusion and the latent cache call it."""
        return self.encode(images) * self.scale_factor

    @abc.abstractmethod
    def autoencode(self, x: torch.Tensor) -> AutoencodeOutput:
        """Full pass with losses; in training mode it may sample/update regulariser state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def ae_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        opts = [self.optimizer_factory(params=self.ae_parameters())]
        if self.discriminator is not None:
            opts.append(self.disc_optimizer_factory(params=self.discriminator.parameters()))
        if self.lr_scheduler_factory is None:
            return opts[0] if len(opts) == 1 else opts
        total = self.trainer.estimated_stepping_batches  # training batches (inf without a budget)
        total = max(1, int(total)) if math.isfinite(total) else total
        return opts, [build_lr_scheduler(self.lr_scheduler_factory, opt, total) for opt in opts]

    def _schedulers(self) -> list:
        scheds = self.lr_schedulers()
        return [] if scheds is None else scheds if isinstance(scheds, list) else [scheds]

    def _gan_active(self) -> bool:
        return (
            self.discriminator is not None
            and self.trainer.fit_loop.total_batch_idx >= self.disc_start
        )

    def _step(self, opt, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip is not None:
            self.clip_gradients(
                opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm"
            )
        opt.step()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]  # (B, C, H, W) in [-1, 1]
        opts = self.optimizers()
        opt_ae, opt_disc = opts if isinstance(opts, list) else (opts, None)
        gan = self._gan_active()

        self.toggle_optimizer(opt_ae)  # freezes the discriminator during the generator step
        out = self.autoencode(x)
        rec_loss = self.rec_loss_fn(out.x_rec, x)
        loss = rec_loss + out.reg_loss
        logs = {"rec_loss": rec_loss, **out.logs}
        if gan:
            g_loss = hinge_g_loss(self.discriminator(out.x_rec))
            d_weight = self.disc_weight * adaptive_weight(rec_loss, g_loss, self.decoder.last_layer)
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss, d_weight=d_weight)
        self._step(opt_ae, loss)
        self.untoggle_optimizer(opt_ae)
        scheds = self._schedulers()  # [autoencoder, discriminator] when scheduled
        if scheds:
            scheds[0].step()

        if gan:
            self.toggle_optimizer(opt_disc)
            logits_real = self.discriminator(x)
            logits_fake = self.discriminator(out.x_rec.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self._step(opt_disc, d_loss)
            self.untoggle_optimizer(opt_disc)
            if len(scheds) > 1:
                scheds[1].step()  # counts discriminator steps, so it starts at disc_start
            logs.update(
                d_loss=d_loss,
                logits_real=logits_real.mean().detach(),
                logits_fake=logits_fake.mean().detach(),
            )

        b = x.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=b)
        for k, v in logs.items():
            self.log(f"train/{k}", v.detach(), batch_size=b)
        return loss.detach()

    # -- validation ------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._latent_stats = torch.zeros(3, dtype=torch.float64, device=self.device)

    def _evaluate(
        self, batch: dict, prefix: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct without sampling or state updates; log `<prefix>/rec_loss`, `loss`,
        `psnr`, `ssim` (mean over images, on [0, 1] images). Returns inputs and
        reconstructions in [0, 1] and the latents."""
        x = batch["image"]  # (B, C, H, W) in [-1, 1]
        b = x.shape[0]
        out = self.autoencode(x)
        rec_loss = self.rec_loss_fn(out.x_rec, x)
        x01, rec01 = to_display_range(x), to_display_range(out.x_rec)
        psnr = peak_signal_noise_ratio(rec01, x01, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(
            rec01, x01, data_range=1.0, reduction="none", kernel_size=_ssim_kernel(x)
        )
        self.log(f"{prefix}/rec_loss", rec_loss, prog_bar=True, sync_dist=True, batch_size=b)
        self.log(f"{prefix}/loss", rec_loss + out.reg_loss, sync_dist=True, batch_size=b)
        self.log(f"{prefix}/psnr", psnr.mean(), prog_bar=True, sync_dist=True, batch_size=b)
        self.log(f"{prefix}/ssim", ssim.mean(), sync_dist=True, batch_size=b)
        for k, v in out.logs.items():
            if k.startswith("codebook_"):
                continue  # per-batch usage is noisy; VQ logs it over the whole epoch
            self.log(f"{prefix}/{k}", v, sync_dist=True, batch_size=b)
        return x01, rec01, out.z

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x01, rec01, z = self._evaluate(batch, "val")
        self._accumulate_latent_stats(z)
        if batch_idx == 0 and not self.trainer.sanity_checking and self.num_log_images > 0:
            n = min(self.num_log_images, x01.shape[0])
            grid = torchvision.utils.make_grid(
                torch.cat([x01[:n], rec01[:n]]), nrow=n, padding=1, pad_value=1.0
            )  # (C, H', W'): inputs in the top row, reconstructions below
            log_image_grid(self.trainer, "val/reconstructions", grid, self.global_step)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        stats = self.trainer.strategy.reduce(self._latent_stats, reduce_op="sum")
        self._set_scale_factor(stats)
        self.log("val/scale_factor", self.scale_factor)

    # -- latent scale factor -------------------------------------------------------------
    def _accumulate_latent_stats(self, z: torch.Tensor) -> None:
        z = z.detach().double()
        stats = torch.stack([z.sum(), z.pow(2).sum(), z.new_tensor(z.numel())])
        self._latent_stats = self._latent_stats.to(z.device) + stats

    def _set_scale_factor(self, stats: torch.Tensor) -> None:
        total, total_sq, n = stats.tolist()
        if n < 2:
            raise ValueError(f"need at least 2 latent values for the scale factor, got {n:.0f}")
        var = (total_sq - total * total / n) / (n - 1)  # unbiased variance over all elements
        self.scale_factor.fill_(1.0 / max(var, 1e-12) ** 0.5)

    @torch.no_grad()
    def compute_scale_factor(self, batches: Iterable[dict]) -> float:
        """Set `scale_factor` = 1/std of `encode(batch["image"])` over `batches` (single
        process; for runs without a validation loop). Returns the new value."""
        stats = torch.zeros(3, dtype=torch.float64)
        self._latent_stats = stats
        for batch in batches:
            self._accumulate_latent_stats(self.encode(batch["image"].to(self.device)))
        self._set_scale_factor(self._latent_stats)
        return float(self.scale_factor)


def _ssim_kernel(x: torch.Tensor) -> int:
    """The standard 11x11 SSIM window, shrunk (odd) for images smaller than that."""
    k = min(11, x.shape[-1], x.shape[-2])
    return k if k % 2 == 1 else k - 1


class KLAutoencoder(Autoencoder):
    """KL-regularised autoencoder (LDM "KL-reg."): the encoder outputs mean and log-variance of a
    diagonal Gaussian posterior; loss = rec + kl_weight * KL(q(z|x) || N(0, I)), the KL summed
    over latent elements and averaged over the batch (the rec loss is a per-pixel mean).

    Training decodes a posterior sample; validation, `encode` and the scale factor use the
    posterior mode (`encode(x, sample=True)` samples instead)."""

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        optimizer: OptimizerFactory,
        latent_channels: int,
        image_channels: int,
        kl_weight: float = 1e-6,
        **kwargs,
    ):
        super().__init__(encoder, decoder, optimizer, latent_channels, image_channels, **kwargs)
        if encoder.out_channels != 2 * latent_channels or decoder.z_channels != latent_channels:
            raise ValueError(
                f"latent_channels={latent_channels} needs encoder.out_channels="
                f"{2 * latent_channels} (double_z) and decoder.z_channels={latent_channels}; got "
                f"{encoder.out_channels} and {decoder.z_channels}"
            )
        if kl_weight < 0:
            raise ValueError(f"kl_weight={kl_weight} must be >= 0")
        self.kl_weight = kl_weight
        self.save_hyperparameters(ignore=_MODULE_ARGS)

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(x))  # from (B, 2c, h, w)

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        posterior = self.posterior(x)
        return posterior.sample(generator) if sample else posterior.mode()  # (B, c, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, C, H, W)

    def autoencode(self, x: torch.Tensor) -> AutoencodeOutput:
        posterior = self.posterior(x)
        z = posterior.mode()
        x_rec = self.decoder(posterior.sample() if self.training else z)
        kl = posterior.kl().mean()
        return AutoencodeOutput(x_rec, z, self.kl_weight * kl, {"kl_loss": kl})


class VQAutoencoder(Autoencoder):
    """VQ-regularised autoencoder (LDM "VQ-reg.", van den Oord et al. 2017): encoder ->
    1x1 conv to `latent_channels` -> `VectorQuantizer` -> 1x1 conv -> decoder;
    loss = rec + codebook/commitment loss of the quantizer.

    `encode` returns quantized latents; `decode(z)` snaps z to the codebook first (as CompVis LDM
    does for VQ first stages, so stage-2 samples land on codes) unless `quantize=False`.
    Logs codebook perplexity and usage (fraction of codes used) per training batch and over each
    validation epoch."""

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        quantizer: VectorQuantizer,
        optimizer: OptimizerFactory,
        latent_channels: int,
        image_channels: int,
        **kwargs,
    ):
        super().__init__(encoder, decoder, optimizer, latent_channels, image_channels, **kwargs)
        if quantizer.code_dim != latent_channels:
            raise ValueError(
                f"latent_channels={latent_channels} but quantizer.code_dim={quantizer.code_dim}"
            )
        self.pre_quant = nn.Conv2d(encoder.out_channels, latent_channels, 1)
        self.quantizer = quantizer
        self.post_quant = nn.Conv2d(latent_channels, decoder.z_channels, 1)
        self._val_code_counts = torch.zeros(quantizer.num_codes)
        self.save_hyperparameters(ignore=_MODULE_ARGS)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.quantize(self.pre_quant(self.encoder(x)))[0]  # (B, c, h, w)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        if quantize:
            z = self.quantizer.quantize(z)[0]
        return self.decoder(self.post_quant(z))  # (B, C, H, W)

    def autoencode(self, x: torch.Tensor) -> AutoencodeOutput:
        q = self.quantizer(self.pre_quant(self.encoder(x)))
        x_rec = self.decoder(self.post_quant(q.z_q))
        if not self.training:
            self._val_code_counts = self._val_code_counts.to(q.counts.device) + q.counts
        logs = {
            "quant_loss": q.loss,
            "codebook_perplexity": codebook_perplexity(q.counts),
            "codebook_usage": (q.counts > 0).float().mean(),
        }
        return AutoencodeOutput(x_rec, q.z_q.detach(), q.loss, logs)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_code_counts = torch.zeros(self.quantizer.num_codes, device=self.device)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            return
        counts = self.trainer.strategy.reduce(self._val_code_counts, reduce_op="sum")
        self.log("val/codebook_perplexity", codebook_perplexity(counts))
        self.log("val/codebook_usage", (counts > 0).float().mean())


__all__ = ["AutoencodeOutput", "Autoencoder", "KLAutoencoder", "VQAutoencoder"]
