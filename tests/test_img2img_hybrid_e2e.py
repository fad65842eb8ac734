"""Image-to-image with the class (`task=inpaint conditioning=hybrid`) end to end: trained and
scored with and without the label; `sample.py` fills for an asked class. Its own module so that
pytest-xdist (--dist loadscope) can run it beside the other image-to-image end-to-end tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldm.utils.checkpoint import load_checkpoint
from tests.test_img2img_e2e import run, save_png, train


@pytest.mark.slow
def test_hybrid_inpaint_is_told_the_class_in_training_and_sampling(tmp_path):
    """task=inpaint conditioning=hybrid: scored with and without the label; sample.py fills the
    hole for the asked class (guided), or unguided without one; guidance without a label is a
    one-line error."""
    _, run_dir = train(
        "inpaint",
        tmp_path,
        "conditioning=hybrid",
        "callbacks.diffusion.img2img_metrics.extractor=null",
    )
    metrics = json.loads((run_dir / "img2img_metrics.json").read_text())
    assert metrics["rows"]["ours without label"]["psnr"] > 0
    assert metrics["grid_columns"] == "masked | ours | ours without label | original"
    ckpt = run_dir / "checkpoints" / "diffusion" / "last.ckpt"
    assert load_checkpoint(ckpt)["state_dict"]["unet.class_embed.weight"].shape[0] == 11

    image = np.random.default_rng(1).integers(0, 255, (32, 32))
    mask = np.zeros((32, 32))
    mask[4:28, 8:24] = 255
    x, m = save_png(tmp_path / "x.png", image), save_png(tmp_path / "m.png", mask)
    filled = {}
    for name, extra in [("none", []), ("three", ["class_label=3", "guidance_scale=3"]),
                        ("seven", ["class_label=7", "guidance_scale=3"])]:  # fmt: skip
        out = tmp_path / name
        args = [f"ckpt={ckpt}", "task=inpaint", f"input={x}", f"mask={m}", f"out_dir={out}", *extra]
        result = run("sample.py", args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        filled[name] = np.asarray(Image.open(out / "x.png"))
        assert np.array_equal(filled[name][mask == 0], image[mask == 0])
    assert not np.array_equal(filled["three"], filled["seven"])  # the label reaches the model
    assert not np.array_equal(filled["none"], filled["three"])
    bad = [f"ckpt={ckpt}", "task=inpaint", f"input={x}", f"mask={m}", "guidance_scale=3",
           f"out_dir={tmp_path / 'bad'}"]  # fmt: skip
    wrong = run("sample.py", bad, tmp_path)
    assert wrong.returncode == 2 and "needs class_label" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
