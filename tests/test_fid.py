"""FID/KID/CAS: the classifier, the metric glue, the Inception path and the FID callback
(offline)."""

from __future__ import annotations

import itertools
import json
import math
import os
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.loggers import CSVLogger
from torchvision.transforms.v2.functional import gaussian_blur

from ldm.callbacks.fid import FIDCallback, rank_share
from ldm.data import ImageDataModule, LatentTensors, MNIST5k, SklearnDigits
from ldm.metrics.fid import (
    INCEPTION_FILE_NAMES,
    ClassifierFeatures,
    InceptionFeatures,
    SampleMetrics,
    build_extractor,
    compute_metrics,
    extract_features,
    fid_inception_v3,
    reference_scores,
)
from ldm.metrics.train_classifier import (
    collect_images,
    get_or_train_classifier,
    main,
    train_classifier,
)
from ldm.utils.errors import UserError

TINY_CLASSIFIER = {"epochs": 2, "widths": [8, 16], "feature_dim": 64}


def make_dm(source, **kw) -> ImageDataModule:
    args = dict(
        name="t", image_size=32, num_channels=1, num_classes=10, batch_size=16, val_fraction=0.1
    )
    args.update(kw)
    dm = ImageDataModule(source, **args)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def mnist():
    """MNIST-5k train/val tensors in [-1, 1] with labels."""
    dm = make_dm(MNIST5k(image_size=32))
    return (*collect_images(dm.train_dataset), *collect_images(dm.val_dataset))


@pytest.fixture(scope="session")
def tiny_extractor(mnist) -> ClassifierFeatures:
    """A classifier trained on MNIST-5k in a tiny budget (2 epochs of a narrow net, a few
    seconds)."""
    train_x, train_y, val_x, val_y = mnist
    model, summary = train_classifier(train_x, train_y, val_x, val_y, 10, **TINY_CLASSIFIER)
    assert summary["test_accuracy"] > 0.9  # features good enough for the tests below
    return ClassifierFeatures(model)


@pytest.fixture(scope="session")
def real_features(mnist, tiny_extractor) -> torch.Tensor:
    return extract_features(tiny_extractor, mnist[0])


def metrics_for(extractor, real_features, classifier=None, **kw) -> SampleMetrics:
    metrics = SampleMetrics(
        extractor, classifier, 10 if classifier is not None else None, sync_on_compute=False, **kw
    )
    metrics.set_real_features(real_features)
    return metrics


def score(metrics: SampleMetrics, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    metrics.reset()
    for i in range(0, len(images), 250):
        metrics.update(images[i : i + 250], None if labels is None else labels[i : i + 250])
    return metrics.compute()


# ---- FID / KID -----------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(
    mnist, tiny_extractor, real_features
):
    train_x = mnist[0]
    metrics = metrics_for(tiny_extractor, real_features)
    same = score(metrics, train_x)
    assert same["num_samples"] == same["num_real"] == len(train_x) == 4500
    assert abs(same["fid"]) < 1e-3
    # FID is accumulated and computed in float64.
    assert metrics.fid.compute().dtype == torch.float64
    noise = torch.randn(1000, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noisy = score(metrics, noise)
    val = score(metrics, mnist[2])
    assert noisy["fid"] > 50 * max(val["fid"], 1.0)
    assert noisy["kid"] > 50 * max(val["kid"], 1e-3)
    assert abs(same["kid"]) < 0.02 * noisy["kid"]


def degrade_levels():
    """(name, transform) pairs of increasing damage, applied to images in [-1, 1]."""
    gen = torch.Generator().manual_seed(0)
    blur = [lambda x, s=s: gaussian_blur(x, kernel_size=9, sigma=s) for s in (0.6, 1.0, 1.6, 2.5)]
    noise = [
        lambda x, s=s: (x + s * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        for s in (0.1, 0.25, 0.5, 1.0)
    ]
    return {"blur": blur, "noise": noise}


@pytest.mark.parametrize("kind", ["blur", "noise"])
def test_fid_and_kid_grow_monotonically_with_damage(kind, mnist, tiny_extractor, real_features):
    val_x = mnist[2]
    metrics = metrics_for(tiny_extractor, real_features)
    scores = [score(metrics, val_x)] + [score(metrics, f(val_x)) for f in degrade_levels()[kind]]
    fids = [s["fid"] for s in scores]
    kids = [s["kid"] for s in scores]
    assert all(a < b for a, b in itertools.pairwise(fids)), fids
    assert all(a < b for a, b in itertools.pairwise(kids)), kids
    assert fids[-1] > 5 * fids[0]


def test_cas_is_high_for_true_labels_and_low_for_shuffled(mnist, tiny_extractor, real_features):
    val_x, val_y = mnist[2], mnist[3]
    metrics = metrics_for(tiny_extractor, real_features, classifier=tiny_extractor)
    assert score(metrics, val_x, val_y)["cas"] > 0.9
    shuffled = val_y[torch.randperm(len(val_y), generator=torch.Generator().manual_seed(0))]
    assert score(metrics, val_x, shuffled)["cas"] < 0.25
    # Without labels there is no CAS.
    assert "cas" not in score(metrics, val_x)


def test_precision_recall_separate_fidelity_from_diversity(mnist, tiny_extractor, real_features):
    """On classifier features: held-out digits score high on all four (seen: 0.92, 0.89, 1.00,
    0.85); 10 digits repeated 50 times are real-looking (precision) but cover little (recall 0,
    coverage 0.06); noise is neither."""
    val_x = mnist[2]
    metrics = metrics_for(tiny_extractor, real_features)
    held_out = score(metrics, val_x)
    assert held_out["precision"] > 0.8 and held_out["recall"] > 0.8, held_out
    assert held_out["coverage"] > 0.6 and 0.6 < held_out["density"] < 1.5, held_out
    collapsed = score(metrics, val_x[:10].repeat(50, 1, 1, 1))
    assert collapsed["precision"] > 0.8, collapsed
    assert collapsed["recall"] < 0.1 and collapsed["coverage"] < 0.1, collapsed
    noise = torch.randn(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noisy = score(metrics, noise)
    # Noise features bunch up, partly inside a few wide real balls around odd digits: precision
    # (0.65 here) is fooled by real outliers, density and coverage are not (Naeem et al.'s point).
    assert noisy["density"] < 0.4 and noisy["recall"] < 0.05 and noisy["coverage"] < 0.05, noisy


def test_compute_metrics_caches_real_features(tmp_path, mnist, tiny_extractor):
    train_x, _, val_x, val_y = mnist
    cache = tmp_path / "real.pt"
    first = compute_metrics(
        val_x,
        train_x[:2000],
        tiny_extractor,
        fake_labels=val_y,
        classifier=tiny_extractor,
        real_cache=cache,
    )
    assert cache.is_file() and first["num_real"] == 2000 and first["num_samples"] == 500
    assert first["cas"] > 0.9 and first["fid"] > 0
    # Second call reads the cache: the (empty) real source is never touched.
    second = compute_metrics(val_x, [], tiny_extractor, real_cache=cache)
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-12)
    assert second["kid"] == pytest.approx(first["kid"], rel=1e-12)


def test_reference_scores_floor_below_ceiling_and_cached(
    tmp_path, mnist, tiny_extractor, real_features
):
    metrics = metrics_for(tiny_extractor, real_features)
    cache = tmp_path / "reference.json"
    ref = reference_scores(metrics, mnist[2], 300, (1, 32, 32), cache)
    assert (
        ref["real_floor_num_samples"] == 500
        and ref["noise_num_samples"] == 300
        and ref["num_real"] == 4500
    )
    assert 0 < ref["fid_real_floor"] < ref["fid_noise_ceiling"] / 50
    assert ref["precision_real"] > 0.8 and ref["recall_real"] > 0.8 and ref["coverage_real"] > 0.6
    stored = json.loads(cache.read_text())
    assert stored["scores"] == ref and stored["settings"]["extractor"] == tiny_extractor.cache_key
    assert reference_scores(metrics, [], 300, (1, 32, 32), cache) == ref  # from the cache


def test_extractors_accept_rgb_and_other_sizes(tiny_extractor):
    x = torch.rand(4, 3, 48, 48)
    grey = x.mean(1, keepdim=True)
    assert torch.allclose(tiny_extractor(x), tiny_extractor(grey), atol=1e-5)
    assert tiny_extractor(x).shape == (4, 64)
    with pytest.raises(ValueError, match="2 channels"):
        tiny_extractor(torch.rand(1, 2, 32, 32))


def test_bad_inputs_name_the_bad_value():
    with pytest.raises(
        ValueError, match=r"fid.extractor='vgg'.*'classifier', 'contrastive', 'inception'"
    ):
        build_extractor("vgg")
    with pytest.raises(ValueError, match="every_n_epochs=-1"):
        FIDCallback(every_n_epochs=-1)
    with pytest.raises(ValueError, match="sampler_steps=0"):
        FIDCallback(sampler_steps=0)
    unlabeled = ImageDataModule(
        SklearnDigits(32), name="d", image_size=32, num_channels=1, num_classes=None
    )
    with pytest.raises(ValueError, match="needs a labeled dataset"):
        get_or_train_classifier(unlabeled, "unused")


# ---- the classifier: training and caching --------------------------------------------------------


def test_get_or_train_classifier_trains_once_and_caches(tmp_path, capsys):
    dm = make_dm(SklearnDigits(image_size=32))
    model, summary = get_or_train_classifier(dm, tmp_path, **TINY_CLASSIFIER)
    out = capsys.readouterr().out
    assert "test accuracy" in out and "trained" in out
    assert summary["test_accuracy"] > 0.85 and summary["num_test"] == len(dm.val_dataset)
    folder = tmp_path / "fid" / dm.fingerprint()
    (weights,) = folder.glob("classifier_*.pt")
    stored = json.loads(weights.with_suffix(".json").read_text())
    assert stored["test_accuracy"] == summary["test_accuracy"] and stored["training"]["epochs"] == 2

    again, _ = get_or_train_classifier(dm, tmp_path, **TINY_CLASSIFIER)
    assert "loaded" in capsys.readouterr().out
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # Other settings are another classifier (a debug run's one-epoch net is never reused).
    get_or_train_classifier(dm, tmp_path, **{**TINY_CLASSIFIER, "epochs": 1})
    assert len(list(folder.glob("classifier_*.pt"))) == 2
    with pytest.raises(ValueError, match="unknown classifier settings"):
        get_or_train_classifier(dm, tmp_path, epoch=1)


def test_classifier_training_leaves_global_rng_alone():
    x, y = torch.rand(64, 1, 16, 16) * 2 - 1, torch.arange(64) % 2
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(x, y, x, y, 2, epochs=1, batch_size=32, widths=(4, 4), feature_dim=8)
    assert torch.equal(torch.rand(3), expected)


def test_train_classifier_cli_composes_the_train_config(tmp_path, capsys):
    summary = main(["data=digits", "fid.classifier.epochs=1", f"paths.cache_dir={tmp_path}"])
    assert "test accuracy" in capsys.readouterr().out
    assert summary["training"]["epochs"] == 1 and summary["dataset"].startswith("digits-32-")
    assert list((tmp_path / "fid" / summary["dataset"]).glob("classifier_*.json"))


@pytest.mark.slow
def test_default_classifier_reaches_97_percent_on_mnist5k(mnist):
    train_x, train_y, val_x, val_y = mnist
    _, summary = train_classifier(train_x, train_y, val_x, val_y, 10)
    assert summary["test_accuracy"] >= 0.97, summary


# ---- Inception -----------------------------------------------------------------------------------


def test_inception_without_weights_says_which_file_and_where(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError) as err:
        InceptionFeatures(missing)
    message = str(err.value)
    assert "\n" not in message and INCEPTION_FILE_NAMES[0] in message and str(missing) in message
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UserError) as err:
        InceptionFeatures()
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE_NAMES[0]
    assert str(hub_file) in str(err.value) and "fid.inception_weights=PATH" in str(err.value)


@pytest.mark.slow
def test_inception_features_from_a_local_weights_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = fid_inception_v3()
    # The keys are torchvision's Inception3 keys (1008 classes, no aux head), as in the FID weight
    # files.
    from torchvision.models import Inception3

    reference = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    assert set(net.state_dict()) == set(reference.state_dict())
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(net.state_dict(), hub / INCEPTION_FILE_NAMES[0])

    extractor = InceptionFeatures(hub / INCEPTION_FILE_NAMES[0])
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    feats = extract_features(extractor, images)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # found in the hub cache when no path is given
    assert InceptionFeatures().weights_path == hub / INCEPTION_FILE_NAMES[0]
    scores = compute_metrics(images.flip(-1), images, extractor, kid_subset_size=3)
    assert math.isfinite(scores["fid"]) and scores["num_samples"] == 3


# ---- distributed sync ----------------------------------------------------------------------------


class FlattenFeatures(nn.Module):
    """Deterministic stand-in extractor: the pixels are the features."""

    num_features = 16
    cache_key = "flatten"

    def forward(self, x):
        return x.flatten(1)

    def logits(self, x):
        return x.flatten(1)[:, :4]


def _ddp_worker(rank, world_size, init_file, real, fake, labels, out_dir):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        extractor = FlattenFeatures()
        metrics = SampleMetrics(extractor, extractor, 4, kid_subset_size=1000)
        metrics.set_real_features(extract_features(extractor, real))
        share = list(rank_share(len(fake), rank, world_size))
        metrics.update(fake[share], labels[share])
        torch.save(metrics.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_share_samples_and_agree_with_one_process(tmp_path):
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(30, 1, 4, 4, generator=gen) * 2 - 1
    fake = torch.rand(25, 1, 4, 4, generator=gen) * 1.6 - 0.9
    labels = torch.randint(0, 4, (25,), generator=gen)
    # spawn, not fork: a forked child deadlocks in OpenMP when the parent process (the test
    # session) has already run multi-threaded torch ops.
    torch.multiprocessing.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), real, fake, labels, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    extractor = FlattenFeatures()
    single = SampleMetrics(extractor, extractor, 4, sync_on_compute=False)
    single.set_real_features(extract_features(extractor, real))
    single.update(fake, labels)
    expected = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["num_samples"] == 25 and got["num_real"] == 30
        for key in ("fid", "kid", "cas", "precision", "recall", "density", "coverage"):
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


# ---- the callback --------------------------------------------------------------------------------


class BankGenerator(pl.LightningModule):
    """Stands in for LatentDiffusion: `sample()` returns held-out real images of the requested
    classes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = 10):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.num_classes = num_classes
        self.images, self.labels = images, labels
        self.calls: list[torch.Tensor | None] = []
        self.samplers: list = []
        self.weights_seen: list[float] = []

    def configured_sampler(self, **overrides):
        return {"sampler": "configured", **overrides}

    def training_step(self, batch, batch_idx):
        return (batch["image"].mean() - self.weight) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (batch["image"].mean() - self.weight) ** 2)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.last_raw_weight = float(self.weight.detach())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(
        self, num_samples, class_labels=None, guidance_scale=1.0, generator=None, sampler=None, **kw
    ):
        self.calls.append(None if class_labels is None else class_labels.cpu())
        self.samplers.append(sampler)
        self.weights_seen.append(float(self.weight.detach()))
        if class_labels is None:
            idx = torch.randint(len(self.images), (num_samples,), generator=generator)
            return self.images[idx]
        picks = []
        for label in class_labels.tolist():
            pool = torch.nonzero(self.labels == label).flatten()
            picks.append(pool[torch.randint(len(pool), (1,), generator=generator)])
        return self.images[torch.cat(picks)]  # (N, C, H, W) in [-1, 1]


def fit(callbacks, model: BankGenerator, dm, tmp_path, max_epochs: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    return trainer


def test_callback_logs_fid_kid_cas_and_references(tmp_path):
    dm = make_dm(SklearnDigits(image_size=32))
    val_x, val_y = collect_images(dm.val_dataset)
    model = BankGenerator(val_x, val_y)
    callback = FIDCallback(
        num_samples=60,
        batch_size=25,
        every_n_epochs=1,
        cache_dir=tmp_path / "cache",
        classifier=TINY_CLASSIFIER,
        progress_bar=False,
    )
    trainer = fit([callback], model, dm, tmp_path)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert m["val/fid_num_samples"] == 60 and m["ref/fid_noise_ceiling_num_samples"] == 60
    assert m["ref/fid_real_floor_num_samples"] == len(dm.val_dataset)
    # Real images drawn as "samples" score near the real floor, far below the noise ceiling.
    assert 0 < m["val/fid"] < m["ref/fid_noise_ceiling"] / 10
    assert 0 < m["ref/fid_real_floor"] < m["ref/fid_noise_ceiling"] / 10
    assert m["val/cas"] > 0.8 and math.isfinite(m["val/kid"])
    # Precision/recall/density/coverage beside them, and what held-out reals score on them.
    for key in ("precision", "recall", "density", "coverage"):
        assert 0.2 < m[f"val/{key}"] < 1.5 and 0.2 < m[f"ref/{key}_real"] < 1.5, key
    # Batches of 25, labels spread evenly over the 10 classes.
    assert [len(c) for c in model.calls] == [25, 25, 10] and model.samplers == [None] * 3
    assert torch.bincount(torch.cat(model.calls), minlength=10).tolist() == [6] * 10
    # The CSV logger got val/fid; the caches hold the classifier, the real features, the references.
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = [r.split(",")[header.index("val/fid")] for r in rows[1:]]
    assert any(v and float(v) == pytest.approx(m["val/fid"]) for v in values)
    cache = tmp_path / "cache" / "fid" / dm.fingerprint()
    assert {p.name.split("_")[0] for p in cache.iterdir()} >= {"classifier", "real", "reference"}


def test_callback_schedule_unconditional_and_disabled(tmp_path):
    dm = make_dm(SklearnDigits(image_size=32))
    val_x, val_y = collect_images(dm.val_dataset)
    model = BankGenerator(val_x, val_y, num_classes=None)
    callback = FIDCallback(
        num_samples=20,
        batch_size=20,
        every_n_epochs=2,
        cache_dir=tmp_path / "cache",
        classifier=TINY_CLASSIFIER,
        progress_bar=False,
        log_reference=False,
        sampler_steps=7,
    )
    trainer = fit([callback], model, dm, tmp_path, max_epochs=3)
    # Epoch 2 (every 2nd) and epoch 3 (the last); unconditional: no labels, no CAS.
    assert model.calls == [None, None]
    assert model.samplers == [{"sampler": "configured", "steps": 7}] * 2
    assert "val/fid" in trainer.callback_metrics and "val/cas" not in trainer.callback_metrics
    assert "ref/fid_real_floor" not in trainer.callback_metrics

    model = BankGenerator(val_x, val_y)
    off = FIDCallback(every_n_epochs=0, cache_dir=tmp_path / "off")
    trainer = fit([off], model, dm, tmp_path / "second")
    assert model.calls == [] and "val/fid" not in trainer.callback_metrics
    assert not (tmp_path / "off").exists()


def test_callback_samples_with_ema_weights_and_checks_the_order(tmp_path):
    dm = make_dm(SklearnDigits(image_size=32))
    val_x, val_y = collect_images(dm.val_dataset)
    model = BankGenerator(val_x, val_y)
    fid = FIDCallback(
        num_samples=10,
        batch_size=10,
        every_n_epochs=1,
        cache_dir=tmp_path / "cache",
        classifier=TINY_CLASSIFIER,
        progress_bar=False,
        log_reference=False,
    )
    ema = WeightAveraging()
    trainer = fit([fid, ema], model, dm, tmp_path, max_epochs=2)
    # FID sampled with the averaged weight (copied into the model at the end of training), not with
    # the raw weight SGD reached at the last step.
    assert model.weights_seen[-1] == pytest.approx(float(model.weight.detach()))
    assert abs(model.weights_seen[-1] - model.last_raw_weight) > 1e-3
    assert "val/fid" in trainer.callback_metrics
    with pytest.raises(UserError, match="before FIDCallback"):
        fit([WeightAveraging(), fid], BankGenerator(val_x, val_y), dm, tmp_path / "wrong")


def test_callback_refuses_a_latents_data_module(tmp_path):
    latents = tmp_path / "latents.pt"
    torch.save({"latents": torch.randn(40, 2, 8, 8), "labels": torch.arange(40) % 10}, latents)
    dm = make_dm(LatentTensors(str(latents), num_classes=10), image_size=32, num_channels=2)
    with pytest.raises(UserError, match=r"serves \['label', 'latent'\].*image_datamodule"):
        FIDCallback(datamodule=dm).image_datamodule(trainer=None)
    # A latents module that names its images is followed to them.
    images = make_dm(SklearnDigits(image_size=32))
    dm.image_datamodule = images
    assert FIDCallback().image_datamodule(SimpleNamespace(datamodule=dm)) is images
