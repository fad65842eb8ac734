"""Latent vs pixel diffusion on MNIST-5k: throughput of one UNet class on both, then FID at equal
budget.

Part A (throughput, same UNet class `ldm.modules.unet.UNet`, same batch size):
- latent: the project's CPU preset (conf/model/diffusion/small.yaml) on 8x8x4 stage-1 latents
  (32x32 MNIST at f=4): model_channels 64, channel_mult [1, 2] (8x8, 4x4), 1 ResBlock per level,
  attention at level 1 (4x4) and in the middle;
- pixel: the same UNet on 32x32x1 pixels with one more level, channel_mult [1, 2, 2] (32, 16, 8),
  attention at level 2 (8x8, the latent model's top resolution) and in the middle; else equal.
Training = forward + MSE + backward + the project's optimizer step; "latent + encode" adds the
stage-1 encoder forward of the batch (the path without the latent cache). Sampling images/s at
S denoising steps = batch / (S x one forward [+ one decoder forward for latents]), from timed
forwards. All timed in alternating rounds; medians.

Part B (quality at an equal training budget, --budget seconds on --clock each):
- latent: LatentDiffusion as the project builds it (small preset, linear schedule, uniform loss,
  label dropout 0.1, fused AdamW, warm-up), trained with Lightning from the latent cache; building
  the cache counts against its budget. Stage 1 (KL autoencoder) is trained first by ldm.train.run
  (its time is reported separately) or read from --autoencoder-ckpt.
- pixel: diffusers' UNet2DModel (the structural twin of the pixel UNet above, class-conditional)
  trained the diffusers way (train_unconditional.py's loop: DDPMScheduler.add_noise, MSE on eps,
  AdamW with betas (0.95, 0.999), weight decay 1e-6, constant lr after warm-up), with the same lr,
  warm-up steps, batch size and data as the latent model.
Both are sampled with DDIM at S steps (ours: ldm's DDIM; pixel: diffusers' DDIMScheduler) for the
same class labels (every class equally often), no guidance, and scored with FID/KID/CAS on the
project's classifier features against the MNIST-5k train split (N stated). No EMA for either.

Part C (--equal-time; issue 21 item 7: what a user gets for the default run's time):
- ours: the default run itself, both stages (`python train.py` with the default recipe, its final
  FID included), timed on --clock; sampled with the default sampler (DPM-Solver++(2M) SDE, 25 steps)
  at the default FID guidance (2, within the model's guidance interval) and unguided;
- pixel: the diffusers twin of Part B, class-conditional with label dropout 0.1 (the null class)
  for classifier-free guidance, trained the diffusers way for the same seconds of training alone
  (its sampling not counted; ours' final FID pass is), at the default run's stage-2 batch size, lr
  and warm-up; sampled with diffusers' DPMSolverMultistepScheduler (sde-dpmsolver++, order 2,
  25 steps) with CFG 2 at every step and unguided. No EMA for the pixel model (diffusers' default).
Every row is scored on the same N, classifier features, precision/recall/density/coverage k=3.

    python bench/latent_vs_pixel.py --quick
    python bench/latent_vs_pixel.py [--autoencoder-ckpt PATH] [--budget 180] [--num-samples 300]
    python bench/latent_vs_pixel.py --equal-time [--num-samples 300]      # part C only
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from common import (
    ROOT,
    FIDScorer,
    ModelSteps,
    alternate,
    base_parser,
    call_ours,
    clock,
    compose_project_config,
    denoiser_inputs,
    diffusers_twin,
    format_table,
    machine_info,
    median,
    median_ratio,
    newest_checkpoint,
    num_params,
    sample_latent_model,
    setup_run,
    spread,
    timed,
    train_with_project,
    write_results,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.metrics.nfe_sweep import SCORE_COLUMNS
from ldm.modules.conditioning import even_class_labels
from ldm.modules.unet import UNet

CKPT_DIR = ROOT / ".cache" / "bench"


def warmup_steps(lr_scheduler: Any) -> int:
    """The linear warm-up length of stage 2's lr scheduler config (a LinearLR alone or first in a
    SequentialLR; 0 for none), which the pixel model gets too."""
    if not lr_scheduler:
        return 0
    first = lr_scheduler.schedulers[0] if "schedulers" in lr_scheduler else lr_scheduler
    return int(first.get("total_iters", 0))


def pixel_unet_kwargs(latent_kwargs: dict[str, Any], image_channels: int) -> dict[str, Any]:
    """The latent preset with pixel channels, one more level and attention at its lowest level."""
    mult = list(latent_kwargs["channel_mult"])
    return {
        **latent_kwargs,
        "in_channels": image_channels,
        "out_channels": image_channels,
        "channel_mult": [*mult, mult[-1]],
        "attention_levels": [len(mult)],
    }


# ---------------------------------------------------------------------------- stage 1
def get_autoencoder(args: Any, workdir: Path) -> tuple[Path, float | None]:
    """(stage-1 checkpoint, seconds spent training it here or None if given)."""
    if args.autoencoder_ckpt:
        return Path(args.autoencoder_ckpt), None
    overrides = [
        "stage=autoencoder",
        "logger=csv",
        "callbacks.common.progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"data.batch_size={args.batch_size}",
        f"autoencoder.trainer.max_epochs={args.ae_epochs}",
        f"seed={args.seed}",
    ]
    if args.quick:  # a small stage 1 on part of an epoch: enough to verify the pipeline
        overrides += [
            "+trainer.limit_train_batches=20",
            "+trainer.limit_val_batches=4",
            "model.autoencoder.encoder.ch=8",
            "model.autoencoder.encoder.mid_attention=false",
        ]
    cfg, seconds = train_with_project(overrides, workdir / "stage1")
    return newest_checkpoint(Path(cfg.paths.output_dir), "autoencoder"), seconds


# ---------------------------------------------------------------------------- part A
def throughput(
    autoencoder: torch.nn.Module,
    latent_kwargs: dict[str, Any],
    optimizer_cfg: dict[str, Any],
    image_shape: tuple[int, int, int],
    latent_shape: tuple[int, int, int],
    args: Any,
) -> dict[str, Any]:

    b = args.batch_size
    kwargs = {"latent": latent_kwargs, "pixel": pixel_unet_kwargs(latent_kwargs, image_shape[0])}
    shapes = {"latent": (b, *latent_shape), "pixel": (b, *image_shape)}
    steps = {}
    for name in ("latent", "pixel"):
        torch.manual_seed(args.seed)
        model = UNet(**kwargs[name])
        inputs = denoiser_inputs(shapes[name], kwargs[name]["num_classes"], "cpu", args.seed)
        steps[name] = ModelSteps(
            model, call_ours, instantiate(optimizer_cfg)(model.parameters()), inputs
        )
    images = torch.rand(b, *image_shape) * 2 - 1  # (B, C, H, W)
    latents = autoencoder.encode_latents(images)  # (B, c, h, w)
    extra = {
        "encode": lambda: autoencoder.encode_latents(images),
        "decode": lambda: autoencoder.decode(latents / autoencoder.scale_factor),
    }
    for s in steps.values():
        s.train_step()
        s.sample_step()
    train = alternate(
        {n: (lambda s=s: timed(s.train_step, "cpu", 1, args.clock)) for n, s in steps.items()},
        args.rounds,
    )
    fwd = alternate(
        {
            **{
                n: (lambda s=s: timed(s.sample_step, "cpu", 1, args.clock))
                for n, s in steps.items()
            },
            **{
                n: (lambda f=f: timed(torch.no_grad()(f), "cpu", 1, args.clock))
                for n, f in extra.items()
            },
        },
        args.rounds,
    )
    t_enc, t_dec, steps_s = median(fwd["encode"]), median(fwd["decode"]), args.sample_steps
    rows = []
    for name in ("latent", "pixel"):
        t_train, t_fwd = median(train[name]), median(fwd[name])
        row = {
            "model": name,
            "unet": f"ch {kwargs[name]['model_channels']} mult {kwargs[name]['channel_mult']} "
            f"attn {kwargs[name]['attention_levels']} on {shapes[name][1:]}",
            "params": num_params(steps[name].model),
            "fwd_gflops_per_image": steps[name].flops_per_image()[0] / 1e9,
            "train_img_s": b / t_train,
            "forward_img_s": b / t_fwd,
            "sample_img_s": b / (steps_s * t_fwd + (t_dec if name == "latent" else 0.0)),
            "train_step_s_spread": spread(train[name]),
        }
        if name == "latent":
            row["train_img_s_with_encode"] = b / (t_train + t_enc)
        rows.append(row)
    ratios = {
        "train_latent_over_pixel": median_ratio(train["pixel"], train["latent"]),
        "train_with_encode_latent_over_pixel": (median(train["pixel"]))
        / (median(train["latent"]) + t_enc),
        "forward_latent_over_pixel": median_ratio(fwd["pixel"], fwd["latent"]),
        "sample_latent_over_pixel": (steps_s * median(fwd["pixel"]))
        / (steps_s * median(fwd["latent"]) + t_dec),
    }
    return {
        "rows": rows,
        "ratios": ratios,
        "encode_s": t_enc,
        "decode_s": t_dec,
        "batch": b,
        "sample_steps": steps_s,
    }


# ---------------------------------------------------------------------------- part B
class BudgetStop(pl.Callback):
    """Stop training once `seconds` of `clock_name` time have passed since `start` (a reading of
    that clock), checked after every batch as Trainer(max_time=...) does for wall time."""

    def __init__(self, seconds: float, clock_name: str, start: float):
        self.seconds, self.now, self.start, self.steps = seconds, clock(clock_name), start, 0

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self.steps += 1
        if self.now() - self.start >= self.seconds:
            trainer.should_stop = True


def train_latent(
    cfg: Any, ae_ckpt: Path, datamodule: Any, args: Any, workdir: Path
) -> tuple[Any, dict[str, Any]]:
    """LatentDiffusion from the project config, trained for the budget from the latent cache."""
    from ldm.callbacks.checkpoint_config import StoreConfigInCheckpoint
    from ldm.data.latent_cache import latent_cache_datamodule
    from ldm.models.loading import load_autoencoder
    from ldm.train import DIFFUSION_RUN_KEYS, use_autoencoder_config

    autoencoder, ae_config = load_autoencoder(ae_ckpt)
    use_autoencoder_config(cfg, ae_config)
    diffusion_cfg = OmegaConf.to_container(cfg.model.diffusion, resolve=True)
    torch.manual_seed(args.seed)
    model = instantiate(
        {k: v for k, v in diffusion_cfg.items() if k not in DIFFUSION_RUN_KEYS},
        autoencoder=autoencoder,
    )
    now = clock(args.clock)
    start = now()
    data = latent_cache_datamodule(autoencoder, ae_ckpt, datamodule, workdir / "latents")
    cache_s = now() - start
    budget = BudgetStop(args.budget, args.clock, start)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[budget, StoreConfigInCheckpoint("diffusion", resolved)],
        default_root_dir=str(workdir),
    )
    pl.seed_everything(args.seed, workers=True, verbose=False)
    trainer.fit(model, datamodule=data)
    used = now() - start
    if args.save_ckpt:
        args.save_ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(args.save_ckpt)
    return model.eval(), {
        "train_s": used,
        "latent_cache_s": cache_s,
        "steps": budget.steps,
        "images_seen": budget.steps * args.batch_size,
        "params": num_params(model.unet),
    }


def train_pixel_diffusers(
    unet_kwargs: dict[str, Any],
    lr: float,
    warmup: int,
    datamodule: Any,
    args: Any,
    cond_drop_prob: float = 0.0,
) -> tuple[Any, Any, dict[str, Any]]:
    """Pixel-space DDPM the diffusers way (examples/unconditional_image_generation loop); with
    `cond_drop_prob` > 0 each label is replaced by the null class (`num_classes`) with that
    probability, for classifier-free guidance."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    torch.manual_seed(args.seed)
    model = diffusers_twin(unet_kwargs, datamodule.image_size)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
    )
    lr_scheduler = get_scheduler(
        "constant_with_warmup", optimizer=optimizer, num_warmup_steps=warmup
    )
    loader = datamodule.train_dataloader()
    now = clock(args.clock)
    start, steps = now(), 0
    model.train()
    while now() - start < args.budget:
        for batch in loader:
            clean = batch["image"]  # (B, C, H, W) in [-1, 1]
            noise = torch.randn(clean.shape)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],)
            ).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # (B, C, H, W)
            labels = batch["label"]
            if cond_drop_prob > 0:
                drop = torch.rand(labels.shape) < cond_drop_prob
                labels = torch.where(drop, unet_kwargs["num_classes"], labels)
            noise_pred = model(noisy, timesteps, class_labels=labels).sample
            loss = F.mse_loss(noise_pred, noise)
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            steps += 1
            if now() - start >= args.budget:
                break
    return (
        model.eval(),
        noise_scheduler,
        {
            "train_s": now() - start,
            "steps": steps,
            "images_seen": steps * args.batch_size,
            "params": num_params(model),
        },
    )


@torch.no_grad()
def sample_pixel_diffusers(
    model: Any,
    noise_scheduler: Any,
    labels: torch.Tensor,
    args: Any,
    image_shape: tuple[int, int, int],
) -> tuple[torch.Tensor, float]:
    """DDIM (diffusers' DDIMScheduler from the training scheduler's config), S steps, batched;
    returns images (N, C, H, W) in [-1, 1] and the seconds (on --clock) it took."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    scheduler.set_timesteps(args.sample_steps)
    generator = torch.Generator().manual_seed(args.seed)
    out = []
    now = clock(args.clock)
    start = now()
    for i in range(0, len(labels), args.sample_batch):
        y = labels[i : i + args.sample_batch]
        x = torch.randn((len(y), *image_shape), generator=generator)  # (b, C, H, W)
        for t in scheduler.timesteps:
            eps = model(x, t, class_labels=y).sample
            x = scheduler.step(eps, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out), now() - start


@torch.no_grad()
def sample_pixel_guided(
    model: Any,
    noise_scheduler: Any,
    labels: torch.Tensor,
    guidance_scale: float,
    args: Any,
    image_shape: tuple[int, int, int],
) -> tuple[torch.Tensor, float]:
    """diffusers' DPM-Solver++(2M) SDE (DPMSolverMultistepScheduler, algorithm_type
    "sde-dpmsolver++") at --sample-steps, with classifier-free guidance at `guidance_scale` on every
    step (the null class is the last label); images (N, C, H, W) in [-1, 1] and seconds."""
    from diffusers import DPMSolverMultistepScheduler

    null = model.config.num_class_embeds - 1
    generator = torch.Generator().manual_seed(args.seed)
    out = []
    now = clock(args.clock)
    start = now()
    for i in range(0, len(labels), args.sample_batch):
        scheduler = DPMSolverMultistepScheduler.from_config(
            noise_scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2
        )
        scheduler.set_timesteps(args.sample_steps)
        y = labels[i : i + args.sample_batch]
        x = torch.randn((len(y), *image_shape), generator=generator)  # (b, C, H, W)
        for t in scheduler.timesteps:
            if guidance_scale == 1.0:
                eps = model(x, t, class_labels=y).sample
            else:
                both = model(x.repeat(2, 1, 1, 1), t, class_labels=torch.cat([y, y * 0 + null]))
                cond, uncond = both.sample.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out), now() - start


def equal_time(args: Any, workdir: Path, machine: dict[str, Any]) -> None:
    """Part C: the default run against a pixel model given the same seconds."""
    from ldm.models.loading import load_latent_diffusion
    from ldm.train import run

    overrides = [
        "logger=csv",
        "callbacks.common.progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"seed={args.seed}",
    ]
    if args.quick:  # a few batches of each stage: enough to verify the pipeline
        overrides += [
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=10",
            "+trainer.limit_val_batches=2",
            "fid.every_n_epochs=0",
        ]
    cfg = compose_project_config(overrides, workdir / "default")
    now = clock(args.clock)
    start = now()
    run(cfg)
    ours_s = now() - start
    print(f"default run: {ours_s:.0f} {args.clock}-s", flush=True)
    ckpt = newest_checkpoint(Path(cfg.paths.output_dir), "diffusion")
    model, _ = load_latent_diffusion(ckpt)

    data_cfg = compose_project_config(
        [f"data.batch_size={cfg.diffusion.data.batch_size}", f"seed={args.seed}"],
        workdir / "pixel",
    ).data
    datamodule = instantiate(data_cfg)
    datamodule.setup("fit")
    classifier = OmegaConf.to_container(cfg.fid.classifier, resolve=True)
    scorer = FIDScorer(datamodule, {**classifier, "epochs": 1} if args.quick else classifier)
    labels = even_class_labels(args.num_samples, datamodule.num_classes)
    guided = float(cfg.fid.guidance_scale)
    sampler = model.configured_sampler(steps=args.sample_steps)
    rows = []
    for scale in (guided, 1.0):
        images, seconds = sample_latent_model(
            model, sampler, labels, args.sample_batch, args.seed, args.clock, scale
        )
        rows.append(
            {
                "model": f"ours: latent, default run (both stages), guidance {scale:g}"
                + (f" in {model.hparams.get('guidance_interval')}" if scale != 1 else ""),
                "train_s": ours_s,
                "sample_s": seconds,
                **scorer(images, labels),
            }
        )
        print(rows[-1], flush=True)

    image_shape = (datamodule.num_channels, datamodule.image_size, datamodule.image_size)
    latent_unet = OmegaConf.to_container(cfg.model.diffusion.unet, resolve=True)
    latent_unet.pop("_target_")
    pixel_kwargs = pixel_unet_kwargs(latent_unet, image_shape[0])
    warmup = warmup_steps(cfg.model.diffusion.lr_scheduler)
    args.budget, args.batch_size = ours_s, cfg.diffusion.data.batch_size
    pixel, noise_scheduler, info = train_pixel_diffusers(
        pixel_kwargs,
        cfg.model.diffusion.optimizer.lr,
        warmup,
        datamodule,
        args,
        cond_drop_prob=cfg.model.diffusion.cond_drop_prob,
    )
    print(f"pixel: {info}", flush=True)
    for scale in (guided, 1.0):
        images, seconds = sample_pixel_guided(
            pixel, noise_scheduler, labels, scale, args, image_shape
        )
        rows.append(
            {
                "model": f"pixel: diffusers UNet2DModel + DDPMScheduler, guidance {scale:g}",
                "train_s": info["train_s"],
                "steps": info["steps"],
                "params": info["params"],
                "sample_s": seconds,
                **scorer(images, labels),
            }
        )
        print(rows[-1], flush=True)
    rows.append(
        {"model": "held-out real digits", **scorer.real_floor(datamodule, args.num_samples)}
    )
    columns = c_columns(args.clock)
    payload = {
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "default_run": {"seconds": ours_s, "checkpoint_params": num_params(model.unet)},
        "rows": rows,
        "fid": scorer.describe,
        "table": format_table(rows, columns),
    }
    print(format_table(rows, columns))
    print(f"wrote {write_results('latent_vs_pixel_equal_time', args.quick, payload, args.out)}")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--autoencoder-ckpt", default=None, help="stage-1 checkpoint (default: train one here)"
    )
    parser.add_argument(
        "--ae-epochs", type=int, default=None, help="stage-1 epochs when trained here"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--budget", type=float, default=None, help="training seconds per model (on --clock)"
    )
    parser.add_argument(
        "--num-samples", type=int, default=None, help="N generated per model for FID"
    )
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps for both")
    parser.add_argument("--sample-batch", type=int, default=250)
    parser.add_argument(
        "--save-ckpt",
        type=Path,
        default=None,
        help="write the latent model's checkpoint here "
        "(default .cache/bench/latent_vs_pixel[_quick].ckpt)",
    )
    parser.add_argument("--skip-fid", action="store_true", help="part A only")
    parser.add_argument(
        "--equal-time",
        action="store_true",
        help="part C only: the default run vs a pixel model trained for its time",
    )
    args = parser.parse_args()
    setup_run(args)
    q = args.quick
    args.ae_epochs = args.ae_epochs or (1 if q else 2)
    args.batch_size = args.batch_size or (32 if q else 128)
    args.rounds = args.rounds or (5 if q else 7)
    args.budget = args.budget or (15.0 if q else 180.0)
    args.num_samples = args.num_samples or (100 if q else 300)
    args.sample_steps = args.sample_steps or (10 if q else 25)
    args.save_ckpt = args.save_ckpt or CKPT_DIR / f"latent_vs_pixel{'_quick' if q else ''}.ckpt"
    machine = machine_info("cpu")
    if args.equal_time:
        with tempfile.TemporaryDirectory() as tmp:
            equal_time(args, Path(tmp), machine)
        return

    from ldm.models.loading import load_autoencoder

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ae_ckpt, ae_seconds = get_autoencoder(args, workdir)
        how = "given" if ae_seconds is None else f"trained here in {ae_seconds:.0f} s wall"
        print(f"stage 1: {ae_ckpt} ({how})")
        autoencoder, _ = load_autoencoder(ae_ckpt)
        cfg = compose_project_config(
            [
                "model/diffusion=small",
                "sampler=ddim",
                f"sampler.steps={args.sample_steps}",
                f"data.batch_size={args.batch_size}",
                f"seed={args.seed}",
            ],
            workdir / "stage2",
        )
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        image_shape = (datamodule.num_channels, datamodule.image_size, datamodule.image_size)
        size = datamodule.image_size // autoencoder.downsample_factor
        latent_shape = (autoencoder.latent_channels, size, size)
        latent_kwargs = {
            **OmegaConf.to_container(cfg.model.diffusion.unet, resolve=True),
            "in_channels": autoencoder.latent_channels,
            "out_channels": autoencoder.latent_channels,
        }
        latent_kwargs.pop("_target_")
        optimizer_cfg = OmegaConf.to_container(cfg.model.diffusion.optimizer, resolve=True)
        part_a = throughput(
            autoencoder, latent_kwargs, optimizer_cfg, image_shape, latent_shape, args
        )
        print(format_table(part_a["rows"], a_columns(args.clock)))
        print({k: round(v, 2) for k, v in part_a["ratios"].items()})

        part_b = None
        if not args.skip_fid:
            classifier = OmegaConf.to_container(cfg.fid.classifier, resolve=True)
            scorer = FIDScorer(datamodule, {**classifier, "epochs": 1} if q else classifier)
            labels = even_class_labels(args.num_samples, datamodule.num_classes)
            latent_model, latent_info = train_latent(
                cfg, ae_ckpt, datamodule, args, workdir / "stage2"
            )
            print(f"latent: {latent_info}", flush=True)
            sampler = latent_model.configured_sampler(steps=args.sample_steps)
            images, seconds = sample_latent_model(
                latent_model, sampler, labels, args.sample_batch, args.seed, args.clock
            )
            latent_info.update(sample_s=seconds, **scorer(images, labels))
            warmup = warmup_steps(cfg.model.diffusion.lr_scheduler)
            pixel_model, noise_scheduler, pixel_info = train_pixel_diffusers(
                pixel_unet_kwargs(latent_kwargs, image_shape[0]),
                optimizer_cfg["lr"],
                warmup,
                datamodule,
                args,
            )
            print(f"pixel: {pixel_info}", flush=True)
            images, seconds = sample_pixel_diffusers(
                pixel_model, noise_scheduler, labels, args, image_shape
            )
            pixel_info.update(sample_s=seconds, **scorer(images, labels))
            rows = [
                {"model": "latent (ours, LatentDiffusion)", **latent_info},
                {"model": "pixel (diffusers UNet2DModel + DDPMScheduler)", **pixel_info},
            ]
            part_b = {
                "rows": rows,
                "fid_latent_over_pixel": latent_info["fid"] / pixel_info["fid"],
                "real_floor": scorer.real_floor(datamodule, args.num_samples),
                "fid": scorer.describe,
                "sampler": f"DDIM {args.sample_steps} steps, labels i mod 10, no guidance",
            }
            print(format_table(rows, b_columns(args.clock)))

    payload = {
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "stage1": {"checkpoint": str(ae_ckpt), "trained_here_s_wall": ae_seconds},
        "throughput": part_a,
        "equal_budget": part_b,
        "table_throughput": format_table(part_a["rows"], a_columns(args.clock)),
        "table_equal_budget": format_table(part_b["rows"], b_columns(args.clock))
        if part_b
        else None,
    }
    print(f"wrote {write_results('latent_vs_pixel', q, payload, args.out)}")


def a_columns(clock_name: str) -> list[tuple[str, str]]:
    unit = "img/s" if clock_name == "wall" else "img/CPU-s"
    return [
        ("model", "model"),
        ("unet", "UNet"),
        ("params", "params"),
        ("fwd_gflops_per_image", "fwd GFLOP/img"),
        ("train_img_s", f"train {unit}"),
        ("train_img_s_with_encode", f"train {unit} incl. encode"),
        ("forward_img_s", f"forward {unit}"),
        ("sample_img_s", f"sample {unit}"),
    ]


def c_columns(clock_name: str) -> list[tuple[str, str]]:
    unit = "s" if clock_name == "wall" else "CPU-s"
    return [
        ("model", "model"),
        ("train_s", f"train {unit}"),
        ("steps", "pixel steps"),
        ("sample_s", f"sample {unit}"),
        ("num_samples", "N"),
        *SCORE_COLUMNS,
    ]


def b_columns(clock_name: str) -> list[tuple[str, str]]:
    unit = "s" if clock_name == "wall" else "CPU-s"
    return [
        ("model", "model"),
        ("params", "params"),
        ("train_s", f"train {unit}"),
        ("steps", "steps"),
        ("images_seen", "images seen"),
        ("sample_s", f"sample {unit}"),
        ("num_samples", "N"),
        ("fid", "FID"),
        ("kid", "KID"),
        ("cas", "CAS"),
    ]


if __name__ == "__main__":
    main()
