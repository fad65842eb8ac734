"""Image-to-image models: concat channel bookkeeping, the condition reaches the UNet, SDEdit on a
LatentDiffusion, evaluation tables and grids."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from ldm.data.degradations import Inpainting, SuperResolution
from ldm.metrics.img2img import evaluate_img2img, format_table, psnr, ssim
from ldm.modules.unet import UNet
from tests.conftest import compose_config

TINY = [
    "data=digits",
    "data.image_size=16",
    "data.batch_size=8",
    "model/diffusion=tiny",
    "model.autoencoder.encoder.ch=8",
    "model.autoencoder.encoder.mid_attention=false",
    "schedule.num_timesteps=100",
    "schedule.beta_end=0.2",
    "sampler=ddim",
    "sampler.steps=4",
]


def tiny_unet(concat_channels=0) -> UNet:
    torch.manual_seed(0)
    return UNet(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=[1],
        num_res_blocks=1,
        attention_levels=[],
        norm_num_groups=8,
        concat_channels=concat_channels,
    )


def randomize(module: torch.nn.Module) -> None:
    """Zero-initialised output layers would hide every input: give all weights random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize(("concat", "total"), [(0, 0), (1, 1), ([4, 1], 5)])
def test_unet_channel_bookkeeping(concat, total):
    unet = tiny_unet(concat)
    assert unet.concat_channels == total
    assert unet.conv_in.in_channels == 4 + total  # latent + condition
    assert unet.conv_out.out_channels == 4  # predicts the latent only
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    c = torch.randn(2, total, 8, 8) if total else None
    assert unet(x, t, concat=c).shape == (2, 4, 8, 8)


def test_unet_concat_errors():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    with pytest.raises(ValueError, match="concat_channels=5"):
        tiny_unet([4, 1])(x, t)  # condition missing
    with pytest.raises(ValueError, match=r"shape \(2, 5, 8, 8\).*got concat=\(2, 5, 4, 4\)"):
        tiny_unet(5)(x, t, concat=torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="takes no concatenated condition"):
        tiny_unet(0)(x, t, concat=torch.randn(2, 1, 8, 8))


def test_condition_reaches_the_unet():
    """The output depends on the condition; zeroing the condition's input weights removes that."""
    unet = tiny_unet(1).eval()
    randomize(unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    c1, c2 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    assert not torch.allclose(unet(x, t, concat=c1), unet(x, t, concat=c2))
    with torch.no_grad():
        unet.conv_in.weight[:, 4:] = 0  # the condition's path into the network
    assert torch.equal(unet(x, t, concat=c1), unet(x, t, concat=c2))


def test_psnr_and_ssim_of_identical_and_different_images():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.all(psnr(x, x) >= 99) and torch.allclose(ssim(x, x), torch.ones(3))
    y = x + 0.2
    assert psnr(x, y).mean().item() == pytest.approx(20.0, abs=0.01)  # mse 0.01 in [0, 1]
    assert ssim(x, torch.rand(3, 1, 16, 16)).mean() < 0.5


def test_format_table_lists_rows_and_metrics():
    table = format_table(
        {
            "task": "superres",
            "num_samples": 4,
            "rows": {"bicubic": {"psnr": 20.0, "fid": 30.0}, "ours": {"psnr": 18.5, "fid": 10.0}},
        }
    )
    assert "| | psnr | fid |" in table and "| bicubic | 20 | 30 |" in table
    assert "on 4 validation" in table


# -- with a LatentDiffusion ----------------------------------------------------------------------


def build_model(tmp_path: Path, task: str, *overrides: str):
    cfg = compose_config([*TINY, f"task={task}", *overrides], tmp_path)
    torch.manual_seed(0)
    autoencoder = hydra.utils.instantiate(cfg.model.autoencoder)
    module_cfg = OmegaConf.to_container(cfg.model.diffusion, resolve=True)
    module_cfg.pop("latent_cache")
    model = hydra.utils.instantiate(module_cfg, autoencoder=autoencoder)
    return cfg, model


def val_items(task, n=4, size=16):
    """Validation-like items: digits-like images plus the task's inputs."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    degrade = SuperResolution(factor=4) if task == "superres" else Inpainting()
    items = []
    for i in range(n):
        item = {"image": images[i], "label": torch.tensor(i % 10)}
        item.update(degrade(images[i], torch.Generator().manual_seed(i)))
        items.append(item)
    return items


@pytest.mark.parametrize(("task", "channels"), [("superres", 1), ("inpaint", 5)])
def test_task_configs_build_matching_unet_and_conditioner(tmp_path, task, channels):
    model = build_model(tmp_path, task)[1]
    assert model.unet.concat_channels == model.conditioner.concat_channels == channels
    assert model.unet.conv_in.in_channels == 4 + channels
    assert model.unet.num_classes is None
    # the autoencoder is held by reference, not registered twice
    assert not any(k.startswith("conditioner.") for k in model.state_dict())


def test_mismatched_concat_channels_is_an_error(tmp_path):
    cfg = compose_config(
        [*TINY, "task=inpaint", "task.concat_channels=[4]"], tmp_path
    )  # the mask channel forgotten
    autoencoder = hydra.utils.instantiate(cfg.model.autoencoder)
    module_cfg = OmegaConf.to_container(cfg.model.diffusion, resolve=True)
    module_cfg.pop("latent_cache")
    with pytest.raises(InstantiationException, match="concatenates 5 channels"):
        hydra.utils.instantiate(module_cfg, autoencoder=autoencoder)


@pytest.mark.parametrize("task", ["superres", "inpaint"])
def test_batch_inputs_reach_the_unet_in_training(tmp_path, task):
    model = build_model(tmp_path, task)[1]
    items = val_items(task)
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    seen = {}
    forward = model.unet.forward

    def spy(x, t, **kw):
        seen.update(kw)
        return forward(x, t, **kw)

    model.unet.forward = spy
    model.fixed_noise_loss(batch, 0)
    concat = seen["concat"]
    assert concat.shape == (4, model.conditioner.concat_channels, 4, 4)
    if task == "superres":  # the 4x4 low-res image is exactly the 4x4 latent grid
        assert torch.equal(concat, batch["lowres"])
    else:  # last channel: the fraction of each latent cell to fill
        expected = torch.nn.functional.avg_pool2d(batch["mask"], 4)
        assert torch.allclose(concat[:, -1:], expected)


@pytest.mark.parametrize("task", ["superres", "inpaint"])
def test_evaluation_table_and_grid(tmp_path, task):
    model = build_model(tmp_path, task)[1]
    model.eval()
    result = evaluate_img2img(model, val_items(task), num_samples=3, batch_size=2, grid_items=2)
    rows = result["rows"]
    baseline = "bicubic" if task == "superres" else "masked input"
    assert set(rows) >= {baseline, "ours"} and result["num_samples"] == 3
    assert {"psnr", "ssim"} <= set(rows["ours"])
    columns = 4 if task == "superres" else 3
    assert result["grid"].shape[-1] == columns * 18 + 2  # 16 px tiles, 2 px padding
    if task == "inpaint":
        assert rows["ours"]["known_err"] == 0.0  # pasted: the known pixels are the originals
        assert rows["ours (before paste)"]["known_err"] > 0.0


def test_sdedit_small_strength_returns_the_autoencoded_input(tmp_path):
    cfg = compose_config(TINY, tmp_path)
    torch.manual_seed(0)
    autoencoder = hydra.utils.instantiate(cfg.model.autoencoder)
    module_cfg = OmegaConf.to_container(cfg.model.diffusion, resolve=True)
    module_cfg.pop("latent_cache")
    model = hydra.utils.instantiate(module_cfg, autoencoder=autoencoder).eval()
    randomize(model.unet)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    out = model.sample(3, init_images=x, strength=0.01, generator=g)  # < 1 / steps: no step
    assert torch.equal(out, model.decode(model.encode(x)))
    edited = model.sample(3, init_images=x, strength=0.75, generator=g, class_labels=[1, 2, 3])
    assert edited.shape == x.shape and not torch.allclose(edited, out)
    guided = model.sample(
        3, init_images=x, strength=0.75, generator=torch.Generator().manual_seed(0),
        class_labels=[1, 2, 3], guidance_scale=3.0,
    )  # fmt: skip
    assert guided.shape == x.shape
    with pytest.raises(ValueError, match="strength"):
        model.sample(3, init_images=x, strength=1.5)
    with pytest.raises(ValueError, match="init_images"):
        model.sample(2, init_images=x, strength=0.5)


class _Context(torch.nn.Module):
    """A stand-in text conditioner: one learned token per label, null row for dropped rows."""

    input_key, context_dim = "label", 8

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(11, 8)

    def forward(self, batch, drop=None):
        labels = batch["label"]
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, 10), labels)
        return {
            "context": self.table(labels)[:, None],
            "context_mask": torch.ones(len(labels), 1).bool(),
        }

    def check_conditions(self, batch):
        pass


def test_hybrid_is_concat_plus_cross_attention(tmp_path):
    """hybrid: the UNet takes both the concatenated image and the context; drop reaches the
    context only (guidance keeps the image and nulls the text)."""
    from ldm.modules.image_conditioning import HybridConditioner, LowResConditioner

    class _AE:
        downsample_factor, latent_channels = 4, 4

    hybrid = HybridConditioner(
        concat=lambda autoencoder: LowResConditioner(autoencoder, 1, 32), context=_Context(),
        autoencoder=_AE(),
    )  # fmt: skip
    assert hybrid.concat_channels == 1 and hybrid.context_dim == 8
    assert hybrid.input_key == "lowres" and hybrid.context_key == "label"  # the image is required
    batch = {"label": torch.tensor([1, 2]), "lowres": torch.rand(2, 1, 8, 8)}
    out = hybrid(batch, drop=torch.tensor([True, False]))
    assert set(out) == {"concat", "context", "context_mask"}
    assert torch.equal(out["concat"], batch["lowres"])  # never dropped
    assert torch.equal(out["context"][0], hybrid.context.table.weight[10:11])  # null token
    unet = UNet(4, 4, 32, [1, 2], 1, [1], norm_num_groups=8, concat_channels=1, context_dim=8)
    pred = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), **out)
    assert pred.shape == (2, 4, 8, 8)


def test_hybrid_config_tells_an_inpainting_model_the_class(tmp_path):
    """conditioning=hybrid: the masked image is concatenated and the label reaches the class
    embedding; without a label (or when dropped) the null class; the same weights layout plus the
    class embedding; evaluation scores the model with and without the label."""
    model = build_model(tmp_path, "inpaint", "conditioning=hybrid")[1]
    assert model.unet.concat_channels == 5 and model.unet.num_classes == 10
    assert model.takes_labels and not model.takes_prompts
    assert model.hparams.cond_drop_prob == 0.1
    assert not any(k.startswith("conditioner.") for k in model.state_dict())
    items = val_items("inpaint")
    batch = {k: torch.stack([item[k] for item in items]) for k in ("masked_image", "mask", "label")}
    told = model.condition(batch)
    assert torch.equal(told["class_labels"], batch["label"]) and told["concat"].shape[1] == 5
    dropped = model.condition(batch, drop=torch.tensor([True, False, True, False]))
    assert dropped["class_labels"].tolist() == [10, 1, 10, 3]
    torch.testing.assert_close(dropped["concat"], told["concat"])  # the image is never dropped
    unlabeled = model.condition({k: batch[k] for k in ("masked_image", "mask")})
    assert unlabeled["class_labels"].tolist() == [10] * 4  # no label given: the null class
    randomize(model.unet)
    model.eval()
    inputs = {k: batch[k] for k in ("masked_image", "mask")}
    outs = [
        model.sample(4, class_labels=c, inputs=inputs, generator=torch.Generator().manual_seed(0))
        for c in (None, [1, 1, 1, 1], [2, 2, 2, 2])
    ]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    result = evaluate_img2img(model, items, num_samples=4, batch_size=2, grid_items=2)
    rows = {"masked input", "ours", "ours without label", "ours (before paste)"}
    assert set(result["rows"]) == rows
    assert result["grid"].shape[-1] == 4 * 18 + 2  # masked | ours | ours without label | original
