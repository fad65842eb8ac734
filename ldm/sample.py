"""Sampling entry: `run(cfg)` generates images from a stage-2 checkpoint alone (conf/sample.yaml).

Order of work: every setting is validated (plain values, then the checkpoint, then what depends on
the model: labels, sampler, data for FID) before `out_dir` is created, so bad input writes nothing.
Then images are generated in batches from one seeded CPU generator (the same seed and settings
give byte-identical PNGs on CPU) and written as `00000.png`..., `grid.png` and `samples.json`;
optionally `trajectory.png`, `metrics.json` (fid=true) and `nfe_sweep.{json,csv,png}`.

torch, Lightning and the metrics are imported inside the functions that need them: a typo in a
plain setting is reported in a fraction of a second instead of after ~10 s of imports.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.utils.errors import UserError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("32", "bf16", "16")


# ---------------------------------------------------------------------------- plain settings
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if not _is_int(value) or value <= 0:
        raise UserError(f"{key}={value!r} must be a positive integer")
    return value


def _bool(cfg: DictConfig, key: str) -> bool:
    value = cfg.get(key)
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} must be true or false")
    return value


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain lists/dicts; anything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


@dataclass
class Settings:
    """The validated sampling settings (everything that does not need the checkpoint)."""

    ckpt: Path
    num_samples: int
    batch_size: int
    seed: int
    steps: int
    use_ema: bool
    device: str
    precision: str
    class_label: int | list[int] | None
    guidance_scale: float
    out_dir: Path
    grid_images: int
    trajectory: bool
    trajectory_samples: int
    trajectory_steps: int
    fid: bool
    nfe_sweep: list[int] = field(default_factory=list)


def check_settings(cfg: DictConfig) -> Settings:
    """Validate every plain value of the sampling config; UserError (one line) on the first bad one."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise UserError("ckpt is required: python sample.py ckpt=PATH (a stage-2 checkpoint)")
    for key in (
        "num_samples",
        "batch_size",
        "sampler.steps",
        "trajectory_samples",
        "trajectory_steps",
    ):
        _positive_int(cfg, key)
    if not _is_int(cfg.seed):
        raise UserError(f"seed={cfg.seed!r} must be an integer")
    if not _is_int(cfg.grid_images) or cfg.grid_images < 0:
        raise UserError(f"grid_images={cfg.grid_images!r} must be an integer >= 0 (0: no grid.png)")
    flags = {key: _bool(cfg, key) for key in ("use_ema", "trajectory", "fid")}

    precision = str(cfg.precision)
    if precision not in PRECISIONS:
        raise UserError(f"precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    device = str(cfg.device)
    if device not in ("auto", "cpu", "cuda") and not (
        device.startswith("cuda:") and device[5:].isdigit()
    ):
        raise UserError(f"device={cfg.device!r} is not one of auto, cpu, cuda, cuda:N")

    scale = cfg.guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise UserError(f"guidance_scale={scale!r} must be a finite number")

    label = _plain(cfg.class_label)
    if isinstance(label, list):
        if not label or not all(_is_int(x) for x in label):
            raise UserError(
                f"class_label={label!r} must be null, an integer or a non-empty list of integers"
            )
        if len(label) > cfg.num_samples:
            raise UserError(
                f"class_label has {len(label)} entries but num_samples={cfg.num_samples}; "
                "give at most num_samples labels"
            )
    elif label is not None and not _is_int(label):
        raise UserError(f"class_label={label!r} must be null, an integer or a list of integers")

    sweep = _plain(cfg.nfe_sweep)
    if sweep is not None:
        if not isinstance(sweep, list) or not sweep or not all(_is_int(n) and n > 0 for n in sweep):
            raise UserError(
                f"nfe_sweep={sweep!r} must be null or a non-empty list of positive step counts"
            )
    if (flags["fid"] or sweep) and cfg.num_samples < 2:
        raise UserError(
            f"num_samples={cfg.num_samples} is too few for FID (fid / nfe_sweep); use >= 2"
        )

    ckpt = Path(str(cfg.ckpt))
    if not ckpt.is_file():  # checked here too: answers before torch is imported
        raise UserError(f"ckpt={str(ckpt)!r} does not exist or is not a file")
    out_dir = Path(str(cfg.out_dir))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(
            f"out_dir={str(out_dir)!r} already exists and is not empty; choose a new out_dir"
        )

    return Settings(
        ckpt=ckpt,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        steps=cfg.sampler.steps,
        use_ema=flags["use_ema"],
        device=device,
        precision=precision,
        class_label=label,
        guidance_scale=float(scale),
        out_dir=out_dir,
        grid_images=cfg.grid_images,
        trajectory=flags["trajectory"],
        trajectory_samples=cfg.trajectory_samples,
        trajectory_steps=cfg.trajectory_steps,
        fid=flags["fid"],
        nfe_sweep=list(sweep or []),
    )


# ---------------------------------------------------------------------------- torch-side checks
def resolve_device(device: str, precision: str) -> torch.device:
    """`auto` -> cuda if available else cpu; refuses cuda without a GPU and fp16 on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={device!r} but CUDA is not available here; use device=cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif precision == "16":
        raise UserError("precision=16 needs device=cuda; on the CPU use precision=32 or bf16")
    return resolved


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Mixed-precision context for `precision` (32: none)."""
    import torch

    if precision == "32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_labels(
    class_label: int | list[int] | None,
    num_samples: int,
    num_classes: int | None,
    guidance_scale: float,
) -> torch.Tensor | None:
    """The label of every sample, LongTensor (num_samples,), or None for unconditional models.

    None on a conditional model: an even spread, sample i gets class i mod K; an int: all samples;
    a list: sample i gets list[i mod len(list)].
    """
    import torch

    if num_classes is None:
        if class_label is not None:
            raise UserError(
                f"class_label={class_label!r} given but the checkpoint's model is unconditional"
            )
        if guidance_scale != 1.0:
            raise UserError(
                f"guidance_scale={guidance_scale} needs a class-conditional model; this one is "
                "unconditional (use guidance_scale=1)"
            )
        return None
    if class_label is None:
        return torch.arange(num_samples) % num_classes  # (N,) 0..K-1, 0..K-1, ...
    chosen = class_label if isinstance(class_label, list) else [class_label]
    for label in chosen:
        if not 0 <= label < num_classes:
            raise UserError(
                f"class_label={label} is outside the model's classes 0..{num_classes - 1}"
            )
    return torch.tensor(chosen, dtype=torch.long)[torch.arange(num_samples) % len(chosen)]  # (N,)


def build_sampler(sampler_cfg: DictConfig, schedule: Any, what: str, **overrides: Any) -> Any:
    """`instantiate(cfg.sampler)(schedule=...)` with the sampler's ValueErrors as UserErrors."""
    from hydra.utils import instantiate

    try:
        return instantiate(sampler_cfg)(schedule=schedule, **overrides)
    except (ValueError, TypeError) as err:
        raise UserError(f"{what}: {str(err).splitlines()[0]}") from err


# ---------------------------------------------------------------------------- generation
@dataclass
class TrajectoryRecorder:
    """Sampler callback keeping the x0 predictions (latents) of the first `num_samples` samples."""

    num_samples: int
    timesteps: list[int] = field(default_factory=list)
    x0_preds: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        self.timesteps.append(int(t))
        self.x0_preds.append(x0_pred[: self.num_samples].detach().float().cpu())  # (k, c, h, w)


def generate(
    model: Any,
    sampler: Any,
    settings: Settings,
    labels: torch.Tensor | None,
    device: torch.device,
    desc: str,
    callback: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, float]:
    """All `settings.num_samples` images (N, C, H, W) float32 on the CPU in [-1, 1], and the seconds
    spent generating them. One CPU generator seeded once draws all noise, batch after batch;
    `callback` sees the sampler steps of the first batch only."""
    import torch
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(settings.seed)
    n, bs = settings.num_samples, settings.batch_size
    scale = settings.guidance_scale if labels is not None else 1.0
    images = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    # disable=None: a bar on terminals, nothing in logs and pipes.
    for i in tqdm(range(0, n, bs), desc=desc, unit="batch", disable=None):
        batch_labels = labels[i : i + bs].to(device) if labels is not None else None
        with autocast(device, settings.precision):
            batch = model.sample(
                min(bs, n - i),
                class_labels=batch_labels,
                guidance_scale=scale,
                generator=generator,
                sampler=sampler,
                callback=callback if i == 0 else None,
            )  # (B, C, H, W)
        images.append(batch.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(images), time.perf_counter() - start  # (N, C, H, W)


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """Images (N, C, H, W) in [-1, 1] as one PNG grid with `nrow` images per row."""
    from torchvision.utils import make_grid, save_image

    from ldm.utils.images import to_display_range

    save_image(make_grid(to_display_range(images), nrow=nrow, padding=2), path)


def save_trajectory(
    model: Any,
    recorder: TrajectoryRecorder,
    columns: int,
    device: torch.device,
    precision: str,
    path: Path,
) -> list[int]:
    """Decoded x0 predictions as one image: a row per sample, `columns` evenly spaced steps from the
    first (t = T-1: a blurry mean) to the last (the final sample). Returns the timesteps shown."""
    import torch

    steps = len(recorder.x0_preds)
    picks = torch.linspace(0, steps - 1, min(columns, steps)).round().long().unique().tolist()
    latents = torch.stack([recorder.x0_preds[j] for j in picks], dim=1)  # (k, m, c, h, w)
    m = latents.shape[1]
    with autocast(device, precision):
        images = model.decode(latents.flatten(0, 1).to(device)).float().cpu()  # (k * m, C, H, W)
    save_grid(images, path, nrow=m)
    return [recorder.timesteps[j] for j in picks]


# ---------------------------------------------------------------------------- FID
@dataclass
class Evaluator:
    """FID/KID/CAS against the train split of the checkpoint's dataset (ldm.metrics.fid)."""

    extractor: Any
    classifier: Any
    reals: Any
    real_cache: Path
    metrics_cfg: DictConfig
    dataset: str

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
        )
        return {
            "fid": scores["fid"],
            "kid": scores["kid"],
            "kid_std": scores["kid_std"],
            "cas": scores.get("cas"),
            "N": scores["num_samples"],
            "num_real": scores["num_real"],
        }


def build_evaluator(
    ckpt: Mapping[str, Any], path: Path, metrics_cfg: DictConfig, device: torch.device
) -> Evaluator:
    """Rebuild the checkpoint's data module from its stored config (allowlisted targets only), get
    the feature extractor (training the FID classifier once, cached) and the real-feature cache."""
    from ldm.metrics.fid import build_extractor, real_features_path
    from ldm.utils.instantiate import safe_instantiate

    data_cfg = ckpt["ldm"]["config"].get("data")
    if not isinstance(data_cfg, Mapping):
        raise UserError(
            f"checkpoint {str(path)!r} stores no data config; fid/nfe_sweep need the dataset"
        )
    try:
        datamodule = safe_instantiate(data_cfg, where=f"checkpoint {str(path)!r} (data)")
        datamodule.setup("fit")
        extractor, classifier = build_extractor(
            metrics_cfg.extractor,
            datamodule,
            metrics_cfg.cache_dir,
            metrics_cfg.get("inception_weights"),
            _plain(metrics_cfg.get("classifier")),
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
    )


def run_nfe_sweep(
    model: Any,
    samplers: dict[int, Any],
    settings: Settings,
    labels: torch.Tensor | None,
    device: torch.device,
    evaluate: Evaluator,
) -> list[dict[str, Any]]:
    """FID and wall time of `num_samples` images at each step count (same seed each time)."""
    rows = []
    for steps, sampler in samplers.items():
        images, seconds = generate(
            model, sampler, settings, labels, device, f"nfe sweep: {steps} steps"
        )
        scores = evaluate(images, labels)
        rows.append(
            {
                "steps": steps,
                "nfe": sampler.nfe,
                "fid": scores["fid"],
                "kid": scores["kid"],
                "cas": scores["cas"],
                "seconds": seconds,
                "images_per_second": settings.num_samples / seconds,
                "N": scores["N"],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'steps':>6} {'NFE':>6} {'FID':>10} {'KID':>10} {'CAS':>6} {'seconds':>9} {'img/s':>9}"
    )
    lines = [header]
    for r in rows:
        cas = f"{r['cas']:.3f}" if r["cas"] is not None else "-"
        lines.append(
            f"{r['steps']:>6} {r['nfe']:>6} {r['fid']:>10.3f} {r['kid']:>10.5f} {cas:>6} "
            f"{r['seconds']:>9.2f} {r['images_per_second']:>9.1f}"
        )
    return "\n".join(lines)


def plot_nfe_sweep(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """FID vs NFE and wall time vs NFE side by side (Agg canvas, no display needed)."""
    from matplotlib.figure import Figure

    nfe = [r["nfe"] for r in rows]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_fid, ax_time = fig.subplots(1, 2)
    ax_fid.plot(nfe, [r["fid"] for r in rows], "o-")
    ax_fid.set(
        xscale="log", xlabel="NFE (model evaluations per sample)", ylabel="FID", title="FID vs NFE"
    )
    ax_time.plot(nfe, [r["seconds"] for r in rows], "o-", color="tab:orange")
    ax_time.set(
        xscale="log",
        xlabel="NFE (model evaluations per sample)",
        ylabel="seconds",
        title=f"wall time of N={rows[0]['N']} vs NFE",
    )
    for ax in (ax_fid, ax_time):
        ax.minorticks_off()  # log-axis minor labels (3x10^0 ...) would clutter the NFE ticks
        ax.set_xticks(nfe, [str(x) for x in nfe])
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------- entry
def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, generate, write; returns the content of samples.json (plus metrics / sweep rows)."""
    settings = check_settings(cfg)

    import torch

    from ldm.utils.checkpoint import file_sha256, load_checkpoint

    device = resolve_device(settings.device, settings.precision)
    ckpt = load_checkpoint(settings.ckpt, expected_stage="diffusion")

    from ldm.models.loading import latent_diffusion_from_checkpoint

    model = latent_diffusion_from_checkpoint(ckpt, settings.ckpt, use_ema=settings.use_ema).to(
        device
    )
    labels = resolve_labels(
        settings.class_label, settings.num_samples, model.num_classes, settings.guidance_scale
    )
    sampler = build_sampler(cfg.sampler, model.schedule, f"sampler={cfg.sampler.name}")
    sweep_samplers = {
        n: build_sampler(
            cfg.sampler,
            model.schedule,
            f"nfe_sweep entry {n} (sampler={cfg.sampler.name})",
            steps=n,
        )
        for n in settings.nfe_sweep
    }
    evaluate = None
    if settings.fid or sweep_samplers:
        evaluate = build_evaluator(ckpt, settings.ckpt, cfg.metrics, device)

    # ---- everything is valid: write
    out = settings.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out_dir={str(out)!r} cannot be created ({err.strerror})") from err

    recorder = TrajectoryRecorder(settings.trajectory_samples) if settings.trajectory else None
    images, seconds = generate(model, sampler, settings, labels, device, "sampling", recorder)
    from ldm.utils.images import save_png

    for i, image in enumerate(images):
        save_png(image, out / f"{i:05d}.png")
    files = [f"{0:05d}.png .. {len(images) - 1:05d}.png"]
    if settings.grid_images:
        shown = images[: settings.grid_images]
        spread = labels is not None and settings.class_label is None
        nrow = min(model.num_classes, len(shown)) if spread else math.ceil(math.sqrt(len(shown)))
        save_grid(shown, out / "grid.png", nrow=nrow)
        files.append("grid.png")
    trajectory = None
    if recorder is not None:
        shown_t = save_trajectory(
            model,
            recorder,
            settings.trajectory_steps,
            device,
            settings.precision,
            out / "trajectory.png",
        )
        trajectory = {
            "file": "trajectory.png",
            "samples": recorder.x0_preds[0].shape[0],
            "timesteps": shown_t,
        }
        files.append("trajectory.png")

    stored = ckpt["ldm"]["config"]
    record: dict[str, Any] = {
        "checkpoint": {
            "path": str(settings.ckpt.resolve()),
            "sha256": file_sha256(settings.ckpt),
            "stage": ckpt["ldm"]["stage"],
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "dataset": (stored.get("data") or {}).get("name"),
        },
        "weights": "ema" if settings.use_ema and "current_model_state" in ckpt else "raw",
        "config": {k: _plain(v) for k, v in cfg.items() if k != "hydra"},
        "sampler": {
            "name": cfg.sampler.name,
            "steps": sampler.steps,
            "nfe": sampler.nfe,
            "repr": repr(sampler),
        },
        "device": str(device),
        "precision": settings.precision,
        "N": len(images),
        "image_shape": list(images.shape[1:]),
        "num_classes": model.num_classes,
        "guidance_scale": settings.guidance_scale if labels is not None else 1.0,
        "labels": labels.tolist() if labels is not None else None,
        "timing": {
            "seconds": seconds,
            "images_per_second": len(images) / seconds,
            "batch_size": settings.batch_size,
        },
        "trajectory": trajectory,
        "torch": torch.__version__,
        "files": [*files, "samples.json"],
    }
    write_json(record, out / "samples.json")  # now, so a failing evaluation below keeps it
    print(
        f"sampled {len(images)} images ({record['sampler']['name']}, {sampler.steps} steps, "
        f"{record['weights']} weights, {device}, precision {settings.precision}) in {seconds:.2f}s "
        f"({record['timing']['images_per_second']:.1f} images/s) -> {out}"
    )

    if settings.fid:
        scores = evaluate(images, labels)
        metrics = {
            **scores,
            "extractor": cfg.metrics.extractor,
            "dataset": evaluate.dataset,
            "sampler": record["sampler"]["name"],
            "steps": sampler.steps,
            "guidance_scale": record["guidance_scale"],
            "checkpoint_sha256": record["checkpoint"]["sha256"],
        }
        write_json(metrics, out / "metrics.json")
        record["metrics"] = metrics
        record["files"].append("metrics.json")
        cas = f", CAS {scores['cas']:.3f}" if scores["cas"] is not None else ""
        print(
            f"FID {scores['fid']:.3f}, KID {scores['kid']:.5f}{cas} (N={scores['N']} vs "
            f"{scores['num_real']} real, {cfg.metrics.extractor} features)"
        )

    if sweep_samplers:
        rows = run_nfe_sweep(model, sweep_samplers, settings, labels, device, evaluate)
        sweep = {
            "sampler": cfg.sampler.name,
            "N": settings.num_samples,
            "extractor": cfg.metrics.extractor,
            "guidance_scale": record["guidance_scale"],
            "device": str(device),
            "rows": rows,
        }
        write_json(sweep, out / "nfe_sweep.json")
        with open(out / "nfe_sweep.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot_nfe_sweep(
            rows, f"{cfg.sampler.name}, N={settings.num_samples}, {device}", out / "nfe_sweep.png"
        )
        record["nfe_sweep"] = rows
        record["files"] += ["nfe_sweep.json", "nfe_sweep.csv", "nfe_sweep.png"]
        print(
            f"NFE sweep ({cfg.sampler.name}, N={settings.num_samples}, {cfg.metrics.extractor} features):"
        )
        print(format_table(rows))

    write_json(record, out / "samples.json")
    return record
