"""NFE sweep: FID, precision/recall/coverage and wall time of the same N samples at several sampler
step counts.

`python sample.py ckpt=PATH nfe_sweep=[10,20,50,100] num_samples=500` runs it after the main
samples: each row regenerates N images with the same seed and labels at one step count, scores them
(ldm.metrics.sample_scores) and times them; the rows go to `nfe_sweep.{json,csv,png}` and a table.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.metrics.prdc import PRDC_KEYS
from ldm.utils.tables import format_table

# generate(sampler, progress description) -> (images (N, C, H, W) in [-1, 1], seconds)
Generate = Callable[[Any, str], tuple[torch.Tensor, float]]
# the sample scores of every table (key, header): fidelity and diversity side by side
SCORE_COLUMNS = [
    ("fid", "FID"),
    ("kid", "KID"),
    ("cas", "CAS"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("density", "density"),
    ("coverage", "coverage"),
]
TABLE_COLUMNS = [
    ("steps", "steps"),
    ("nfe", "NFE"),
    *SCORE_COLUMNS,
    ("seconds", "seconds"),
    ("images_per_second", "img/s"),
]
# evaluate(images, labels) -> {"fid", "kid", "cas", "precision", "recall", ..., "N", ...}
Evaluate = Callable[[torch.Tensor, torch.Tensor | None], Mapping[str, Any]]


def run_nfe_sweep(
    samplers: Mapping[int, Any],
    generate: Generate,
    evaluate: Evaluate,
    labels: torch.Tensor | None,
) -> list[dict[str, Any]]:
    """One row per step count: steps, nfe, fid, kid, cas, precision, recall, density, coverage,
    seconds, images_per_second, N."""
    rows = []
    for steps, sampler in samplers.items():
        images, seconds = generate(sampler, f"nfe sweep: {steps} steps")
        scores = evaluate(images, labels)
        rows.append(
            {
                "steps": steps,
                "nfe": sampler.nfe,
                "fid": scores["fid"],
                "kid": scores["kid"],
                "cas": scores["cas"],
                **{key: scores[key] for key in PRDC_KEYS},
                "seconds": seconds,
                "images_per_second": len(images) / seconds,
                "N": scores["N"],
            }
        )
    return rows


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


def write_nfe_sweep(rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> list[str]:
    """`nfe_sweep.json` (info + rows), `.csv` (rows) and `.png` (plot) in `out`; the file names.
    `info` holds sampler, N, extractor, guidance settings and device."""
    (out / "nfe_sweep.json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    with open(out / "nfe_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"{info['sampler']}, N={info['N']}, {info['device']}"
    plot_nfe_sweep(rows, title, out / "nfe_sweep.png")
    print(f"NFE sweep ({info['sampler']}, N={info['N']}, {info['extractor']} features):")
    print(format_table(rows, TABLE_COLUMNS))
    return ["nfe_sweep.json", "nfe_sweep.csv", "nfe_sweep.png"]
