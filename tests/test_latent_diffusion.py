"""LatentDiffusion (stage 2) on tiny configs: training lowers the loss, the autoencoder stays
frozen, label dropout, latent cache == on-the-fly encoding, sampling, checkpoint round trip, EMA
resume."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.callbacks.checkpoint_config import StoreConfigInCheckpoint
from ldm.callbacks.ema import ema_decay_at, get_ema_warmup_multi_avg_fn
from ldm.data.latent_cache import build_latent_cache, latent_cache_datamodule, latent_cache_key
from ldm.diffusion.samplers import build_sampler
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.unet import UNet
from ldm.utils.errors import UserError
from ldm.utils.validation import validate_config
from tests.conftest import compose_config, quiet_trainer

# Digits at 16x16, f=4 KL autoencoder with 4 latent channels -> 4x4x4 latents; T=100, 4-step DDIM.
TINY = [
    "data=digits",
    "data.image_size=16",
    "data.batch_size=16",
    "model/diffusion=tiny",
    "model.autoencoder.encoder.ch=8",
    "model.autoencoder.encoder.mid_attention=false",
    "schedule.num_timesteps=100",
    "sampler=ddim",
    "sampler.steps=4",
]

# The EMA callback entry of conf/callbacks (diffusion stage), with a test-sized decay.
# A lerp-based EMA keeps constant tensors bit-exact: EMAWeightAveraging's avg_fn,
# decay * e + (1 - decay) * w, drifts the frozen autoencoder weights by float rounding.
# use_buffers=false: buffers (schedule, scale_factor) are copied, not averaged.
EMA_YAML = """
_target_: pytorch_lightning.callbacks.WeightAveraging
use_buffers: false
multi_avg_fn:
  _target_: ldm.callbacks.ema.get_ema_warmup_multi_avg_fn
  decay: 0.9
"""


def tiny_cfg(tmp_path: Path, *overrides: str):
    return compose_config([*TINY, *overrides], tmp_path)


def make_autoencoder(cfg, seed: int = 0, scale_factor: float = 0.7):
    torch.manual_seed(seed)
    ae = hydra.utils.instantiate(cfg.model.autoencoder)
    ae.scale_factor.fill_(scale_factor)  # != 1 so that scaling mistakes show
    return ae


def make_model(cfg, autoencoder, seed: int = 0, randomize: bool = False) -> LatentDiffusion:
    """The module exactly as ldm.train builds it: model/diffusion minus `latent_cache`."""
    module_cfg = OmegaConf.to_container(cfg.model.diffusion, resolve=True)
    module_cfg.pop("latent_cache")
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(module_cfg, autoencoder=autoencoder)
    if randomize:  # the zero-initialised output conv would hide every conditioning effect
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def image_batch(cfg, n: int = 16) -> dict[str, torch.Tensor]:
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    items = [dm.train_dataset[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def fixed_draw(model: LatentDiffusion, batch, seed: int = 0):
    """(x0, t, noise) at a fixed seed (independent of the module's own RNG use)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = model.batch_latents(batch)
        t = torch.randint(0, model.schedule.num_timesteps, (x0.shape[0],), generator=g)
        return x0, t, torch.randn(x0.shape, generator=g)


def fixed_loss(model: LatentDiffusion, batch, seed: int = 0) -> float:
    """Loss at fixed noise and t."""
    x0, t, noise = fixed_draw(model, batch, seed)
    with torch.no_grad():
        return model.diffusion_loss(x0, t, noise, model.condition(batch)).item()


def zero_output_loss(model: LatentDiffusion, batch, seed: int = 0) -> float:
    """What fixed_loss is for a UNet that outputs 0: the weighted mean square of the target."""
    x0, t, noise = fixed_draw(model, batch, seed)
    hp, schedule = model.hparams, model.schedule
    weight = schedule.loss_weight(t, hp.loss_weighting, hp.min_snr_gamma)  # (B,)
    target = schedule.training_target(x0, noise, t)  # (B, c, h, w)
    return (weight * target.pow(2).mean(dim=(1, 2, 3))).mean().item()


def same_batch_loader(batch, n: int) -> DataLoader:
    return DataLoader([batch] * n, batch_size=None)


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "size, lo, hi",
    [("tiny", 5_000, 100_000), ("small", 1_000_000, 5_000_000), ("base", 5_000_000, 50_000_000)],
)
def test_size_configs_instantiate(size, lo, hi, tmp_path):
    cfg = compose_config([f"model/diffusion={size}"], tmp_path)  # MNIST-5k 32x32, KL f=4
    assert cfg.model.diffusion.latent_cache is (size == "small")  # run key; the CPU default caches
    model = make_model(cfg, make_autoencoder(cfg))
    assert isinstance(model.unet, UNet) and model.num_classes == 10
    assert model.latent_shape == (4, 8, 8)
    assert model.schedule.prediction_type == cfg.schedule.prediction_type
    assert lo < sum(p.numel() for p in model.unet.parameters()) < hi
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.unet.parameters()
    }


def test_bad_settings_raise(tmp_path):
    cfg = tiny_cfg(tmp_path)
    ae = make_autoencoder(cfg)
    parts = dict(
        unet=hydra.utils.instantiate(cfg.model.diffusion.unet),
        autoencoder=ae,
        schedule=hydra.utils.instantiate(cfg.schedule),
        sampler=hydra.utils.instantiate(cfg.sampler),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        image_size=16,
    )
    assert LatentDiffusion(**parts).latent_shape == (4, 4, 4)
    wrong_unet = UNet(3, 3, 8, [1, 2], 1, [1], 2, norm_num_groups=4)
    with pytest.raises(ValueError, match="in_channels=3 but the autoencoder has latent_channels=4"):
        LatentDiffusion(**{**parts, "unet": wrong_unet})
    with pytest.raises(ValueError, match="loss_weighting='snr'"):
        LatentDiffusion(**parts, loss_weighting="snr")
    with pytest.raises(ValueError, match="image_size=18 is not divisible"):
        LatentDiffusion(**{**parts, "image_size": 18})
    with pytest.raises(ValueError, match="cond_drop_prob"):
        LatentDiffusion(**parts, cond_drop_prob=1.5)
    pooled_unet = UNet(4, 4, 8, [1, 2], 1, [1], 2, norm_num_groups=4, num_classes=10, pooled_dim=3)
    with pytest.raises(ValueError, match=r"pooled vector of width None but .*pooled_dim=3"):
        LatentDiffusion(**{**parts, "unet": pooled_unet})


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny conditional model trained 30 steps on one fixed batch."""
    tmp_path = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg(tmp_path, "model.diffusion.optimizer.lr=3e-3")
    model = make_model(cfg, make_autoencoder(cfg))
    batch = image_batch(cfg)
    ae_before = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    loss_before = fixed_loss(model, batch)
    zero_output = zero_output_loss(model, batch)
    quiet_trainer(tmp_path, max_steps=30).fit(model, train_dataloaders=same_batch_loader(batch, 30))
    return dict(
        model=model,
        batch=batch,
        ae_before=ae_before,
        unet_before=unet_before,
        loss_before=loss_before,
        zero_output=zero_output,
        loss_after=fixed_loss(model, batch),
    )


def test_training_steps_lower_the_loss(trained):
    # The UNet's output conv starts at zero, so the first loss is exactly the weighted mean square
    # of the target (eps or v, about 1 each), and training must lower it clearly.
    assert trained["loss_before"] == pytest.approx(trained["zero_output"], rel=1e-5)
    assert 0.5 < trained["loss_before"] < 1.2
    assert trained["loss_after"] < 0.75 * trained["loss_before"]
    changed = [
        k
        for k, v in trained["model"].unet.state_dict().items()
        if not torch.equal(v, trained["unet_before"][k])
    ]
    assert changed


def test_autoencoder_stays_frozen(trained):
    model = trained["model"]
    after = model.autoencoder.state_dict()
    assert after.keys() == trained["ae_before"].keys()
    assert all(torch.equal(after[k], trained["ae_before"][k]) for k in after)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    model.train()  # what Lightning calls at every fit/validation switch
    assert model.unet.training and not model.autoencoder.training
    assert not any(m.training for m in model.autoencoder.modules())


def test_loss_is_min_snr_weighted_v_regression(tmp_path):
    """v-prediction with min-SNR-5 weights, written out by hand (Salimans & Ho 2022; Hang et al.
    2023)."""
    cfg = tiny_cfg(tmp_path, "schedule.prediction_type=v", "model.diffusion.loss_weighting=min_snr")
    model = make_model(cfg, make_autoencoder(cfg), randomize=True)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t, labels = torch.tensor([0, 5, 20, 50, 80, 99]), torch.tensor([0, 1, 2, 3, 4, 10])
    abar = model.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    snr = abar.flatten() / (1 - abar.flatten())
    weight = snr.clamp(max=5.0) / (snr + 1)
    with torch.no_grad():
        mse = (model.unet(x_t, t, labels) - v).pow(2).mean(dim=(1, 2, 3))
        loss = model.diffusion_loss(x0, t, noise, {"class_labels": labels})
    assert torch.allclose(loss, (weight * mse).mean(), rtol=1e-5)
    assert not torch.allclose(loss, mse.mean(), rtol=1e-2)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_cond_drop_prob_one_ignores_the_label(tmp_path):
    cfg = tiny_cfg(tmp_path)
    batch = image_batch(cfg, 8)
    other = {**batch, "label": (batch["label"] + 3) % 10}
    seen = []

    def run(cond_drop_prob: float, b) -> torch.Tensor:
        model = make_model(
            tiny_cfg(tmp_path, f"model.diffusion.cond_drop_prob={cond_drop_prob}"),
            make_autoencoder(cfg),
            randomize=True,
        )
        model.unet.register_forward_hook(
            lambda m, args, kwargs, out: seen.append(
                (kwargs["class_labels"].clone(), out.detach())
            ),
            with_kwargs=True,
        )
        return model.training_step(b, batch_idx=5).detach()

    assert torch.equal(run(1.0, batch), run(1.0, other))
    assert torch.equal(seen[0][0], torch.full((8,), 10)) and torch.equal(
        seen[1][0], torch.full((8,), 10)
    )
    assert torch.equal(seen[0][1], seen[1][1])  # identical UNet outputs: the label never reached it
    assert not torch.allclose(
        run(0.0, batch), run(0.0, other)
    )  # ... while without dropout it matters


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_training_noise_depends_on_epoch_batch_and_seed_only(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = make_model(cfg, make_autoencoder(cfg), randomize=True)
    batch = image_batch(cfg, 8)
    a = model.training_step(batch, batch_idx=3)
    torch.randn(100)  # global RNG use in between must not matter
    b = model.training_step(batch, batch_idx=3)
    c = model.training_step(batch, batch_idx=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_validation_logs_loss_and_grid_and_is_repeatable(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = make_model(cfg, make_autoencoder(cfg), randomize=True)
    dm = hydra.utils.instantiate(cfg.data)
    t = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2, limit_test_batches=2
    )
    t.fit(model, datamodule=dm)
    assert "train/loss" in t.callback_metrics and "val/loss" in t.callback_metrics
    grids = sorted((tmp_path / "images").glob("val_samples_*.png"))
    assert [p.name for p in grids] == ["val_samples_0000002.png"]
    first = t.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    second = t.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    assert first == second
    assert t.test(model, datamodule=dm, verbose=False)[0]["test/loss"] == first  # test = val split


# ------------------------------------------------------------------------------ latent cache


def test_latent_cache_gives_the_same_batches_as_encoding(tmp_path):
    cfg = tiny_cfg(tmp_path)
    ae = make_autoencoder(cfg)
    model = make_model(cfg, ae)
    ckpt = tmp_path / "stage1.ckpt"
    torch.save(ae.state_dict(), ckpt)
    images_dm = hydra.utils.instantiate(cfg.data)
    latents_dm = latent_cache_datamodule(ae, ckpt, images_dm, tmp_path / "cache")
    latents_dm.setup()
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1 and files[0].stem == latent_cache_key(
        ckpt, "full", images_dm.fingerprint()
    )
    payload = torch.load(files[0], weights_only=True)
    assert payload["latents"].shape == (len(images_dm.full_dataset), 4, 4, 4)
    assert payload["latents"].dtype == torch.float32 and payload["labels"].dtype == torch.long

    for loader in ("train_dataloader", "val_dataloader"):
        torch.manual_seed(0)
        image_batches = list(getattr(images_dm, loader)())[:2]
        torch.manual_seed(0)
        latent_batches = list(getattr(latents_dm, loader)())[:2]
        for ib, lb in zip(image_batches, latent_batches):
            assert torch.equal(ib["label"], lb["label"])
            assert torch.allclose(model.batch_latents(ib), model.batch_latents(lb), atol=1e-5)


def test_latent_cache_is_reused_and_rebuilt_for_a_new_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    ae = make_autoencoder(cfg)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    loader = DataLoader(torch.utils.data.Subset(dm.full_dataset, range(100)), batch_size=50)
    calls = []
    original = ae.encode
    monkeypatch.setattr(ae, "encode", lambda x: calls.append(len(x)) or original(x))
    ckpt = tmp_path / "stage1.ckpt"
    torch.save(ae.state_dict(), ckpt)
    first = build_latent_cache(
        ae, loader, tmp_path, latent_cache_key(ckpt, "full", dm.fingerprint())
    )
    n_calls = len(calls)
    assert sum(calls) == 100
    again = build_latent_cache(
        ae, loader, tmp_path, latent_cache_key(ckpt, "full", dm.fingerprint())
    )
    assert again == first and len(calls) == n_calls  # reused, not re-encoded
    with torch.no_grad():
        ae.decoder.conv_out.bias.add_(1.0)  # "retrained" stage 1: a new checkpoint file
    torch.save(ae.state_dict(), ckpt)
    rebuilt = build_latent_cache(
        ae, loader, tmp_path, latent_cache_key(ckpt, "full", dm.fingerprint())
    )
    assert rebuilt != first and rebuilt.is_file() and len(calls) == 2 * n_calls


# ------------------------------------------------------------------------------ sampling


def test_sample_shape_range_and_reproducibility(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = make_model(cfg, make_autoencoder(cfg), randomize=True).eval()
    labels = torch.tensor([0, 1, 2, 3, 9, 9])

    def draw(seed, **kw):
        return model.sample(
            6, class_labels=labels, generator=torch.Generator().manual_seed(seed), **kw
        )

    a = draw(1, guidance_scale=3.0)
    assert a.shape == (6, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, draw(1, guidance_scale=3.0))
    assert not torch.allclose(a, draw(2, guidance_scale=3.0))
    assert not torch.allclose(a, draw(1, guidance_scale=1.0))
    # explicit sampler object and the null class (no labels) work too
    ddpm = build_sampler("ddpm", model.schedule, steps=3)
    b = model.sample(2, generator=torch.Generator().manual_seed(0), sampler=ddpm)
    assert b.shape == (2, 1, 16, 16)
    seen = []
    model.sample(2, class_labels=4, callback=lambda i, t, x, x0: seen.append((i, t, x.shape)))
    assert [(i, t) for i, t, _ in seen] == [(0, 99), (1, 74), (2, 49), (3, 24)]
    assert seen[0][2] == (2, 4, 4, 4)


def test_guidance_options_come_from_the_model_config_and_sample_overrides(tmp_path):
    """model.diffusion.guidance_interval / guidance_rescale are sample()'s defaults (off in every
    shipped config); sample() arguments override them; bad values fail at construction."""
    labels = torch.tensor([0, 1, 2, 3])

    def draw(model, **kw):
        kw = {"guidance_scale": 3.0, **kw}
        return model.sample(
            4, class_labels=labels, generator=torch.Generator().manual_seed(1), **kw
        )

    cfg = tiny_cfg(tmp_path)
    assert cfg.model.diffusion.guidance_interval is None
    assert cfg.model.diffusion.guidance_rescale == 0.0
    ae = make_autoencoder(cfg)
    plain_model = make_model(cfg, ae, randomize=True).eval()
    plain = draw(plain_model)
    never = [1e9, None]  # above every step's sigma: no step is guided
    unguided = draw(plain_model, guidance_scale=1.0)
    assert torch.equal(draw(plain_model, guidance_interval=never), unguided)
    assert not torch.equal(draw(plain_model, guidance_rescale=0.7), plain)

    cfg = tiny_cfg(tmp_path, f"model.diffusion.guidance_interval=[{never[0]},null]")
    limited = make_model(cfg, ae, randomize=True).eval()
    assert limited.hparams.guidance_interval == never
    assert torch.equal(draw(limited), unguided)
    assert torch.equal(draw(limited, guidance_interval=[None, None]), plain)  # override: all steps
    cfg = tiny_cfg(tmp_path, "model.diffusion.guidance_rescale=0.7")
    rescaled = make_model(cfg, ae, randomize=True).eval()
    assert torch.equal(draw(rescaled), draw(plain_model, guidance_rescale=0.7))
    assert torch.equal(draw(rescaled, guidance_rescale=0.0), plain)
    for bad, match in (
        ("guidance_rescale=2.0", r"guidance_rescale=2.0 must be in \[0, 1\]"),
        ("guidance_interval=[3.0,1.0]", "guidance_interval=.* sigma_lo < sigma_hi"),
    ):
        bad_cfg = tiny_cfg(tmp_path, f"model.diffusion.{bad}")
        with pytest.raises(UserError, match=f"^model.diffusion.{match}"):  # before stage 1
            validate_config(bad_cfg)
        with pytest.raises(Exception, match=match):
            make_model(bad_cfg, ae)
    with pytest.raises(UserError, match=r"^fid.guidance_interval=\[1.0\] must be"):
        validate_config(tiny_cfg(tmp_path, "fid.guidance_interval=[1.0]"))


def test_sample_rejects_bad_labels(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = make_model(cfg, make_autoencoder(cfg))
    with pytest.raises(ValueError, match="class label 10 is outside"):
        model.sample(2, class_labels=torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="guidance_scale"):
        model.sample(2, guidance_scale=2.0)
    uncond = make_model(
        tiny_cfg(tmp_path, "model.diffusion.unet.num_classes=null"), make_autoencoder(cfg)
    )
    assert uncond.sample(1).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(2, class_labels=1)


def test_checkpoint_alone_reloads_and_samples_identically(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = make_model(cfg, make_autoencoder(cfg))
    batch = image_batch(cfg)
    resolved = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }  # as ldm.train stores it
    t = quiet_trainer(
        tmp_path, max_steps=5, callbacks=[StoreConfigInCheckpoint("diffusion", resolved)]
    )
    t.fit(model, train_dataloaders=same_batch_loader(batch, 5))
    path = tmp_path / "stage2.ckpt"
    t.save_checkpoint(path)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    assert ckpt["hyper_parameters"]["image_size"] == 16
    fresh = make_model(cfg, make_autoencoder(cfg, seed=1, scale_factor=1.0), seed=1)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert fresh.autoencoder.scale_factor.item() == pytest.approx(0.7)
    model.eval()
    fresh.eval()
    kw = dict(class_labels=torch.tensor([3, 5, 7]), guidance_scale=2.0)
    expected = model.sample(3, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(fresh.sample(3, generator=torch.Generator().manual_seed(0), **kw), expected)

    from ldm.models.loading import load_latent_diffusion

    loaded, _ = load_latent_diffusion(path)
    assert torch.equal(loaded.sample(3, generator=torch.Generator().manual_seed(0), **kw), expected)


# ------------------------------------------------------------------------------ EMA


def ema_callback():
    return hydra.utils.instantiate(OmegaConf.create(EMA_YAML))


def _module_with(w: torch.Tensor) -> torch.nn.Module:
    m = torch.nn.Linear(1, w.numel(), bias=False)
    with torch.no_grad():
        m.weight.copy_(w.view(-1, 1))
    return m


def run_ema(weights: list[torch.Tensor], **kwargs) -> torch.Tensor:
    """The EMA of a sequence of weights as WeightAveraging computes it (AveragedModel)."""
    averaged = torch.optim.swa_utils.AveragedModel(
        _module_with(weights[0]), multi_avg_fn=get_ema_warmup_multi_avg_fn(**kwargs)
    )
    for w in weights:
        averaged.update_parameters(_module_with(w))
    return averaged.module.weight.detach().view(-1)


@pytest.mark.parametrize("gamma", [8.0, 2.0])
def test_ema_warmup_matches_the_closed_form_recursion(gamma):
    """e_1 = w_1, e_n = d_n e_{n-1} + (1 - d_n) w_n with d_n = min(decay, (1 + n') /
    (gamma + 2 + n')) for the n' = n - 1-th update (gamma 8: LitEma / diffusers EMAModel)."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, generator=g, dtype=torch.float64).float() for _ in range(40)]
    expected = weights[0].double()
    for n, w in enumerate(weights[1:], start=1):
        d = min(0.95, (1 + n) / (gamma + 2 + n))
        expected = d * expected + (1 - d) * w.double()
    got = run_ema(weights, decay=0.95, gamma=gamma).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (
        float(ema_decay_at(8990, 0.999)) == pytest.approx(0.999)
        and float(ema_decay_at(100, 0.999)) < 0.92
    )


@pytest.mark.parametrize("gamma", [8.0, 3.0, 1.0])
def test_ema_gamma_weighs_step_k_as_k_to_the_gamma(gamma):
    """Before `decay` caps it, the warm-up EMA is a power-function average (Karras et al. 2024):
    of weights w_k = k, k = 0..N, it returns the mean of k under density ~k^gamma on [0, N],
    N (gamma + 1) / (gamma + 2): 0.9 N for LitEma's gamma 8, 2/3 N for gamma 1."""
    n = 2000
    weights = [torch.full((1,), float(k)) for k in range(n + 1)]
    got = float(run_ema(weights, decay=1.0, gamma=gamma))
    assert got / n == pytest.approx((gamma + 1) / (gamma + 2), abs=0.005)
    with pytest.raises(ValueError, match="gamma must be >= 0, got -1"):
        get_ema_warmup_multi_avg_fn(gamma=-1.0)


def test_ema_without_warmup_equals_torchs_ema():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(7, generator=g) for _ in range(20)]
    reference = torch.optim.swa_utils.AveragedModel(
        _module_with(weights[0]), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    for w in weights:
        reference.update_parameters(_module_with(w))
    assert torch.equal(
        run_ema(weights, decay=0.9, warmup=False), reference.module.weight.detach().view(-1)
    )


def test_ema_warmup_forgets_the_first_weights_of_a_short_run():
    """The default run's 875 stage-2 steps: one step-1 network followed by zeros. Without warm-up
    0.999^874 of it stays in the average; with warm-up the product of d_1..d_874,
    10! 875! / 884!."""
    first, rest = torch.ones(1), [torch.zeros(1)] * 874
    plain = run_ema([first, *rest], decay=0.999, warmup=False).item()
    warm = run_ema([first, *rest], decay=0.999).item()
    assert plain == pytest.approx(0.999**874, rel=1e-4, abs=0) and plain > 0.4
    assert warm == pytest.approx(
        math.factorial(10) * math.factorial(875) / math.factorial(884), rel=1e-4, abs=0
    )
    assert warm < 1e-19


def test_ema_keeps_constant_tensors_bit_exact():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e3
    assert torch.equal(run_ema([w] * 50, decay=0.999), w)


@pytest.mark.slow
def test_ema_resume_is_exact_and_validation_uses_ema(tmp_path):
    """EMAWeightAveraging as configured in EMA_YAML: 4 epochs in one go == 2 epochs, stop, resume
    to 4 (raw weights, EMA weights, optimizer state); validation samples with the EMA weights; the
    frozen autoencoder is bit-identical in both weight sets."""
    cfg = tiny_cfg(tmp_path, "model.diffusion.num_val_samples=2")
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    # Unshuffled: a shuffling DataLoader draws its order from the global RNG, which Lightning
    # does not checkpoint; this test is about the module and the EMA callback.
    train_loader = DataLoader(dm.train_dataset, batch_size=16, shuffle=False)
    val_loader = DataLoader(dm.val_dataset, batch_size=16, shuffle=False)
    ae_state = {k: v.clone() for k, v in make_autoencoder(cfg).state_dict().items()}
    sampled_with = []

    def run(name: str, max_epochs: int, ckpt_path=None):
        model = make_model(cfg, make_autoencoder(cfg))
        original = model.sample
        model.sample = lambda *a, **k: (
            sampled_with.append(model.unet.conv_out.weight.clone()) or original(*a, **k)
        )
        # save_top_k=1 makes last.ckpt be written each epoch. (With save_top_k=0 it is written only
        # in on_train_end, after WeightAveraging copied the EMA into the raw weights:
        # not resumable.)
        ckpt_cb = pl.callbacks.ModelCheckpoint(
            dirpath=tmp_path / name, save_last=True, save_top_k=1
        )
        t = quiet_trainer(
            tmp_path / name,
            max_epochs=max_epochs,
            limit_train_batches=3,
            limit_val_batches=1,
            enable_checkpointing=True,
            callbacks=[ema_callback(), ckpt_cb],
        )
        torch.manual_seed(1234)  # global RNG differs between the runs below; results must not
        t.fit(
            model, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path
        )
        return torch.load(tmp_path / name / "last.ckpt", weights_only=True), model

    straight, _ = run("straight", 4)
    first, _ = run("resumed", 2)
    resumed, model = run("resumed", 4, ckpt_path=tmp_path / "resumed" / "last.ckpt")

    for key in ("state_dict", "current_model_state"):
        assert straight[key].keys() == resumed[key].keys()
        for name in straight[key]:
            assert torch.equal(straight[key][name], resumed[key][name]), (key, name)
    for a, b in zip(
        straight["optimizer_states"][0]["state"].values(),
        resumed["optimizer_states"][0]["state"].values(),
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["global_step"] == resumed["global_step"] == 12

    ema, raw = straight["state_dict"], straight["current_model_state"]
    assert not torch.equal(ema["unet.conv_out.weight"], raw["unet.conv_out.weight"])
    assert torch.equal(
        sampled_with[-1], resumed["state_dict"]["unet.conv_out.weight"]
    )  # val used EMA
    for state in (ema, raw, first["state_dict"], model.state_dict()):
        assert all(torch.equal(state[f"autoencoder.{k}"], v) for k, v in ae_state.items())
