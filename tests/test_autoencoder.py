"""Stage-1 autoencoders: shapes, training on MNIST-5k, GAN under manual optimization, checkpoints,
scale factor, validation logs, the shipped yaml configs."""

import csv
import functools
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.data import MNIST5k, TensorImageDataset
from ldm.models.autoencoder import KLAutoencoder, VQAutoencoder
from ldm.modules.blocks import num_groups_for
from ldm.modules.discriminator import (
    NLayerDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from ldm.modules.distributions import DiagonalGaussian
from ldm.modules.encoder_decoder import Decoder, Encoder
from ldm.modules.quantizer import VectorQuantizer
from ldm.optim import build_lr_scheduler
from ldm.utils.images import log_image_grid
from tests.conftest import quiet_trainer

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "autoencoder"


@pytest.fixture(scope="module")
def mnist() -> torch.Tensor:
    """384 real MNIST-5k digits (384, 1, 32, 32) in [-1, 1], a seeded shuffle across classes."""
    images = MNIST5k(image_size=32).build().images
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[perm[:384]].clone()


def _loader(images: torch.Tensor, batch_size: int = 32, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorImageDataset(images, None), batch_size=batch_size, shuffle=shuffle)


def _adam(lr: float = 2e-3):
    return lambda params: torch.optim.Adam(params, lr=lr)


def _nets(ch_mult=(1, 2, 2), latent=4, double_z=True, ch=8, attn=True):
    enc = Encoder(1, ch, ch_mult, 1, latent, double_z=double_z, mid_attention=attn)
    dec = Decoder(1, ch, ch_mult, 1, latent, mid_attention=attn)
    return enc, dec


def make_kl(ch_mult=(1, 2, 2), **kw) -> KLAutoencoder:
    enc, dec = _nets(ch_mult)
    return KLAutoencoder(enc, dec, _adam(), latent_channels=4, image_channels=1, **kw)


def make_vq(ch_mult=(1, 2, 2), num_codes=32, **kw) -> VQAutoencoder:
    enc, dec = _nets(ch_mult, double_z=False)
    quantizer = VectorQuantizer(
        num_codes, 4, kmeans_init_batches=1, kmeans_iters=3, dead_code_steps=5
    )
    return VQAutoencoder(enc, dec, quantizer, _adam(), latent_channels=4, image_channels=1, **kw)


@torch.no_grad()
def _rec_l1(model, images: torch.Tensor) -> float:
    model.eval()
    error = (model(images) - images).abs().mean().item()
    model.train()  # Lightning keeps the mode it is given: fit() must start in train mode
    return error


# -- networks ----------------------------------------------------------------------------
def test_group_norm_groups_adapt_to_narrow_layers():
    assert [num_groups_for(c) for c in (1, 3, 8, 16, 32, 48, 128, 512)] == [
        1,
        1,
        2,
        4,
        8,
        12,
        32,
        32,
    ]


@pytest.mark.parametrize(
    ("ch_mult", "f"), [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)]
)
def test_encode_decode_shapes_for_each_f(ch_mult, f):
    x = torch.randn(2, 1, 16, 16)
    for model in (make_kl(ch_mult), make_vq(ch_mult)):
        model.eval()
        assert model.downsample_factor == f
        assert (model.latent_channels, model.image_channels) == (4, 1)
        z = model.encode(x)
        assert z.shape == (2, 4, 16 // f, 16 // f)
        assert model.decode(z).shape == x.shape
    enc = _nets(ch_mult)[0]
    assert enc(x).shape == (2, 8, 16 // f, 16 // f)  # mean and logvar


def test_kl_encode_mode_and_sample():
    torch.manual_seed(0)
    model = make_kl().eval()
    x = torch.randn(3, 1, 16, 16)
    posterior = DiagonalGaussian(model.encoder(x))
    assert torch.equal(model.encode(x), posterior.mode())
    s1 = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, posterior.mode())


def test_diagonal_gaussian_kl_matches_torch_distributions():
    params = torch.randn(2, 6, 3, 3)
    q = DiagonalGaussian(params)
    ref = torch.distributions.Normal(q.mean, q.std)
    prior = torch.distributions.Normal(torch.zeros_like(q.mean), torch.ones_like(q.std))
    expected = torch.distributions.kl_divergence(ref, prior).flatten(1).sum(1)
    assert torch.allclose(q.kl(), expected, atol=1e-5)


def test_vq_decode_snaps_to_codebook():
    torch.manual_seed(0)
    model = make_vq().eval()
    z = model.encode(torch.randn(2, 1, 16, 16))
    noisy = z + 1e-3 * torch.randn_like(z)
    assert torch.allclose(model.decode(noisy), model.decode(z), atol=1e-6)
    assert not torch.allclose(model.decode(noisy, quantize=False), model.decode(z), atol=1e-6)


def test_bad_configurations_raise():
    enc, dec = _nets()
    with pytest.raises(ValueError, match="rec_loss='l3'"):
        KLAutoencoder(enc, dec, _adam(), 4, 1, rec_loss="l3")
    with pytest.raises(ValueError, match="latent_channels=3"):
        KLAutoencoder(enc, dec, _adam(), 3, 1)
    with pytest.raises(ValueError, match="image_channels=3"):
        KLAutoencoder(enc, dec, _adam(), 4, 3)
    with pytest.raises(ValueError, match="ch_mult"):
        Encoder(1, 8, [], 1, 4)
    with pytest.raises(ValueError, match="downsamples by 4"):
        KLAutoencoder(enc, Decoder(1, 8, (1, 2), 1, 4), _adam(), 4, 1)
    enc, dec = _nets(double_z=False)
    with pytest.raises(ValueError, match="code_dim=8"):
        VQAutoencoder(enc, dec, VectorQuantizer(16, 8), _adam(), 4, 1)


# -- training ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_training_on_mnist_lowers_reconstruction_loss(kind, mnist, tmp_path):
    pl.seed_everything(0)
    model = make_kl() if kind == "kl" else make_vq()
    held_out = mnist[-64:]
    before = _rec_l1(model, held_out)
    quiet_trainer(tmp_path, max_steps=40).fit(model, _loader(mnist[:-64], shuffle=True))
    after = _rec_l1(model, held_out)
    assert after < 0.6 * before, (before, after)
    if kind == "vq":
        assert bool(model.quantizer.initialized)
        used = torch.unique(model.quantizer.quantize(model.pre_quant(model.encoder(held_out)))[1])
        assert used.numel() >= 8  # of 32 codes


def test_training_is_deterministic_under_a_seed(mnist, tmp_path):
    states = []
    for _ in range(2):
        pl.seed_everything(3)
        model = make_vq()
        quiet_trainer(tmp_path, max_steps=4).fit(model, _loader(mnist[:128], shuffle=True))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_discriminator_path_steps_both_optimizers(mnist, tmp_path):
    pl.seed_everything(0)
    disc = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=2)
    model = make_kl(discriminator=disc, disc_weight=0.5, disc_start=1)
    assert model.automatic_optimization is False
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    d0 = {k: v.clone() for k, v in disc.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=5)
    trainer.fit(model, _loader(mnist[:96], batch_size=16))
    assert len(trainer.optimizers) == 2
    # batches 0..2 (disc_start=1): batch 0 steps the autoencoder only, batches 1, 2 both
    assert trainer.global_step == 5
    assert any(not torch.equal(enc0[k], v) for k, v in model.encoder.state_dict().items())
    changed = [k for k, v in disc.state_dict().items() if not torch.equal(d0[k], v)]
    assert any(k.endswith("weight") for k in changed)
    for key in ("train/d_loss", "train/g_loss", "train/d_weight", "train/logits_real"):
        assert key in trainer.callback_metrics
    assert trainer.callback_metrics["train/d_weight"] > 0


def test_discriminator_is_frozen_before_disc_start(mnist, tmp_path):
    disc = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=2)
    model = make_kl(discriminator=disc, disc_weight=0.5, disc_start=100)
    d0 = {k: v.clone() for k, v in disc.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(model, _loader(mnist[:96], batch_size=32))
    assert all(torch.equal(d0[k], v) for k, v in disc.state_dict().items())
    assert "train/d_loss" not in trainer.callback_metrics


def test_no_discriminator_means_one_optimizer():
    model = make_kl(discriminator=NLayerDiscriminator(1, 8, 1), disc_weight=0.0)
    assert model.discriminator is None
    assert isinstance(model.configure_optimizers(), torch.optim.Optimizer)


def shipped_lr_scheduler(name: str = "kl", warmup: int | None = None):
    """The yaml's `lr_scheduler` as Hydra builds it; `warmup` changes the warm-up length."""
    cfg = OmegaConf.load(CONF / f"{name}.yaml").lr_scheduler
    if warmup is not None:
        cfg.schedulers[0].start_factor, cfg.schedulers[0].total_iters = 1 / warmup, warmup - 1
        cfg.milestones = [warmup]
    return instantiate(cfg)


def old_lr_factor(step: int, warmup: int, total: int) -> float:
    """The LambdaLR factor stage 1 used before the scheduler moved to the yaml (issue 15)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("name", ["kl", "vq"])
@pytest.mark.parametrize("total", [21, 100, 564])  # 564 = the default run's stage-1 batches
def test_yaml_lr_scheduler_gives_the_old_warmup_cosine_lrs(name, total):
    lr = OmegaConf.load(CONF / f"{name}.yaml").optimizer.lr
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_lr_scheduler(shipped_lr_scheduler(name), opt, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    # torch's schedulers update the lr recursively: equal to the closed form up to ~1e-13
    assert lrs == pytest.approx([lr * old_lr_factor(s, 20, total) for s in range(total)], rel=1e-12)
    with pytest.raises(ValueError, match="T_max=null"):
        build_lr_scheduler(shipped_lr_scheduler(name), opt, math.inf)


def test_cosine_lr_schedule_with_warmup(mnist, tmp_path):
    model = make_kl(lr_scheduler=shipped_lr_scheduler(warmup=2))
    lrs = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = quiet_trainer(tmp_path, max_steps=-1, max_epochs=1, callbacks=[RecordLR()])
    trainer.fit(model, _loader(mnist[:192], batch_size=32))  # 6 batches
    # warm-up 1/2, 2/2 of lr=2e-3, then a half cosine over the remaining 4 batches
    expected = [1e-3, 2e-3] + [1e-3 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_hinge_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1.5)=1.5 -> 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    w = torch.ones(3, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    weight = adaptive_weight((w * a).sum(), (w * b).sum(), w)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad


# -- validation, scale factor, checkpoints -----------------------------------------------
def test_validation_logs_metrics_grid_and_scale_factor(mnist, tmp_path):
    pl.seed_everything(0)
    model = make_vq()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = quiet_trainer(
        tmp_path, max_steps=6, logger=logger, limit_val_batches=2, log_every_n_steps=1
    )
    train, val = _loader(mnist[:192], shuffle=True), _loader(mnist[-64:])
    trainer.fit(model, train, val)

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    for key in (
        "val/rec_loss",
        "val/psnr",
        "val/ssim",
        "val/scale_factor",
        "val/codebook_usage",
        "val/codebook_perplexity",
        "train/codebook_usage",
        "train/codebook_perplexity",
        "train/loss",
    ):
        assert key in logged, key
    psnr = float(next(r["val/psnr"] for r in rows if r["val/psnr"]))
    assert 5.0 < psnr < 60.0
    assert list((Path(logger.log_dir) / "images").glob("val_reconstructions_*.png"))

    # the scale factor is 1/std of the validation latents as `encode` returns them
    with torch.no_grad():
        z = torch.cat([model.encode(b["image"]) for b in val])
    assert model.scale_factor.item() == pytest.approx(1.0 / z.flatten().std().item(), rel=1e-4)
    assert model.scale_factor.item() != 1.0
    assert "scale_factor" in model.state_dict()


def test_compute_scale_factor_without_validation(mnist):
    torch.manual_seed(0)
    model = make_kl().eval()
    batches = list(_loader(mnist[:64]))
    value = model.compute_scale_factor(batches)
    with torch.no_grad():
        z = torch.cat([model.encode(b["image"]) for b in batches])
    assert value == pytest.approx(1.0 / z.std().item(), rel=1e-4)
    assert model.scale_factor.item() == pytest.approx(value)


@pytest.mark.parametrize("use_ema", [False, True])
def test_checkpoint_round_trip_restores_identical_outputs(use_ema, mnist, tmp_path):
    def build(seed: int) -> VQAutoencoder:
        torch.manual_seed(seed)
        enc, dec = _nets(double_z=False)
        quantizer = VectorQuantizer(
            32, 4, use_ema=use_ema, kmeans_init_batches=1, kmeans_iters=2, dead_code_steps=2
        )
        disc = NLayerDiscriminator(1, 8, 2)
        return VQAutoencoder(
            enc,
            dec,
            quantizer,
            _adam(),
            4,
            1,
            discriminator=disc,
            disc_weight=0.1,
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=None),
        )

    pl.seed_everything(0)
    model = build(0)
    trainer = quiet_trainer(tmp_path, max_steps=6, limit_val_batches=1)
    trainer.fit(model, _loader(mnist[:64]), _loader(mnist[-32:]))
    path = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(path)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fresh = build(1)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert ckpt["hyper_parameters"]["latent_channels"] == 4
    model.eval()
    fresh.eval()
    x = mnist[-8:]
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
        assert torch.equal(model.encode(x), fresh.encode(x))
    for name in ("scale_factor", "quantizer.initialized", "quantizer.steps_since_used"):
        assert torch.equal(model.state_dict()[name], fresh.state_dict()[name]), name
    assert bool(fresh.quantizer.initialized) and fresh.scale_factor.item() != 1.0


def test_log_image_grid_writes_png_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(logger=logger, accelerator="cpu", default_root_dir=str(tmp_path))
    grid = torch.rand(3, 10, 20)
    path = log_image_grid(trainer, "val/reconstructions", grid, step=7)
    logger.experiment.flush()
    assert path == Path(logger.log_dir) / "images" / "val_reconstructions_0000007.png"
    assert path.is_file()
    assert list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="grid of shape"):
        log_image_grid(trainer, "x", torch.rand(10, 20), step=0)


# -- the shipped configs -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["kl", "vq"])
def test_yaml_configs_build_the_default_f4_models(name):
    cfg = OmegaConf.create(
        {
            "data": {"num_channels": 1},
            "trainer": {"gradient_clip_val": None},  # grad_clip follows it
            "model": {"autoencoder": None},
        }
    )
    cfg.model.autoencoder = OmegaConf.load(CONF / f"{name}.yaml")
    torch.manual_seed(0)
    model = instantiate(cfg.model.autoencoder)
    assert isinstance(model, KLAutoencoder if name == "kl" else VQAutoencoder)
    assert (
        model.downsample_factor == 4
        and model.latent_channels == cfg.model.autoencoder.latent_channels
    )
    assert model.discriminator is None
    assert model.lr_scheduler_factory.func is torch.optim.lr_scheduler.SequentialLR
    model.lr_scheduler_factory = None  # the scheduler needs a trainer: check the optimizer alone
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.defaults["betas"], (list, tuple))  # not a ListConfig (weights_only)
    model.eval()
    z = model.encode(torch.randn(2, 1, 32, 32))
    assert z.shape == (2, 4, 8, 8)
    # hyperparameters are plain data, so checkpoints load with weights_only=True
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in model.hparams.values())


class _SaveRankState(pl.Callback):
    """Writes each rank's final state dict, to check that DDP ranks agree."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.pt"
        torch.save(pl_module.state_dict(), path)


@pytest.mark.slow
def test_vq_under_two_process_ddp_keeps_ranks_identical(mnist, tmp_path):
    """k-means init, dead-code resets, the scale factor and the image grid under gloo DDP."""
    pl.seed_everything(0)
    enc, dec = _nets(double_z=False)
    quantizer = VectorQuantizer(32, 4, kmeans_init_batches=2, kmeans_iters=2, dead_code_steps=2)
    model = VQAutoencoder(enc, dec, quantizer, functools.partial(torch.optim.Adam, lr=2e-3), 4, 1)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=-1,
        max_epochs=2,
        strategy="ddp_spawn",
        devices=2,
        limit_val_batches=2,
        callbacks=[_SaveRankState(str(tmp_path))],
    )
    trainer.fit(model, _loader(mnist[:128], batch_size=16), _loader(mnist[-64:], batch_size=16))
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert bool(s0["quantizer.initialized"]) and s0["scale_factor"].item() != 1.0
    assert list((tmp_path / "images").glob("val_reconstructions_*.png"))
