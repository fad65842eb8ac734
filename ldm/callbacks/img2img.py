"""Image-to-image metrics during training: super-resolution / inpainting outputs on the validation
split scored beside the bicubic / masked-input baseline (ldm.metrics.img2img), after every n-th
epoch and the last one.

Logs `val/<row>/<metric>` (e.g. `val/ours/fid`, `val/bicubic/psnr`) and writes
`img2img_metrics.{json,md}` and `img2img_grid.png` to `out_dir`. Runs at validation epoch start,
after an EMA callback listed before it has swapped the averaged weights in (the weights the
validation grid and the checkpoint use); the task configs list it after `ema`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import Subset

from ldm.metrics.fid import build_extractor, real_features_path
from ldm.metrics.img2img import evaluate_img2img, format_table, save_result
from ldm.utils.errors import UserError

log = logging.getLogger(__name__)


class Img2ImgMetrics(pl.Callback):
    """See the module docstring. `num_samples`: validation items scored (all when larger);
    `extractor`: FID features (`classifier` | `inception` | None: PSNR/SSIM only);
    `sampler_steps`: the model's sampler at this many steps (None: as configured); `paste`:
    inpainting outputs keep the known pixels of the input (task.paste)."""

    def __init__(
        self,
        out_dir: str | Path,
        every_n_epochs: int = 0,
        num_samples: int = 500,
        batch_size: int = 250,
        extractor: str | None = "classifier",
        cache_dir: str | Path = ".cache/ldm",
        inception_weights: str | Path | None = None,
        classifier: Mapping[str, Any] | None = None,
        sampler_steps: int | None = None,
        seed: int = 0,
        paste: bool = True,
    ):
        super().__init__()
        if every_n_epochs < 0 or num_samples < 2 or batch_size < 1:
            raise UserError(
                f"img2img metrics: every_n_epochs={every_n_epochs} must be >= 0, "
                f"num_samples={num_samples} >= 2, batch_size={batch_size} >= 1"
            )
        self.out_dir, self.every_n_epochs = Path(out_dir), every_n_epochs
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.extractor_name, self.cache_dir = extractor, cache_dir
        self.inception_weights, self.classifier_settings = inception_weights, dict(classifier or {})
        self.sampler_steps, self.paste = sampler_steps, paste
        self.result: dict[str, Any] | None = None

    def should_evaluate(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return last or (self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.should_evaluate(trainer):
            return
        datamodule = trainer.datamodule
        images = getattr(datamodule, "image_datamodule", None) or datamodule
        fid_args: dict[str, Any] = {}
        if self.extractor_name is not None:
            extractor, classifier = build_extractor(
                self.extractor_name,
                images,
                self.cache_dir,
                self.inception_weights,
                self.classifier_settings,
                verbose=trainer.is_global_zero,
            )
            fid_args = {
                "extractor": extractor.to(pl_module.device),
                "classifier": classifier,
                # the plain train images (not the task's items): FID's reference, as in training
                "reals": Subset(images.full_dataset, images.train_dataset.indices),
                "real_cache": real_features_path(self.cache_dir, images.fingerprint(), extractor),
            }
        sampler = None
        if self.sampler_steps is not None:
            sampler = pl_module.configured_sampler(steps=self.sampler_steps)
        result = evaluate_img2img(
            pl_module,
            datamodule.val_dataset,
            num_samples=self.num_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            sampler=sampler,
            paste=self.paste,
            **fid_args,
        )
        self.result = result
        for row, metrics in result["rows"].items():
            for name, value in metrics.items():
                key = f"val/{row.replace(' ', '_')}/{name}"
                pl_module.log(key, value, rank_zero_only=True, batch_size=result["num_samples"])
        if trainer.is_global_zero:
            paths = save_result(result, self.out_dir)
            log.info("image-to-image metrics (%s):\n%s", paths["table"], format_table(result))
