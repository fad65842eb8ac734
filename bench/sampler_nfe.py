"""Sampler NFE sweep: FID and time vs model evaluations for DDIM, DPM-Solver++ and DDPM on one
checkpoint.

For one trained stage-2 checkpoint: N images (every class equally often, no guidance, the same
seeded start noise for every setting) with DDIM (eta 0) and DPM-Solver++(2M) at NFE 10/20/50/100/250
and ancestral DDPM at NFE 1000; FID/KID/CAS on the project's classifier features against the
MNIST-5k train split; process CPU seconds and wall seconds of generation (decoding included).
Writes bench/results/sampler_nfe[_quick].{json,png}.

    python bench/sampler_nfe.py --quick      # trains a tiny model with ldm.train.run first
    python bench/sampler_nfe.py --ckpt .cache/bench/latent_vs_pixel.ckpt
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    FIDScorer,
    base_parser,
    format_table,
    machine_info,
    newest_checkpoint,
    sample_latent_model,
    setup_run,
    train_with_project,
    write_results,
)

CKPT_DIR = ROOT / ".cache" / "bench"
NFES = (10, 20, 50, 100, 250)
SWEEP = [*(("ddim", n) for n in NFES), *(("dpm_solver", n) for n in NFES), ("ddpm", 1000)]
LABELS = {"ddim": "DDIM", "dpm_solver": "DPM-Solver++(2M)", "ddpm": "DDPM"}


def train_checkpoint(args: Any, workdir: Path) -> tuple[Path, float | None]:
    """A stage-2 checkpoint from `ldm.train.run` (both stages): quick = debug=fast with a little
    more training and T = 1000 (so NFE 250 and 1000 exist); full = the default configs, shortened to
    2 + 8 epochs without EMA.
    Kept in `workdir` and reused by later runs (seconds None then); --retrain trains anew."""
    run_dir = workdir / "run"
    if run_dir.is_dir() and not args.retrain:
        try:
            return newest_checkpoint(run_dir, "diffusion"), None
        except FileNotFoundError:
            pass
    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    overrides = [
        "logger=csv",
        "fid.every_n_epochs=0",
        "callbacks.common.progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"seed={args.seed}",
    ]
    if args.quick:
        overrides += [
            "debug=fast",
            "schedule.num_timesteps=1000",
            "schedule.beta_end=0.02",
            "trainer.limit_train_batches=30",
            "diffusion.trainer.max_epochs=2",
        ]
    else:  # EMA off: with decay 0.999 a few hundred steps would average mostly the first ones
        overrides += [
            "autoencoder.trainer.max_epochs=2",
            "diffusion.trainer.max_epochs=8",
            "callbacks.diffusion.ema=null",
        ]
    cfg, seconds = train_with_project(overrides, workdir)
    return newest_checkpoint(Path(cfg.paths.output_dir), "diffusion"), seconds


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fid, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for name in LABELS:
        pts = [r for r in rows if r["sampler"] == name]
        style = (
            {"marker": "o"}
            if len(pts) > 1
            else {"marker": "*", "markersize": 12, "linestyle": "none"}
        )
        ax_fid.plot([r["nfe"] for r in pts], [r["fid"] for r in pts], label=LABELS[name], **style)
        ax_time.plot(
            [r["nfe"] for r in pts], [r["seconds_cpu"] for r in pts], label=LABELS[name], **style
        )
    for ax, ylabel in (
        (ax_fid, "FID (classifier features)"),
        (ax_time, "CPU seconds for N images"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("NFE (model evaluations per sample)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_time.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt", type=Path, default=None, help="stage-2 checkpoint (default: train one here)"
    )
    parser.add_argument("--num-samples", type=int, default=None, help="N images per setting")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--retrain", action="store_true", help="train the checkpoint anew (no --ckpt)"
    )
    parser.add_argument(
        "--no-ema", action="store_true", help="use the raw training weights of an EMA checkpoint"
    )
    args = parser.parse_args()
    setup_run(args)
    args.num_samples = args.num_samples or (60 if args.quick else 500)
    machine = machine_info("cpu")

    from ldm.diffusion.samplers import build_sampler
    from ldm.models.loading import load_latent_diffusion
    from ldm.modules.conditioning import even_class_labels
    from ldm.utils.instantiate import safe_instantiate

    train_s = None
    ckpt = args.ckpt
    if ckpt is None:
        ckpt, train_s = train_checkpoint(
            args, CKPT_DIR / f"sampler_nfe{'_quick' if args.quick else ''}"
        )
        how = "reused" if train_s is None else f"trained in {train_s:.0f} s wall"
        print(f"checkpoint {ckpt} ({how})")
    model, payload = load_latent_diffusion(ckpt, use_ema=not args.no_ema)
    config = payload["ldm"]["config"]
    datamodule = safe_instantiate(config["data"], where=f"checkpoint {str(ckpt)!r} (data)")
    classifier = dict(config.get("fid", {}).get("classifier") or {})
    scorer = FIDScorer(datamodule, {**classifier, "epochs": 1} if args.quick else classifier)
    labels = None
    if model.num_classes:
        labels = even_class_labels(args.num_samples, datamodule.num_classes)
    if labels is None:
        raise SystemExit(
            "sampler_nfe compares class-balanced samples; the checkpoint is unconditional"
        )
    floor = scorer.real_floor(datamodule, args.num_samples)
    print(f"real floor (N={args.num_samples} val images): FID {floor['fid']:.2f}")
    rows = []
    for name, nfe in SWEEP:
        if nfe > model.schedule.num_timesteps:
            print(
                f"skip {name} at NFE {nfe}: the schedule has {model.schedule.num_timesteps} steps"
            )
            continue
        sampler = build_sampler(name, model.schedule, steps=nfe)
        wall = time.perf_counter()
        images, cpu_s = sample_latent_model(
            model, sampler, labels, args.batch_size, args.seed, "cpu"
        )
        wall = time.perf_counter() - wall
        scores = scorer(images, labels)
        rows.append(
            {
                "sampler": name,
                "steps": sampler.steps,
                "nfe": sampler.nfe,
                **scores,
                "seconds_cpu": cpu_s,
                "seconds_wall": wall,
                "img_per_cpu_s": len(labels) / cpu_s,
            }
        )
        print(
            f"{name:10s} NFE {nfe:5d}: FID {scores['fid']:.2f}  "
            f"{cpu_s:.1f} CPU-s  {wall:.1f} s wall",
            flush=True,
        )

    by = {(r["sampler"], r["nfe"]): r for r in rows}
    summary = {}
    if ("dpm_solver", 20) in by and ("ddpm", 1000) in by:
        dpm, ddpm = by[("dpm_solver", 20)], by[("ddpm", 1000)]
        summary = {
            "dpm_solver_20_fid": dpm["fid"],
            "ddpm_1000_fid": ddpm["fid"],
            "fid_ratio_dpm20_over_ddpm1000": dpm["fid"] / ddpm["fid"],
            "speedup_dpm20_over_ddpm1000_cpu": ddpm["seconds_cpu"] / dpm["seconds_cpu"],
        }
    table = format_table(rows, COLUMNS)
    print(table)
    print(summary)
    stem = f"sampler_nfe{'_quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{stem}.png"
    plot(
        rows,
        png,
        f"{ckpt.name if args.ckpt else 'checkpoint trained here'}: N={args.num_samples}"
        f"{' (quick)' if args.quick else ''}",
    )
    result = write_results(
        "sampler_nfe",
        args.quick,
        {
            "machine": machine,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "checkpoint": {
                "path": str(ckpt),
                "trained_here_s_wall": train_s,
                "unet": config["model"]["diffusion"]["unet"],
                "schedule": config["schedule"],
                "ema": not args.no_ema,
            },
            "fid": scorer.describe,
            "real_floor": floor,
            "rows": rows,
            "summary": summary,
            "plot": png.name,
            "table": table,
        },
        args.out,
    )
    print(f"wrote {result} and {png}")


COLUMNS = [
    ("sampler", "sampler"),
    ("nfe", "NFE"),
    ("num_samples", "N"),
    ("fid", "FID"),
    ("kid", "KID"),
    ("cas", "CAS"),
    ("seconds_cpu", "CPU s"),
    ("seconds_wall", "wall s"),
    ("img_per_cpu_s", "img/CPU-s"),
]


if __name__ == "__main__":
    main()
