"""FID / KID / CAS of generated images over torchmetrics, with offline feature extractors.

- FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium" (Frechet distance between Gaussians fitted to features), torchmetrics'
  FrechetInceptionDistance, accumulated and computed in float64.
- KID: Binkowski et al. 2018, "Demystifying MMD GANs" (unbiased MMD^2 with a cubic polynomial
  kernel, averaged over random subsets), torchmetrics' KernelInceptionDistance.
- CAS: class-conditional accuracy of samples: images generated for label k that the dataset's
  feature classifier classifies as k.
- precision / recall / density / coverage (ldm.metrics.prdc: Kynkaenniemi et al. 2019, Naeem et
  al. 2020): fidelity and diversity as separate numbers, on the same features as FID.

Feature extractors take float images in [0, 1] (torchmetrics' `normalize=True` convention) with any
channel count that can be mapped to theirs (1 <-> 3) and any size (resized):
- `ClassifierFeatures`: penultimate layer of the project's own classifier (ldm.metrics.classifier),
  trained once per dataset — works on machines without internet;
- `ContrastiveFeatures`: pooled trunk of a small network trained self-supervised (SimCLR) on the
  dataset itself (ldm.metrics.contrastive) — for unlabeled data, offline;
- `InceptionFeatures`: the 2048-d pool features of the TF FID Inception v3, from a local weights
  file.

`fid.extractor=auto` picks the classifier for labeled data and the contrastive network otherwise.
Only Inception features give scores comparable with published FIDs; the others track a run.

Features are extracted once per image batch and fed to both metrics (their `feature` module is a
float64 pass-through), so FID and KID see identical features and extraction is not run twice.
Real features are computed once per (dataset, split, extractor weights) and cached on disk.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ldm.data.sources import tensor_fingerprint
from ldm.metrics.classifier import FeatureClassifier
from ldm.metrics.contrastive import ContrastiveEncoder, get_or_train_contrastive
from ldm.metrics.prdc import PRDC, PRDC_KEYS
from ldm.metrics.train_classifier import (
    get_or_train_classifier,
    iter_image_batches,
    save_json,
    save_tensors,
)
from ldm.utils.cache_lock import cache_lock
from ldm.utils.checkpoint import file_sha256, read_torch_file
from ldm.utils.distributed import is_distributed
from ldm.utils.errors import UserError

EXTRACTORS = ("auto", "classifier", "contrastive", "inception")
# The TF FID Inception weights as ported by pytorch-fid (first) and torch-fidelity (second);
# same keys.
INCEPTION_FILE_NAMES = (
    "pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth",
)
INCEPTION_SIZE = 299


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, channels, H, W): grey is repeated to RGB, RGB is averaged to grey."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1 and c == 3:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(
        f"images with {c} channels cannot feed a {channels}-channel feature extractor; "
        f"valid: 1, 3, {channels}"
    )


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (B, C, H, W) to (B, C, size, size)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class _FrozenExtractor(nn.Module):
    """Base of the feature extractors: always in eval mode, no gradients, float32 features."""

    num_features: int
    cache_key: str  # names the extractor and its exact weights in cache file names

    def train(self, mode: bool = True) -> _FrozenExtractor:
        return super().train(False)  # BatchNorm must keep its running statistics


class ClassifierFeatures(_FrozenExtractor):
    """Penultimate-layer features (B, feature_dim) of a FeatureClassifier, for images in [0, 1]."""

    def __init__(self, classifier: FeatureClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.feature_dim
        weights = [t.float() for t in classifier.state_dict().values()]
        self.cache_key = f"classifier-{tensor_fingerprint(*weights)}"

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size/channels -> the classifier's (B, C, S, S) input in [-1, 1]."""
        x = match_channels(x.float(), self.classifier.in_channels)
        return resize(x, self.classifier.image_size) * 2.0 - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self.prepare(x))  # (B, feature_dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.prepare(x))  # (B, num_classes)


class ContrastiveFeatures(_FrozenExtractor):
    """Pooled trunk features (B, feature_dim) of a self-supervised ContrastiveEncoder, for images
    in [0, 1]."""

    def __init__(self, encoder: ContrastiveEncoder):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.num_features = encoder.feature_dim
        weights = [t.float() for t in encoder.state_dict().values()]
        self.cache_key = f"contrastive-{tensor_fingerprint(*weights)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = match_channels(x.float(), self.encoder.in_channels)
        return self.encoder.features(resize(x, self.encoder.input_size) * 2.0 - 1.0)


def resolve_extractor(name: str, labeled: bool) -> str:
    """`auto` -> `classifier` for labeled data, `contrastive` otherwise; other names as they are."""
    if name not in EXTRACTORS:
        raise UserError(f"fid.extractor={name!r} is not one of {list(EXTRACTORS)}")
    if name == "auto":
        return "classifier" if labeled else "contrastive"
    return name


# ---- Inception (TF FID variant) -----------------------------------------------------------------
# The FID Inception differs from torchvision's in its pooling branches: TF's average pool ignores
# the zero padding (count_include_pad=False), and the last block (Mixed_7c) max-pools.


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _inception_blocks():
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    class FIDInceptionA(InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))]

    class FIDInceptionC(InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            b7d = self.branch7x7dbl_1(x)
            for conv in (
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ):
                b7d = conv(b7d)
            return [self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))]

    class FIDInceptionE(InceptionE):
        max_pool = False  # True for Mixed_7c

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
            return [self.branch1x1(x), b3, b3d, self.branch_pool(pooled)]

    return FIDInceptionA, FIDInceptionC, FIDInceptionE


def fid_inception_v3() -> nn.Module:
    """The TF FID Inception v3 architecture (1008 classes, no aux head), randomly initialised.

    Its state_dict keys match the FID weight files in INCEPTION_FILE_NAMES.
    """
    from torchvision.models.inception import (
        BasicConv2d,
        Inception3,
        InceptionAux,
        InceptionB,
        InceptionD,
    )

    block_a, block_c, block_e = _inception_blocks()
    blocks = [BasicConv2d, block_a, InceptionB, block_c, InceptionD, block_e, InceptionAux]
    net = Inception3(
        num_classes=1008,
        aux_logits=False,
        transform_input=False,
        inception_blocks=blocks,
        init_weights=False,
    )
    net.Mixed_7c.max_pool = True
    return net


def inception_weight_candidates(weights_path: str | Path | None) -> list[Path]:
    """Where the weights are looked for: the given file (or the known names in a given folder), else
    the torch hub cache ($TORCH_HOME/hub/checkpoints), where pytorch-fid / torch-fidelity put
    them."""
    if weights_path:
        path = Path(weights_path).expanduser()
        return [path / name for name in INCEPTION_FILE_NAMES] if path.is_dir() else [path]
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [hub / name for name in INCEPTION_FILE_NAMES]


def find_inception_weights(weights_path: str | Path | None = None) -> Path:
    """The FID Inception weights file, or a one-line UserError naming the file and where it was
    looked for."""
    candidates = inception_weight_candidates(weights_path)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"FID Inception weights not found: need {INCEPTION_FILE_NAMES[0]} "
        f"(pytorch-fid's port of the TF FID Inception; torch-fidelity's {INCEPTION_FILE_NAMES[1]} "
        f"also works); looked in: {', '.join(str(p) for p in candidates)}; "
        "put the file there or pass fid.inception_weights=PATH "
        "(sample.py: metrics.inception_weights=PATH)"
    )


class InceptionFeatures(_FrozenExtractor):
    """2048-d final-pool features of the TF FID Inception v3, loaded from a local file (never
    downloaded).

    Preprocessing as pytorch-fid: [0, 1] images resized bilinearly to 299x299 and scaled to [-1, 1]
    (torch-fidelity's TF1-exact resize differs slightly, so scores agree to a small tolerance).
    """

    num_features = 2048

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        path = find_inception_weights(weights_path)
        self.net = fid_inception_v3()
        self.net.load_state_dict(read_torch_file(path, what="FID Inception weights"))
        self.net.eval().requires_grad_(False)
        self.weights_path = path
        self.cache_key = f"inception-{file_sha256(path)[:16]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(match_channels(x.float(), 3), INCEPTION_SIZE) * 2.0 - 1.0  # (B, 3, 299, 299)
        net = self.net
        for layer in (
            net.Conv2d_1a_3x3,
            net.Conv2d_2a_3x3,
            net.Conv2d_2b_3x3,
            net.maxpool1,
            net.Conv2d_3b_1x1,
            net.Conv2d_4a_3x3,
            net.maxpool2,
            net.Mixed_5b,
            net.Mixed_5c,
            net.Mixed_5d,
            net.Mixed_6a,
            net.Mixed_6b,
            net.Mixed_6c,
            net.Mixed_6d,
            net.Mixed_6e,
            net.Mixed_7a,
            net.Mixed_7b,
            net.Mixed_7c,
        ):
            x = layer(x)
        return net.avgpool(x).flatten(1)  # (B, 2048, 8, 8) -> (B, 2048)


# ---- metrics ------------------------------------------------------------------------------------


class _Float64Features(nn.Module):
    """The `feature` module given to torchmetrics: inputs are already features; cast to float64 so
    both metrics accumulate and compute in float64 (FID also returns float64)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for a module without tensors)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class SampleMetrics(nn.Module):
    """FID, KID, precision/recall/density/coverage (k-NN with `nearest_k`) and (for labeled data)
    CAS of generated images against cached real features.

    Usage: `set_real_features(feats)` once, `update(images, labels)` per generated batch (images in
    [-1, 1]), `compute()`, `reset()` (keeps the reals). Under torch.distributed each rank updates
    with its own share of samples and `compute()` syncs them (torchmetrics); the real features are
    held by rank 0 only so the sync counts them once. With `sync_on_compute=False` every rank
    computes alone (used for the reference scores that every rank computes identically).
    `transform`, if given, is applied to every image passed to `update()` (audio: the round trip
    mel -> waveform -> mel, ldm.audio.frontend.RoundTrip).
    """

    def __init__(
        self,
        extractor: nn.Module,
        classifier: ClassifierFeatures | None = None,
        num_classes: int | None = None,
        kid_subsets: int = 20,
        kid_subset_size: int = 1000,
        seed: int = 0,
        sync_on_compute: bool = True,
        nearest_k: int = 3,
        transform: nn.Module | None = None,
    ):
        super().__init__()
        if kid_subset_size < 2:
            raise ValueError(f"kid_subset_size={kid_subset_size} must be >= 2")
        self.extractor, self.classifier, self.transform = extractor, classifier, transform
        self.num_features = int(extractor.num_features)
        self.kid_subset_size, self.seed, self.sync_on_compute = (
            kid_subset_size,
            seed,
            sync_on_compute,
        )
        kw = {"reset_real_features": False, "normalize": True, "sync_on_compute": sync_on_compute}
        self.fid = FrechetInceptionDistance(feature=_Float64Features(self.num_features), **kw)
        with warnings.catch_warnings():  # storing all features is intended (we cap N ourselves)
            warnings.filterwarnings(
                "ignore", message="Metric `Kernel Inception Distance` will save"
            )
            self.kid = KernelInceptionDistance(
                feature=_Float64Features(self.num_features),
                subsets=kid_subsets,
                subset_size=kid_subset_size,
                **kw,
            )
        self.fid.set_dtype(torch.float64)
        self.kid.set_dtype(torch.float64)
        self.prdc = PRDC(nearest_k, seed=seed, sync_on_compute=sync_on_compute)
        self.cas = None
        if classifier is not None and num_classes is not None:
            self.cas = MulticlassAccuracy(
                num_classes=num_classes, average="micro", sync_on_compute=sync_on_compute
            )
        self.num_real = 0
        self.register_buffer("num_fake", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.num_fake.device

    def unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (the data convention) -> [0, 1] floats on this module's device."""
        return ((images.to(self.device).float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def set_real_features(self, features: torch.Tensor) -> None:
        """Load the real features (N, d) (on rank 0 only when distributed); clears everything."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"real features of shape {tuple(features.shape)}; expected (N, {self.num_features})"
            )
        self.fid.reset_real_features = self.kid.reset_real_features = True
        self.reset()
        self.fid.reset_real_features = self.kid.reset_real_features = False
        self.num_real = len(features)
        features = features.to(self.device)
        self.prdc.set_real_features(features)  # every rank holds all reals; only fakes are synced
        if self.sync_on_compute and is_distributed() and torch.distributed.get_rank() > 0:
            # Empty but 2-D, so torchmetrics' all-gather of the list state lines up with rank 0's.
            self.kid.real_features = [features[:0].double()]
            return
        self.fid.update(features, real=True)
        self.kid.update(features, real=True)

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add generated images (B, C, H, W) in [-1, 1], with the labels they were generated for."""
        if self.transform is not None:  # audio: mel -> waveform -> mel (ldm.audio RoundTrip)
            images = self.transform(images.to(self.device).float())
        x01 = self.unit_range(images)
        feats = self.extractor(x01)  # (B, d)
        self.fid.update(feats, real=False)
        self.kid.update(feats, real=False)
        self.prdc.update(feats)
        self.num_fake += len(feats)
        if self.cas is not None and labels is not None:
            self.cas.update(self.classifier.logits(x01).argmax(1), labels.to(self.device))

    def _global_num_fake(self) -> int:
        n = self.num_fake.clone()
        if self.sync_on_compute and is_distributed():
            torch.distributed.all_reduce(n)
        return int(n)

    @torch.no_grad()
    def compute(self) -> dict[str, float | int]:
        """{"fid", "kid", "kid_std", "precision", "recall", "density", "coverage", "num_samples",
        "num_real"} and "cas" when labels were given (the four k-NN scores are NaN for N <= k)."""
        if self.num_real < 2:
            raise RuntimeError("set_real_features() was not called with at least 2 real images")
        num_fake = self._global_num_fake()
        if num_fake < 2:
            raise RuntimeError(f"FID needs at least 2 generated images, got {num_fake}")
        self.kid.subset_size = min(self.kid_subset_size, self.num_real, num_fake)
        out: dict[str, float | int] = {"fid": float(self.fid.compute())}
        # KID draws random subsets: a fixed seed makes it reproducible and identical on every rank,
        # and the forked RNG leaves the training run's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
        out.update(
            kid=float(kid_mean),
            kid_std=float(kid_std),
            num_samples=num_fake,
            num_real=self.num_real,
        )
        out.update(self.prdc.compute())
        if self.cas is not None and self.cas.update_count > 0:
            out["cas"] = float(self.cas.compute())
        return out

    def reset(self) -> None:
        """Forget the generated images (the real features stay)."""
        self.fid.reset()
        self.kid.reset()
        self.prdc.reset()
        if self.cas is not None:
            self.cas.reset()
        self.num_fake.zero_()


# ---- real features, caching, one-call evaluation ------------------------------------------------


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    source: Dataset | Iterable | torch.Tensor,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Features (N, d) float32 on the CPU of images in [-1, 1]: a tensor, a Dataset or a loader."""
    device = module_device(extractor) if device is None else device
    feats = []
    for images, _ in iter_image_batches(source, batch_size):
        x01 = ((images.to(device).float() + 1.0) / 2.0).clamp(0.0, 1.0)
        feats.append(extractor(x01).float().cpu())
    return torch.cat(feats)


def fid_cache_dir(cache_dir: str | Path, fingerprint: str) -> Path:
    """`<cache_dir>/fid/<dataset fingerprint>/`: the classifier, real features and reference
    scores."""
    return Path(cache_dir) / "fid" / fingerprint


def real_features_path(
    cache_dir: str | Path, fingerprint: str, extractor: nn.Module, split: str = "train"
) -> Path:
    """The cache file of one split's real features for one extractor (shared by training and
    sample.py)."""
    return fid_cache_dir(cache_dir, fingerprint) / f"real_{split}_{extractor.cache_key}.pt"


def cached_real_features(
    extractor: nn.Module,
    dataset: Dataset | Iterable,
    cache_file: Path | None,
    batch_size: int = 500,
) -> torch.Tensor:
    """Real features (N, d), read from `cache_file` if present, else extracted and saved there
    (once: concurrent runs wait for the first, see ldm.utils.cache_lock)."""

    def cached() -> torch.Tensor | None:
        if cache_file is not None and cache_file.is_file():
            payload = read_torch_file(cache_file, what="FID real-features cache")
            if payload.get("extractor") == extractor.cache_key:
                return payload["features"]
        return None

    if cache_file is None:
        return extract_features(extractor, dataset, batch_size)
    feats = cached()
    if feats is not None:
        return feats
    with cache_lock(cache_file, "FID real features"):
        feats = cached()
        if feats is None:
            feats = extract_features(extractor, dataset, batch_size)
            save_tensors(
                {"features": feats, "extractor": extractor.cache_key, "num_images": len(feats)},
                cache_file,
            )
    return feats


def build_extractor(
    name: str,
    datamodule: Any = None,
    cache_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    classifier: dict[str, Any] | None = None,
    verbose: bool = True,
    contrastive: dict[str, Any] | None = None,
) -> tuple[nn.Module, ClassifierFeatures | None]:
    """(FID feature extractor, classifier for CAS or None) for `fid.extractor=<name>`.

    The classifier (trained on demand, cached) is returned whenever the data has labels, so CAS
    is available with every extractor; `auto` resolves by labels (`resolve_extractor`).
    """
    labeled = datamodule is not None and getattr(datamodule, "num_classes", None) is not None
    name = resolve_extractor(name, labeled)
    if name == "classifier" and not labeled:
        raise UserError(
            "fid.extractor=classifier needs a labeled dataset (data.num_classes is null); use "
            "fid=auto (self-supervised features on unlabeled data) or fid=inception with "
            "fid.inception_weights=PATH"
        )
    if (labeled or name == "contrastive") and (datamodule is None or cache_dir is None):
        raise UserError(f"fid.extractor={name} needs the data module and fid.cache_dir")
    clf = None
    if labeled:
        model, _ = get_or_train_classifier(
            datamodule, cache_dir, verbose=verbose, **(classifier or {})
        )
        clf = ClassifierFeatures(model)
    if name == "classifier":
        return clf, clf
    if name == "contrastive":
        encoder, _ = get_or_train_contrastive(
            datamodule, cache_dir, verbose=verbose, **(contrastive or {})
        )
        return ContrastiveFeatures(encoder), clf
    return InceptionFeatures(inception_weights), clf


def evaluation_transform(datamodule: Any) -> nn.Module | None:
    """What generated images pass through before they are judged: for audio data (a data module
    with `modality="audio"` whose source has a mel `frontend`), the round trip mel -> waveform ->
    mel (ldm.audio.frontend.RoundTrip), so FID/KID/CAS judge the sound; None for images."""
    frontend = getattr(getattr(datamodule, "source", None), "frontend", None)
    if getattr(datamodule, "modality", "image") != "audio" or frontend is None:
        return None
    from ldm.audio.frontend import RoundTrip

    return RoundTrip(frontend)


def compute_metrics(
    fake_images: torch.Tensor,
    reals: Dataset | Iterable | torch.Tensor,
    extractor: nn.Module,
    *,
    fake_labels: torch.Tensor | None = None,
    classifier: ClassifierFeatures | None = None,
    real_cache: Path | None = None,
    batch_size: int = 500,
    kid_subsets: int = 20,
    kid_subset_size: int = 1000,
    seed: int = 0,
    nearest_k: int = 3,
    transform: nn.Module | None = None,
) -> dict[str, float | int]:
    """FID, KID, precision/recall/density/coverage (and CAS when `fake_labels` and `classifier`
    are given) of generated images (N, C, H, W) in [-1, 1] against real images (a Dataset, a
    loader or a tensor in [-1, 1]).

    Single process; returns the scores with `num_samples` (N) and `num_real`. `transform`: see
    SampleMetrics (audio: generated clips judged after the waveform round trip).
    """
    num_classes = classifier.classifier.num_classes if classifier is not None else None
    metrics = SampleMetrics(
        extractor,
        classifier,
        num_classes,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
        sync_on_compute=False,
        nearest_k=nearest_k,
        transform=transform,
    )
    metrics.to(module_device(extractor))
    metrics.set_real_features(cached_real_features(extractor, reals, real_cache, batch_size))
    for i in range(0, len(fake_images), batch_size):
        labels = fake_labels[i : i + batch_size] if fake_labels is not None else None
        metrics.update(fake_images[i : i + batch_size], labels)
    return metrics.compute()


def reference_scores(
    metrics: SampleMetrics,
    reference_images: torch.Tensor | Dataset | Iterable,
    num_noise: int,
    image_shape: tuple[int, int, int],
    cache_file: Path | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> dict[str, float | int]:
    """Scores that make a FID readable, against the reals loaded in `metrics`:

    - real floor: held-out real images (the val split) scored as if generated (FID, KID and
      precision/recall/density/coverage: what a perfect generator of that many images would get);
    - noise ceiling: `num_noise` images of standard Gaussian noise clipped to [-1, 1].
    Cached as JSON in `cache_file`, reused while the settings (extractor weights, Ns, KID
    settings, seed) match. `metrics` is reset afterwards.
    """
    settings = {
        "extractor": metrics.extractor.cache_key,
        "num_real": metrics.num_real,
        "noise_num_samples": num_noise,
        "kid_subsets": metrics.kid.subsets,
        "kid_subset_size": metrics.kid_subset_size,
        "seed": seed,
        "nearest_k": metrics.prdc.nearest_k,
    }
    if metrics.transform is not None:  # the references pass through it like generated images
        settings["transform"] = metrics.transform.cache_key

    def cached() -> dict[str, float | int] | None:
        if cache_file is not None and cache_file.is_file():
            stored = json.loads(cache_file.read_text())
            if stored.get("settings") == settings:
                return stored["scores"]
        return None

    scores = cached()
    if scores is not None:
        return scores
    if cache_file is None:
        return _reference_scores(
            metrics, reference_images, num_noise, image_shape, batch_size, seed
        )
    with cache_lock(cache_file, "FID reference scores"):
        scores = cached()
        if scores is None:
            scores = _reference_scores(
                metrics, reference_images, num_noise, image_shape, batch_size, seed
            )
            save_json({"settings": settings, "scores": scores}, cache_file)
    return scores


def _reference_scores(
    metrics: SampleMetrics,
    reference_images: torch.Tensor | Dataset | Iterable,
    num_noise: int,
    image_shape: tuple[int, int, int],
    batch_size: int,
    seed: int,
) -> dict[str, float | int]:
    metrics.reset()
    for images, _ in iter_image_batches(reference_images, batch_size):
        metrics.update(images)
    floor = metrics.compute()
    metrics.reset()
    generator = torch.Generator().manual_seed(seed)
    for i in range(0, num_noise, batch_size):
        n = min(batch_size, num_noise - i)
        metrics.update(
            torch.randn((n, *image_shape), generator=generator).clamp(-1.0, 1.0)
        )  # (n, C, H, W)
    ceiling = metrics.compute()
    metrics.reset()
    scores = {
        "fid_real_floor": floor["fid"],
        "kid_real_floor": floor["kid"],
        "real_floor_num_samples": floor["num_samples"],
        "fid_noise_ceiling": ceiling["fid"],
        "kid_noise_ceiling": ceiling["kid"],
        "noise_num_samples": ceiling["num_samples"],
        "num_real": floor["num_real"],
        **{f"{key}_real": floor[key] for key in PRDC_KEYS},  # held-out reals vs train
    }
    return scores
