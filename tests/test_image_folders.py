"""Your own images: labels from class subfolders, the preprocessed cache, augmentation, bad inputs,
and FID on unlabeled folders with the self-supervised feature network. The folders are drawn
procedurally in each test (tests/image_folders.py); no photos are shipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data import ImageDataModule, ImageFolder
from ldm.data.folders import Augmented, resolve_folder_labels
from ldm.utils.errors import UserError
from ldm.utils.validation import validate_config
from tests.conftest import compose_config
from tests.image_folders import make_class_folders, make_flat_folder


def folder_dm(source: ImageFolder, num_classes: int | None, **kw) -> ImageDataModule:
    dm = ImageDataModule(
        source,
        "image_folder",
        source.image_size,
        3,
        num_classes,
        batch_size=kw.pop("batch_size", 4),
        val_fraction=kw.pop("val_fraction", 0.25),
        **kw,
    )
    dm.setup()
    return dm


# ---- labels from folders ------------------------------------------------------------------------


def test_labels_from_class_folders(tmp_path):
    root = make_class_folders(
        tmp_path / "data", per_class=5, classes=("stripes", "discs", "squares")
    )
    (root / "notes.txt").write_text("ignored")
    (root / "stripes" / "readme.md").write_text("not an image: ignored")
    (root / "discs" / "nested").mkdir()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(root / "discs" / "nested" / "deep.png")
    (root / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    source = ImageFolder(str(root), 16, labels="folders")
    dataset = source.build()
    assert source.class_names == ["discs", "squares", "stripes"]  # sorted, as torchvision
    assert len(dataset) == 16 and torch.bincount(dataset.labels).tolist() == [6, 5, 5]
    for i, path in enumerate(dataset.paths):
        item = dataset[i]
        assert source.class_names[int(item["label"])] == path.relative_to(root).parts[0]
        assert item["image"].shape == (3, 16, 16)
    dm = folder_dm(source, 3)
    assert dm.class_names == ["discs", "squares", "stripes"]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label"} and batch["label"].dtype == torch.int64
    # Unlabeled stays the default, and the unlabeled fingerprint is the one it always was.
    plain = ImageFolder(str(root), 16)
    assert "label" not in plain.build()[0]
    assert plain.fingerprint(plain.build()).startswith("folder-16-RGB-")
    assert "-c3-" in source.fingerprint(dataset)


def test_config_follows_the_folders_before_stage_1(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=3, classes=("b", "a", "c"))
    base = ["debug=fast", "data=image_folder", f"data.root={root}", "data.image_size=16"]
    cfg = compose_config([*base, "data.labels=folders"], tmp_path)
    resolve_folder_labels(cfg)
    validate_config(cfg)
    assert cfg.data.num_classes == 3 and list(cfg.data.class_names) == ["a", "b", "c"]
    assert cfg.model.diffusion.unet.num_classes == 3  # the UNet interpolates data.num_classes
    assert cfg.fid.extractor == "auto"
    cfg = compose_config([*base, "data.labels=folders", "data.num_classes=5"], tmp_path)
    with pytest.raises(
        UserError, match=r"data.num_classes=5 but .* has 3 class folders \(a, b, c\)"
    ):
        resolve_folder_labels(cfg)
    cfg = compose_config([*base, "data.labels=folder"], tmp_path)
    with pytest.raises(UserError, match=r"data.labels='folder' is not one of none\|folders"):
        resolve_folder_labels(cfg)
    # Unlabeled data with the classifier extractor fails before stage 1, naming fid=auto.
    cfg = compose_config([*base, "fid=classifier"], tmp_path)
    resolve_folder_labels(cfg)
    with pytest.raises(UserError, match=r"classifier needs labeled data, .* use fid=auto"):
        validate_config(cfg)
    cfg = compose_config(base, tmp_path)  # fid=auto: fine without labels
    resolve_folder_labels(cfg)
    validate_config(cfg)
    assert cfg.data.num_classes is None


def test_preset_composes_for_folders(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=2)
    for extra in ([], ["data=image_folder"]):
        cfg = compose_config(
            [*extra, f"data.root={root}", "data.labels=folders", "experiment=folder_64"], tmp_path
        )
        resolve_folder_labels(cfg)
        validate_config(cfg)
        assert cfg.data.image_size == 64 and cfg.data.random_flip and cfg.data.preprocessed_cache
        assert cfg.model.autoencoder.encoder.ch_mult == [1, 2, 2, 4]  # f = 8
        assert cfg.model.diffusion.unet.num_classes == 2
    gpu = compose_config([f"data.root={root}", "experiment=folder_256_gpu"], tmp_path)
    resolve_folder_labels(gpu)
    validate_config(gpu)
    assert gpu.data.image_size == 256


# ---- bad inputs ---------------------------------------------------------------------------------


def test_bad_folder_layouts_are_one_clear_error(tmp_path):
    flat = make_flat_folder(tmp_path / "flat", n=4)
    with pytest.raises(UserError, match=r"data.labels=folders but .* has no subfolders .*4 images"):
        ImageFolder(str(flat), 16, labels="folders").build()
    one = make_class_folders(tmp_path / "one", per_class=2, classes=("discs",))
    with pytest.raises(UserError, match=r"at least 2 class subfolders .* found 1 \('discs'\)"):
        ImageFolder(str(one), 16, labels="folders").build()
    empty = make_class_folders(tmp_path / "empty", per_class=2)
    (empty / "cats").mkdir()
    (empty / "cats" / "notes.txt").write_text("no images")
    with pytest.raises(UserError, match=r"class folder '.*cats' holds no image files"):
        ImageFolder(str(empty), 16, labels="folders").build()
    with pytest.raises(UserError, match=r"is not a directory"):
        ImageFolder(str(tmp_path / "missing"), 16, labels="folders").build()


@pytest.mark.parametrize("skip_corrupt", [False, True])
@pytest.mark.parametrize("cache", [False, True])
def test_class_folder_with_nothing_readable(tmp_path, skip_corrupt, cache):
    root = make_class_folders(tmp_path / "data", per_class=3)
    (root / "broken").mkdir()
    (root / "broken" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "broken" / "b.png").write_bytes(b"")
    source = ImageFolder(
        str(root),
        16,
        labels="folders",
        skip_corrupt=skip_corrupt,
        preprocessed_cache=cache,
        cache_dir=str(tmp_path / "cache"),
    )
    if cache and not skip_corrupt:  # the cache decodes every file: the first broken one is named
        match = r"unreadable image file '.*broken/a\.jpg'"
    else:
        match = r"class folder '.*broken' holds no readable image \(first: unreadable image file"
    with pytest.raises(UserError, match=match):
        source.build()


def test_odd_modes_and_small_images_in_class_folders(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=2)
    ramp = np.linspace(0, 65535, 24 * 24).astype(np.uint16).reshape(24, 24)
    Image.fromarray(ramp).save(root / "discs" / "sixteen.png")  # mode I;16
    pal = Image.fromarray(np.full((24, 24), 2, np.uint8), mode="P")  # every pixel: entry 2, blue
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255] + [0] * 756)
    pal.save(root / "stripes" / "palette.png")
    Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(root / "stripes" / "small.png")
    source = ImageFolder(str(root), 16, labels="folders")
    dataset = source.build()
    items = {p.name: dataset[i] for i, p in enumerate(dataset.paths)}
    sixteen = items["sixteen.png"]["image"]
    assert sixteen.shape == (3, 16, 16) and torch.equal(sixteen[0], sixteen[2])  # gray -> RGB
    assert sixteen.min() < -0.7 and sixteen.max() > 0.7  # rescaled from 16 bits, not clipped
    palette = items["palette.png"]["image"]
    assert palette.shape == (3, 16, 16) and palette[:, 5, 5].tolist() == [-1.0, -1.0, 1.0]
    small = items["small.png"]["image"]
    assert small.shape == (3, 16, 16) and torch.allclose(small, torch.tensor(90 / 255 * 2 - 1))
    strict = ImageFolder(str(root), 16, labels="folders", allow_upscale=False, skip_corrupt=True)
    kept = strict.build()
    assert len(kept) == len(dataset) - 1 and strict.skipped[0][0].name == "small.png"


# ---- preprocessed cache -------------------------------------------------------------------------


def test_preprocessed_cache_gives_the_same_tensors(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "data", per_class=6, size=30, fmt="jpg")
    (root / "discs" / "zero.jpg").write_bytes(b"")
    kw = dict(labels="folders", load_size=20, skip_corrupt=True)
    lazy_source = ImageFolder(str(root), 16, **kw)
    lazy = lazy_source.build()
    cache_dir = tmp_path / "cache"
    source = ImageFolder(str(root), 16, preprocessed_cache=True, cache_dir=str(cache_dir), **kw)
    cached = source.build()
    assert len(cached) == len(lazy) == 12 and source.num_skipped == lazy_source.num_skipped == 1
    assert [p.name for p in cached.paths] == [p.name for p in lazy.paths]
    for i in range(len(lazy)):
        assert torch.equal(cached.pixels(i), lazy.pixels(i))  # (3, 20, 20) uint8
        assert torch.equal(cached[i]["image"], lazy[i]["image"])
        assert torch.equal(cached[i]["label"], lazy[i]["label"])
    assert source.fingerprint(cached) == lazy_source.fingerprint(lazy)
    files = sorted(p.name for p in cache_dir.iterdir() if p.suffix != ".lock")
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".u8")
    assert (cache_dir / files[1]).stat().st_size == 12 * 3 * 20 * 20
    # A second build reads the cache: nothing is decoded.
    from ldm.data.sources import ImageFolderDataset

    expected = lazy[3]["image"]
    monkeypatch.setattr(ImageFolderDataset, "decode", lambda *a: pytest.fail("decoded again"))
    again = ImageFolder(str(root), 16, preprocessed_cache=True, cache_dir=str(cache_dir), **kw)
    assert torch.equal(again.build()[3]["image"], expected) and again.num_skipped == 1
    monkeypatch.undo()
    # A changed file changes the key: a new cache is built.
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "discs" / "0000.jpg")
    ImageFolder(str(root), 16, preprocessed_cache=True, cache_dir=str(cache_dir), **kw).build()
    assert len(list(cache_dir.glob("*.u8"))) == 2
    # Through DataLoader workers (the memmap is reopened in each, not pickled).
    dm = folder_dm(source, 2, num_workers=1)
    assert next(iter(dm.val_dataloader()))["image"].shape == (3, 3, 16, 16)


# ---- augmentation -------------------------------------------------------------------------------


def test_flip_and_random_crop_only_in_training_batches(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=8, size=24)
    source = ImageFolder(str(root), 16, labels="folders", load_size=20)
    dm = folder_dm(source, 2, batch_size=12, random_flip=True, crop="random", val_fraction=0.25)
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (12, 3, 16, 16)
    train = dm.train_dataset  # what FID reads: the un-augmented center crops
    center = torch.stack([train[i]["image"] for i in range(len(train))])
    assert torch.equal(center[0], folder_dm(source, 2).train_dataset[0]["image"])
    aug = Augmented(train, random_flip=True, crop="random")
    torch.manual_seed(1)
    views = [aug[0]["image"] for _ in range(40)]
    full = train.dataset.pixels(train.indices[0])  # (3, 20, 20) uint8

    def view(top: int, left: int, flip: bool) -> torch.Tensor:
        crop = full[:, top : top + 16, left : left + 16].float() / 255 * 2 - 1
        return crop.flip(-1) if flip else crop

    crops = {(t, left, f): view(t, left, f) for t in range(5) for left in range(5) for f in (0, 1)}
    seen = {k for v in views for k, c in crops.items() if torch.allclose(v, c)}
    assert len(seen) > 10 and {k[2] for k in seen} == {0, 1}  # varied crops, both flips
    flip_only = Augmented(train, random_flip=True)
    torch.manual_seed(2)
    outs = [flip_only[0]["image"] for _ in range(20)]
    assert all(torch.equal(o, center[0]) or torch.equal(o, center[0].flip(-1)) for o in outs)
    assert any(not torch.equal(o, center[0]) for o in outs)
    with pytest.raises(UserError, match="crop='middle'"):
        Augmented(train, crop="middle")


def test_augmentation_settings_checked(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=2)
    base = ["debug=fast", "data=image_folder", f"data.root={root}", "data.image_size=16"]
    cfg = compose_config([*base, "data.crop=random"], tmp_path)
    with pytest.raises(
        UserError, match=r"data.crop=random needs data.load_size > .*=16.*load_size=18"
    ):
        validate_config(cfg)
    cfg = compose_config([*base, "data.load_size=8"], tmp_path)
    with pytest.raises(UserError, match=r"data.load_size=8 is smaller than data.image_size=16"):
        validate_config(cfg)
    validate_config(compose_config([*base, "data.crop=random", "data.load_size=18"], tmp_path))
    assert OmegaConf.select(compose_config(["debug=fast"], tmp_path), "data.random_flip") is None


# ---- FID on unlabeled folders -------------------------------------------------------------------


def test_unlabeled_folder_gets_self_supervised_fid_features(tmp_path):
    from ldm.metrics.contrastive import ContrastiveEncoder
    from ldm.metrics.fid import (
        ContrastiveFeatures,
        SampleMetrics,
        build_extractor,
        extract_features,
        reference_scores,
    )

    torch.manual_seed(0)
    root = make_flat_folder(tmp_path / "flat", n=64, size=20)
    dm = folder_dm(ImageFolder(str(root), 16), None, val_fraction=0.25)
    settings = dict(epochs=4, batch_size=32, widths=[8, 16], input_size=16, proj_dim=16)
    extractor, classifier = build_extractor("auto", dm, tmp_path / "cache", contrastive=settings)
    assert isinstance(extractor, ContrastiveFeatures) and classifier is None
    assert isinstance(extractor.encoder, ContrastiveEncoder) and extractor.num_features == 16
    cached = list((tmp_path / "cache" / "fid").glob("*/contrastive_*.json"))
    assert len(cached) == 1
    again, _ = build_extractor("contrastive", dm, tmp_path / "cache", contrastive=settings)
    assert again.cache_key == extractor.cache_key  # loaded from the cache, same weights
    real = extract_features(extractor, dm.train_dataset)
    assert real.shape == (48, 16) and torch.isfinite(real).all()
    # Features are scaled to unit mean variance on the train images.
    assert real.var(dim=0).mean().item() == pytest.approx(1.0, rel=0.05)
    metrics = SampleMetrics(extractor, kid_subset_size=16, sync_on_compute=False)
    metrics.set_real_features(real)
    refs = reference_scores(metrics, dm.val_dataset, 32, (3, 16, 16))
    assert refs["fid_noise_ceiling"] > 5 * refs["fid_real_floor"] > 0
    with pytest.raises(UserError, match=r"fid.extractor=classifier needs a labeled dataset"):
        build_extractor("classifier", dm, tmp_path / "cache")
    with pytest.raises(UserError, match=r"fid.extractor='vgg' is not one of"):
        build_extractor("vgg", dm, tmp_path / "cache")


# ---- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_folders_train_conditional_and_sample_by_class_name(tmp_path):
    """debug=fast on a labeled folder: class names in the checkpoint; sample.py takes a name."""
    from ldm.train import run

    root = make_class_folders(tmp_path / "data", per_class=20, classes=("discs", "stripes"))
    cfg = compose_config(
        [
            "debug=fast",
            "data=image_folder",
            f"data.root={root}",
            "data.labels=folders",
            "data.image_size=16",
            "data.num_workers=0",
            "data.random_flip=true",
            "data.preprocessed_cache=true",
        ],
        tmp_path,
    )
    run(cfg)
    ckpt = torch.load(
        tmp_path / "run" / "checkpoints" / "diffusion" / "last.ckpt",
        map_location="cpu",
        weights_only=True,
    )
    data = ckpt["ldm"]["config"]["data"]
    assert data["class_names"] == ["discs", "stripes"] and data["num_classes"] == 2
    assert ckpt["state_dict"]["unet.class_embed.weight"].shape[0] == 3  # 2 classes + null
    # sample.py takes a class name as well as an index, and records the names in samples.json.
    from ldm.sample import run as sample

    ckpt_path = tmp_path / "run" / "checkpoints" / "diffusion" / "last.ckpt"

    def sample_cfg(label: str, out: str):
        overrides = [f"ckpt={ckpt_path}", f"class_label={label}", "num_samples=4"]
        overrides += ["sampler.steps=2", f"out_dir={tmp_path / out}", "guidance_scale=2"]
        return compose_config(overrides, tmp_path, config_name="sample")

    record = sample(sample_cfg("stripes", "by_name"))
    assert record["labels"] == [1, 1, 1, 1] and record["class_names"] == ["discs", "stripes"]
    saved = json.loads((tmp_path / "by_name" / "samples.json").read_text())
    assert saved["class_names"] == ["discs", "stripes"] and saved["labels"] == [1, 1, 1, 1]
    assert sample(sample_cfg("[discs,1]", "mixed"))["labels"] == [0, 1, 0, 1]
    with pytest.raises(UserError, match=r"class_label='cats' is not one of .*: discs, stripes"):
        sample(sample_cfg("cats", "bad"))
    assert not (tmp_path / "bad").exists()


def test_latent_cache_keeps_random_flip_for_stage_2(tmp_path):
    """With data.random_flip the latent cache also holds the latents of the mirrored images, and
    stage-2 batches take one or the other."""
    import hydra

    from ldm.data.latent_cache import latent_cache_datamodule

    root = make_class_folders(tmp_path / "data", per_class=4, size=16)
    cfg = compose_config(["debug=fast", "data=image_folder", f"data.root={root}"], tmp_path)
    cfg.data.image_size, cfg.data.num_channels = 16, 3
    ae = hydra.utils.instantiate(cfg.model.autoencoder).eval()
    ckpt = tmp_path / "stage1.ckpt"
    torch.save(ae.state_dict(), ckpt)
    source = ImageFolder(str(root), 16, labels="folders")
    images = folder_dm(source, 2, random_flip=True)
    latents = latent_cache_datamodule(ae, ckpt, images, tmp_path / "cache")
    latents.setup()
    full = latents.full_dataset
    assert full.flipped is not None and full.flipped.shape == full.images.shape
    x = torch.stack([images.full_dataset[i]["image"] for i in range(3)])
    with torch.no_grad():
        expected = ae.encode_latents(x.flip(-1))
    assert torch.allclose(full.flipped[:3], expected, atol=1e-5)
    assert not torch.allclose(full.flipped, full.images, atol=1e-3)
    torch.manual_seed(0)
    seen = set()
    for batch in latents.train_dataloader():
        for z in batch["latent"]:
            plain = any(torch.equal(z, full.images[i]) for i in range(len(full.images)))
            mirrored = any(torch.equal(z, full.flipped[i]) for i in range(len(full.images)))
            assert plain or mirrored
            seen.add("plain" if plain else "mirrored")
    assert seen == {"plain", "mirrored"}
    # Without random_flip: no mirrored latents, the cache key of before.
    plain_dm = latent_cache_datamodule(ae, ckpt, folder_dm(source, 2), tmp_path / "cache2")
    plain_dm.setup()
    assert plain_dm.full_dataset.flipped is None and not plain_dm.random_flip
