# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — Inspect a training run
#
# Given a run directory of `python train.py` (`logs/train/runs/<date>`, or a sweep job's
# `logs/train/multiruns/<date>/<n>`), this notebook reads what the run left behind: the run
# manifest (`manifest.json`: commit, packages, seed, data fingerprint, machine), the resolved
# config (`config_resolved.yaml`), the logged metrics (the CSV logger's `csv/version_*/metrics.csv`,
# and the W&B offline logs `wandb/offline-run-*/run-*.wandb` when the run used `logger=wandb`),
# and plots the loss and FID curves and the sample grids saved during training.
#
# **How to run.** Set `RUN_DIR` in the parameters cell to your run's directory and run top to
# bottom (or, with papermill installed:
# `papermill notebooks/02_inspect_run.ipynb out.ipynb -p RUN_DIR PATH`).
# Curves need a CSV or W&B logger (`logger=csv`, `logger=wandb` or `logger=[csv,wandb]`).
# With `RUN_DIR = None` (the default, what CI runs) the notebook first makes a seconds-long run of
# both stages (`debug=fast`, CSV and offline W&B loggers, FID every epoch) in a temporary
# directory (or `WORK_DIR`): nothing is downloaded and nothing is written into the repository.

# %% tags=["parameters"]
# Parameters (papermill-style). The defaults are the tiny settings CI runs.
RUN_DIR = (
    None  # a run directory (logs/train/runs/<date>); None: make a seconds-long debug run first
)
WORK_DIR = None  # where that debug run goes; None: a fresh temporary directory

# %%
# %matplotlib inline
import csv
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import yaml
from omegaconf import OmegaConf
from PIL import Image

import ldm

ROOT = Path(ldm.__file__).resolve().parents[1]  # the repository: conf/ lives here
if RUN_DIR is None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm.train import run

    WORK = Path(WORK_DIR) if WORK_DIR else Path(tempfile.mkdtemp(prefix="ldm_inspect_"))
    RUN = WORK / "run"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "debug=fast",
                "logger=[csv,wandb]",
                "logger.wandb.offline=true",
                "autoencoder.trainer.max_epochs=2",
                "diffusion.trainer.max_epochs=3",
                "fid.every_n_epochs=1",
                f"paths.root_dir={WORK}",
                f"paths.output_dir={RUN}",
            ],
        )
    run(cfg)
else:
    RUN = Path(RUN_DIR).expanduser().resolve()
if not (RUN / "manifest.json").is_file():
    raise FileNotFoundError(
        f"RUN_DIR={str(RUN)!r} has no manifest.json; give a directory written by train.py"
    )
print(f"run dir: {RUN}")


# %% [markdown]
# ## 1. What the run directory holds
#
# Checkpoints per stage, the run files (`manifest.json`, `config_resolved.yaml`, `command.txt`),
# one logger directory per stage and logger, and `final_samples.png`.


# %%
def tree(path, depth=0, max_depth=3):
    for child in sorted(path.iterdir()):
        if child.name in ("logs", "tmp") and "offline-run" in child.parent.name:
            continue  # W&B's own debug logs
        size = f"  {child.stat().st_size / 1024:.1f} KiB" if child.is_file() else "/"
        print("    " * depth + child.name + size)
        if child.is_dir() and not child.is_symlink() and depth + 1 < max_depth:
            tree(child, depth + 1, max_depth)


tree(RUN)

# %% [markdown]
# ## 2. The manifest: what is needed to rerun it
#
# A run is reproduced by the same code (commit; `dirty: true` means uncommitted changes were
# in the working tree), the same packages, the same seed and the same data (its fingerprint).

# %%
manifest = json.loads((RUN / "manifest.json").read_text())
for key, value in manifest.items():
    if isinstance(value, dict):
        value = ", ".join(f"{k}={v}" for k, v in value.items())
    print(f"{key:>16}  {value}")
command = RUN / "command.txt"
print(f"{'command.txt':>16}  {command.read_text().strip() if command.is_file() else '-'}")
if (RUN / ".hydra" / "config.yaml").is_file():
    print(f"rerun with: python train.py --config-dir {RUN / '.hydra'} --config-name config")
else:
    print(
        "no .hydra/ (run from Python, not train.py): "
        "rerun with train.py and the overrides in config_resolved.yaml"
    )

# %% [markdown]
# ## 3. The resolved config
#
# `config_resolved.yaml` is the whole Hydra config with every interpolation resolved: the
# values the run actually used. The main choices (`a|b`: key `a`, else `b`, the spelling of runs
# made before the per-stage `autoencoder.*` / `diffusion.*` sections):

# %%
cfg_run = OmegaConf.load(RUN / "config_resolved.yaml")


def select(keys):
    """The value of the first of the `|`-separated keys that the run's config has, else "-"."""
    for key in keys.split("|"):
        value = OmegaConf.select(cfg_run, key, default=None)
        if value is not None:
            return list(value) if OmegaConf.is_config(value) else value
    return "-"


shown = {
    "stage": "stage",
    "seed": "seed",
    "data": "data.name",
    "image size": "data.image_size",
    "classes": "data.num_classes",
    "batch ae / diffusion": (
        "autoencoder.data.batch_size|stage_data.autoencoder.batch_size",
        "diffusion.data.batch_size|stage_data.diffusion.batch_size",
    ),
    "autoencoder": "model.autoencoder._target_",
    "latent channels": "model.autoencoder.latent_channels",
    "encoder ch / ch_mult": ("model.autoencoder.encoder.ch", "model.autoencoder.encoder.ch_mult"),
    "UNet channels / mult": (
        "model.diffusion.unet.model_channels",
        "model.diffusion.unet.channel_mult",
    ),
    "schedule / T": ("schedule.name", "schedule.num_timesteps"),
    "prediction type": "schedule.prediction_type",
    "sampler / steps": ("sampler.name", "sampler.steps"),
    "epochs ae / diffusion": (
        "autoencoder.trainer.max_epochs|stage_trainer.autoencoder.max_epochs",
        "diffusion.trainer.max_epochs|stage_trainer.diffusion.max_epochs",
    ),
    "FID extractor / N": ("fid.extractor", "fid.num_samples"),
    "FID every n epochs": "fid.every_n_epochs",
    "loggers": "logger",
}
for label, keys in shown.items():
    values = [select(k) for k in ([keys] if isinstance(keys, str) else keys)]
    print(f"{label:>22}  " + " / ".join(map(str, values)))


# %% [markdown]
# ## 4. Metrics
#
# The CSV logger writes one `csv/version_<n>/` per stage (`trained_stage` in its `hparams.yaml`;
# runs that predate that key are told apart by their metrics): `metrics.csv` has one column per
# metric and a row per logging call, empty where a metric was not logged. W&B offline logs are
# read with `ldm.utils.wandb_offline.read_history` (no account, no server); when both exist the
# W&B values are drawn as markers over the CSV curves.


# %%
def read_csv_metrics(path):
    """{metric: ([step, ...], [value, ...])} of a Lightning CSVLogger metrics.csv."""
    series = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return series


def stage_of(hparams, series):
    """The stage a logger run trained: logged as trained_stage, else recognised by its metrics."""
    if hparams.get("trained_stage"):
        return hparams["trained_stage"]
    return "autoencoder" if "val/rec_loss" in series or "train/rec_loss" in series else "diffusion"


def add(metrics, stage, series):
    """Merge a logger run's series into metrics[stage] (a resumed stage has several runs)."""
    for key, (steps, values) in series.items():
        merged = metrics.setdefault(stage, {}).setdefault(key, ([], []))
        merged[0].extend(steps)
        merged[1].extend(values)


csv_metrics = {}  # stage -> {metric: (steps, values)}
for version in sorted((RUN / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
    series = read_csv_metrics(version / "metrics.csv")
    hparams_file = version / "hparams.yaml"
    hparams = (yaml.safe_load(hparams_file.read_text()) or {}) if hparams_file.is_file() else {}
    add(csv_metrics, stage_of(hparams, series), series)

wandb_metrics = {}  # stage -> {metric: (steps, values)}
wandb_files = sorted(RUN.glob("wandb/offline-run-*/run-*.wandb"))
if wandb_files:
    from ldm.utils.wandb_offline import read_history
for path in wandb_files:
    rows, info = read_history(path)
    series = {}
    for row in rows:
        step = row.get("trainer/global_step", row.get("_step"))
        images = tuple(
            k[: -len("_type")] for k in row if k.endswith("/_type")
        )  # image entries' fields
        for key, value in row.items():
            if (
                isinstance(value, int | float)
                and not key.startswith(("_", "trainer/", *images))
                and key != "epoch"
            ):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    add(wandb_metrics, stage_of(info.get("config", {}), series), series)

if not csv_metrics and not wandb_metrics:
    print(
        "no CSV or W&B metrics in this run (logger=null or tensorboard); "
        "the curves below stay empty"
    )
for source, metrics in (("CSV", csv_metrics), ("W&B", wandb_metrics)):
    for stage, series in metrics.items():
        shown = ", ".join(
            f"{k}={v[1][-1]:.4g}"
            for k, v in sorted(series.items())
            if k.startswith(("train/", "val/"))
        )
        print(f"{source} {stage}: {shown}")

# %% [markdown]
# **Figure 1 — losses of both stages.** Stage 1: reconstruction loss (L1) in training and
# validation; stage 2: the diffusion (noise-prediction MSE) loss. Look for: both falling; a
# validation curve that turns up while training keeps falling is overfitting. Stage 2's loss
# starts near 1 (predicting zero noise) and a model that learns goes clearly below it.

# %%
curves = {"autoencoder": ("train/loss", "val/rec_loss"), "diffusion": ("train/loss", "val/loss")}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
for ax, (stage, keys) in zip(axes, curves.items()):
    for key in keys:
        color = None
        if key in csv_metrics.get(stage, {}):
            (line,) = ax.plot(*csv_metrics[stage][key], "-", label=f"{key} (CSV)")
            color = line.get_color()
        if key in wandb_metrics.get(stage, {}):
            ax.plot(
                *wandb_metrics[stage][key],
                "x" if color else "x-",
                color=color,
                label=f"{key} (W&B)",
            )
    ax.set(title=f"{stage}", xlabel="global step", ylabel="loss")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend()
plt.show()

# %% [markdown]
# **Figure 2 — FID during training, and the class accuracy of samples (CAS).** FID of
# `val/fid_num_samples` generated images against the train split, with two reference lines:
# held-out real images (the floor) and Gaussian noise (the ceiling), both logged once per run.
# Look for: FID falling from near the ceiling towards the floor; CAS (samples of class k that
# the FID classifier calls k) rising from chance (1/classes). A quick run's FID stays near the
# ceiling.

# %%
diffusion = csv_metrics.get("diffusion") or wandb_metrics.get("diffusion") or {}
fig, (ax_fid, ax_cas) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
if "val/fid" in diffusion:
    n = int(diffusion["val/fid_num_samples"][1][-1]) if "val/fid_num_samples" in diffusion else "?"
    ax_fid.plot(*diffusion["val/fid"], "o-", label=f"val/fid (N={n})")
    for key, style in (("ref/fid_real_floor", "--"), ("ref/fid_noise_ceiling", ":")):
        if key in diffusion:
            ax_fid.axhline(diffusion[key][1][-1], color="gray", linestyle=style, label=key)
    ax_fid.set_yscale("log")
    ax_fid.legend()
else:
    print("no val/fid logged (fid.every_n_epochs=0 or stage 1 only)")
ax_fid.set(title="FID (classifier features)", xlabel="global step")
if "val/cas" in diffusion:
    ax_cas.plot(*diffusion["val/cas"], "o-", color="tab:green")
    num_classes = cfg_run.data.num_classes
    if num_classes:
        ax_cas.axhline(1 / num_classes, color="gray", linestyle="--", label="chance")
        ax_cas.legend()
ax_cas.set(title="CAS: class accuracy of samples", xlabel="global step", ylim=(0, 1))
for ax in (ax_fid, ax_cas):
    ax.grid(alpha=0.3)
plt.show()


# %% [markdown]
# ## 5. Sample grids over training
#
# Every validation epoch saves a PNG under the first logger's directory, in `images/`
# (`csv/version_<n>/images/` with the CSV logger first; W&B also receives them as images):
# stage 1 `val_reconstructions_<step>.png` (inputs on top, reconstructions below), stage 2
# `val_samples_<step>.png` (column k: class k).


# %%
def step_of(png):
    return int(png.stem.rsplit("_", 1)[-1])


grids = {}  # key (val_reconstructions, val_samples) -> PNGs sorted by step
for png in RUN.glob("**/images/val_*.png"):
    if "wandb" not in png.relative_to(RUN).parts:
        grids.setdefault(png.stem.rsplit("_", 1)[0], []).append(png)
for key, pngs in sorted(grids.items()):
    pngs.sort(key=step_of)
    steps = [step_of(p) for p in pngs]
    print(f"{key}: {len(pngs)} grids at steps {steps} in {pngs[0].parent.relative_to(RUN)}")

# %% [markdown]
# **Figure 3 — the saved grids, oldest left (at most six of each kind, evenly spaced).** Look for:
# reconstructions converging to their inputs; samples turning from blobs into digits of their
# column's class.

# %%
for key, pngs in sorted(grids.items()):
    shown = [pngs[round(i * (len(pngs) - 1) / 5)] for i in range(6)] if len(pngs) > 6 else pngs
    width, height = Image.open(shown[0]).size
    if width > 2 * height:  # wide grids (inputs over reconstructions): one per row
        fig, axes = plt.subplots(
            len(shown),
            1,
            figsize=(9, 0.5 + 9 * height / width * len(shown)),
            squeeze=False,
            layout="constrained",
        )
    else:
        fig, axes = plt.subplots(
            1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False, layout="constrained"
        )
    for ax, png in zip(axes.flat, shown):
        ax.imshow(Image.open(png).convert("RGB"))
        ax.set_title(f"step {step_of(png)}", fontsize=10)
        ax.axis("off")
    fig.suptitle(key)
    plt.show()

# %% [markdown]
# **Figure 4 — `final_samples.png`.** Drawn by the final (EMA) model after training, one column
# per class (column k: eight samples of class k) for conditional models. Look for: every column a
# recognisable, varied set of its digit; identical copies in a column would mean mode collapse.

# %%
final = RUN / "final_samples.png"
if final.is_file():
    fig, ax = plt.subplots(figsize=(5, 6))
    ax.imshow(Image.open(final).convert("RGB"))
    ax.set_title(f"final_samples.png ({cfg_run.sampler.name}, {cfg_run.sampler.steps} steps)")
    ax.axis("off")
    plt.show()
else:
    print("no final_samples.png (stage 1 only, or the run did not finish)")
ckpt = RUN / "checkpoints" / "diffusion" / "last.ckpt"
if ckpt.is_file():
    print(f"sample more: python sample.py ckpt={ckpt} num_samples=64 sampler=ddim sampler.steps=50")
