"""AudioSamples: for audio data, let the run be listened to during training.

At the end of validation every `every_n_epochs` epochs (and after the last one) rank zero samples
one clip per class with the model (EMA weights: list this callback before the EMA callback),
turns the mel images into waveforms with the data's front end (ldm.audio.frontend: Griffin-Lim),
logs them to W&B as `val/audio` (`wandb.Audio`, captioned with the digit asked for) and writes
them as WAVs under `<log dir>/audio/`. It does nothing for image data. The sample grid itself
(the spectrograms) is the model's `val/samples` image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from ldm.utils.errors import UserError

log = logging.getLogger(__name__)


def audio_frontend(datamodule: pl.LightningDataModule | None):
    """The mel front end of an audio data module (or of the images a latents module encodes)."""
    images = getattr(datamodule, "image_datamodule", None) or datamodule
    if getattr(images, "modality", "image") != "audio":
        return None
    return getattr(images.source, "frontend", None)


class AudioSamples(pl.Callback):
    """See the module docstring. `per_class`: clips per class (unconditional models: that many)."""

    def __init__(self, every_n_epochs: int = 5, per_class: int = 1, seed: int = 0):
        super().__init__()
        if every_n_epochs < 0 or per_class < 1:
            raise UserError(
                f"audio samples: every_n_epochs={every_n_epochs} must be >= 0 and "
                f"per_class={per_class} >= 1"
            )
        self.every_n_epochs, self.per_class, self.seed = every_n_epochs, per_class, seed

    def due(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs == 0 or trainer.sanity_checking:
            return False
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.due(trainer) and trainer.is_global_zero and hasattr(pl_module, "sample")):
            return
        frontend = audio_frontend(trainer.datamodule)
        if frontend is None:
            return
        num_classes = getattr(pl_module, "num_classes", None)
        kwargs = {}
        if num_classes:
            labels = torch.arange(num_classes, device=pl_module.device).repeat(self.per_class)
            kwargs = {
                "class_labels": labels,
                "guidance_scale": getattr(pl_module.hparams, "val_guidance_scale", 1.0),
            }
            n = len(labels)
        else:
            labels, n = None, self.per_class
        generator = torch.Generator().manual_seed(self.seed)
        images = pl_module.sample(n, generator=generator, **kwargs)  # (n, 1, M, T)
        waves = frontend.to("cpu").decode(images.float().cpu())  # (n, samples)
        rate = frontend.config.sample_rate
        from ldm.audio.wav import write_wav

        root = Path(trainer.log_dir or trainer.default_root_dir) / "audio"
        if labels is not None:
            captions = [f"digit {int(k)}" for k in labels]
        else:
            captions = [f"sample {i}" for i in range(n)]
        for i, (wave, caption) in enumerate(zip(waves, captions)):
            name = caption.replace(" ", "")
            write_wav(root / f"epoch{trainer.current_epoch:03d}_{i:02d}_{name}.wav", wave, rate)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # wandb.Audio clips under val/audio
                logger.log_audio(
                    "val/audio",
                    [w.numpy() for w in waves],
                    step=trainer.global_step,
                    sample_rate=[rate] * n,
                    caption=captions,
                )
        log.info("epoch %d: %d audio samples -> %s", trainer.current_epoch, n, root)
