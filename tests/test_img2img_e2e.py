"""Image-to-image end to end: `train.py debug=fast task=superres|inpaint` trains both stages and
scores the outputs; `sample.py task=... input=...` and `init_image=...` (SDEdit) write outputs and a
side-by-side grid; the pre-conditioner checkpoint still loads, samples and edits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.models.loading import latent_diffusion_from_checkpoint
from ldm.utils.checkpoint import load_checkpoint
from tests.conftest import ROOT

OLD_CKPT = ROOT / "tests" / "fixtures" / "diffusion_6fef1e3_debug_fast.ckpt"


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def train(task: str, work: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = work / task
    result = run(
        "train.py",
        [
            "debug=fast",
            f"task={task}",
            f"paths.root_dir={work}",
            f"hydra.run.dir={run_dir}",
            *extra,
        ],
        work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, run_dir


def save_png(path: Path, array) -> Path:
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_superres_debug_fast_trains_scores_and_samples(tmp_path):
    result, run_dir = train("superres", tmp_path)
    metrics = json.loads((run_dir / "img2img_metrics.json").read_text())
    assert metrics["task"] == "superres" and set(metrics["rows"]) == {"bicubic", "ours"}
    assert {"psnr", "ssim", "fid", "cas"} <= set(metrics["rows"]["ours"])
    assert "| bicubic |" in (run_dir / "img2img_metrics.md").read_text()
    assert (run_dir / "final_samples.png").is_file() and "val/ours/fid=" in result.stdout
    ckpt = run_dir / "checkpoints" / "diffusion" / "last.ckpt"
    state = load_checkpoint(ckpt)["state_dict"]
    assert state["unet.conv_in.weight"].shape[1] == 4 + 1  # latent + low-res image

    inputs = tmp_path / "lowres"
    inputs.mkdir()
    for name in ("a", "b", "c"):
        save_png(inputs / f"{name}.png", np.random.default_rng(0).integers(0, 255, (8, 8)))
    out = tmp_path / "sr_out"
    result = run(
        "sample.py",
        [f"ckpt={ckpt}", "task=superres", f"input={inputs}", f"out_dir={out}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png", "grid.png"]
    assert Image.open(out / "a.png").size == (32, 32)
    assert Image.open(out / "grid.png").size == (3 * 34 + 2, 3 * 34 + 2)  # low-res | bicubic | ours
    record = json.loads((out / "samples.json").read_text())
    assert record["img2img"]["mode"] == "superres" and record["N"] == 3

    big = run_dir / "final_samples.png"
    args = [f"ckpt={ckpt}", "task=superres", f"input={big}", f"out_dir={tmp_path / 'bad'}"]
    wrong = run("sample.py", args, tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.strip().startswith("error: input:")
    assert len(wrong.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_inpaint_debug_fast_trains_scores_and_pastes(tmp_path):
    _, run_dir = train("inpaint", tmp_path, "callbacks.diffusion.img2img_metrics.extractor=null")
    metrics = json.loads((run_dir / "img2img_metrics.json").read_text())
    assert metrics["rows"]["ours"]["known_err"] == 0.0  # pasted back exactly
    assert 0.25 <= metrics["rows"]["ours"]["hole_fraction"] <= 0.55
    ckpt = run_dir / "checkpoints" / "diffusion" / "last.ckpt"
    state = load_checkpoint(ckpt)["state_dict"]
    assert state["unet.conv_in.weight"].shape[1] == 4 + 4 + 1  # latent + masked latent + mask

    image = np.random.default_rng(1).integers(0, 255, (32, 32))
    mask = np.zeros((32, 32))
    mask[8:20, 10:26] = 255
    out = tmp_path / "inpaint_out"
    args = [f"ckpt={ckpt}", "task=inpaint", f"input={save_png(tmp_path / 'x.png', image)}",
            f"mask={save_png(tmp_path / 'm.png', mask)}", f"out_dir={out}"]  # fmt: skip
    result = run("sample.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    filled = np.asarray(Image.open(out / "x.png"))
    known = mask == 0
    assert np.array_equal(filled[known], image[known])  # known pixels kept exactly
    assert not np.array_equal(filled[~known], image[~known])


def test_old_checkpoint_loads_samples_and_edits():
    """A checkpoint made before conditioners and concat existed (6fef1e3): plain and SDEdit."""
    ckpt = load_checkpoint(OLD_CKPT, expected_stage="diffusion")
    model = latent_diffusion_from_checkpoint(ckpt, OLD_CKPT)
    assert model.unet.concat_channels == 0
    g = torch.Generator().manual_seed(0)
    plain = model.sample(2, class_labels=[3, 4], guidance_scale=2.0, generator=g)
    assert plain.shape == (2, 1, 32, 32)
    x = plain.clone()
    same = model.sample(2, init_images=x, strength=0.01, generator=g)
    assert torch.equal(same, model.decode(model.encode(x)))
    edited = model.sample(2, init_images=x, strength=0.6, class_labels=[3, 4], generator=g)
    assert edited.shape == x.shape and not torch.equal(edited, same)
