"""Text-following metrics during training (ldm.metrics.text), logged as `val/text/*`.

Runs in on_validation_epoch_end, every `every_n_epochs` and after the last epoch, for
text-conditioned models on captioned MNIST. Like the FID callback it must come before the EMA
callback in the list (conf/conditioning/text.yaml adds it, and `conditioning` precedes `callbacks`
in train.yaml's defaults, so it does): the EMA weights are still swapped in then.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class TextMetricsCallback(pl.Callback):
    """Args: every_n_epochs (0: off), per_prompt samples per evaluation prompt, guidance_scale,
    seed, and the FID group's `cache_dir` / `classifier` settings (the same cached classifier)."""

    def __init__(
        self,
        every_n_epochs: int = 0,
        per_prompt: int = 2,
        guidance_scale: float = 3.0,
        seed: int = 0,
        cache_dir: str = ".cache",
        classifier: dict[str, Any] | None = None,
        batch_size: int = 256,
    ):
        if every_n_epochs < 0 or per_prompt < 1:
            raise ValueError(
                f"text metrics: every_n_epochs={every_n_epochs} must be >= 0 and "
                f"per_prompt={per_prompt} >= 1"
            )
        self.every_n_epochs, self.per_prompt = every_n_epochs, per_prompt
        self.guidance_scale, self.seed, self.batch_size = guidance_scale, seed, batch_size
        self.metrics_cfg = OmegaConf.create({"cache_dir": cache_dir, "classifier": classifier})
        self.inputs: tuple | None = None
        self.last: dict[str, Any] | None = None

    def due(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs == 0 or trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return last or epoch % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not getattr(pl_module, "takes_prompts", False) or not self.due(trainer):
            return
        from ldm.metrics.text import evaluate_text_model, summary_line, text_eval_inputs

        if self.inputs is None:
            self.inputs = text_eval_inputs(trainer.datamodule, self.metrics_cfg)
            self.inputs[0].to(pl_module.device)
        result = evaluate_text_model(
            pl_module,
            *self.inputs,
            per_prompt=self.per_prompt,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        self.last = result
        for key, value in result.items():
            if isinstance(value, float):
                pl_module.log(f"val/text/{key}", value, sync_dist=False, rank_zero_only=True)
        log.info(summary_line(result))
