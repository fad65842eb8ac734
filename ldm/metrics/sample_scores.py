"""FID/KID/CAS and precision/recall/density/coverage of generated images against the train split
of a stage-2 checkpoint's own dataset.

`build_evaluator(ckpt, ...)` rebuilds the data module from the config stored in the checkpoint
(allowlisted targets only), gets the feature extractor (training the FID classifier once, cached)
and reuses the real-feature cache that the training FID callback filled. Used by
`sample.py fid=true` and the NFE sweep (ldm.metrics.nfe_sweep).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.metrics.prdc import PRDC_KEYS
from ldm.utils.errors import UserError


@dataclass
class Evaluator:
    """`evaluate(images, labels)` -> {fid, kid, kid_std, cas, precision, recall, density, coverage,
    N, num_real} (ldm.metrics.fid, ldm.metrics.prdc)."""

    extractor: Any
    classifier: Any
    reals: Any
    real_cache: Path
    metrics_cfg: DictConfig
    dataset: str
    transform: Any = None  # audio: generated clips are judged after the waveform round trip

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        from ldm.metrics.fid import compute_metrics

        scores = compute_metrics(
            images,
            self.reals,
            self.extractor,
            fake_labels=labels if self.classifier is not None else None,
            classifier=self.classifier,
            real_cache=self.real_cache,
            batch_size=self.metrics_cfg.batch_size,
            kid_subsets=self.metrics_cfg.kid_subsets,
            kid_subset_size=self.metrics_cfg.kid_subset_size,
            seed=self.metrics_cfg.seed,
            nearest_k=self.metrics_cfg.get("nearest_k", 3),
            transform=self.transform,
        )
        return {
            "fid": scores["fid"],
            "kid": scores["kid"],
            "kid_std": scores["kid_std"],
            "cas": scores.get("cas"),
            **{key: scores[key] for key in PRDC_KEYS},
            "N": scores["num_samples"],
            "num_real": scores["num_real"],
        }


def stored_data_config(ckpt: Mapping[str, Any], path: Path, needed_by: str) -> Mapping:
    """The data config stage 2 of checkpoint `ckpt` trained on: the shared `data` refined by
    `diffusion.data` (e.g. its batch size, where `data.batch_size` is null). `needed_by`: "<what>
    need(s)", for the error."""
    from ldm.config import stage_section

    stored = ckpt["ldm"]["config"]
    data_cfg = None
    if isinstance(stored.get("data"), Mapping):
        data_cfg = stage_section(OmegaConf.create(stored), "diffusion", "data")
    if not isinstance(data_cfg, Mapping):
        raise UserError(f"checkpoint {str(path)!r} stores no data config; {needed_by} the dataset")
    return data_cfg


def build_evaluator(
    ckpt: Mapping[str, Any], path: Path, metrics_cfg: DictConfig, device: torch.device
) -> Evaluator:
    """The Evaluator of checkpoint `ckpt` (read from `path`) with the `fid` group's settings."""
    from ldm.metrics.fid import build_extractor, evaluation_transform, real_features_path
    from ldm.utils.instantiate import safe_instantiate

    data_cfg = stored_data_config(ckpt, path, "fid/nfe_sweep need")
    if data_cfg.get("modality") == "audio" and metrics_cfg.extractor not in ("classifier", "auto"):
        raise UserError(
            f"fid@metrics={metrics_cfg.extractor} is for images; checkpoint {str(path)!r} makes "
            "audio, judged by the spectrogram classifier (fid@metrics=classifier)"
        )
    classifier_cfg = metrics_cfg.get("classifier")
    if isinstance(classifier_cfg, DictConfig):
        classifier_cfg = OmegaConf.to_container(classifier_cfg, resolve=True)
    contrastive_cfg = metrics_cfg.get("contrastive")
    if isinstance(contrastive_cfg, DictConfig):
        contrastive_cfg = OmegaConf.to_container(contrastive_cfg, resolve=True)
    try:
        datamodule = safe_instantiate(data_cfg, where=f"checkpoint {str(path)!r} (data)")
        datamodule.setup("fit")
        extractor, classifier = build_extractor(
            metrics_cfg.extractor,
            datamodule,
            metrics_cfg.cache_dir,
            metrics_cfg.get("inception_weights"),
            classifier_cfg,
            contrastive=contrastive_cfg,
        )
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"fid: {str(err).splitlines()[0]}") from err
    extractor.to(device)
    return Evaluator(
        extractor=extractor,
        classifier=classifier,
        reals=datamodule.train_dataset,
        # the file the training FID callback fills: sampling reuses the training run's real features
        real_cache=real_features_path(metrics_cfg.cache_dir, datamodule.fingerprint(), extractor),
        metrics_cfg=metrics_cfg,
        dataset=str(data_cfg.get("name", data_cfg.get("_target_"))),
        transform=evaluation_transform(datamodule),
    )
