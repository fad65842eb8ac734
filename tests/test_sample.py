"""sample.py / ldm.sample on a tiny class-conditional stage-2 checkpoint: determinism, files
written, guidance, bad inputs (one stderr line, exit 2, nothing written), hostile checkpoints, FID,
NFE sweep."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from PIL import Image

from ldm.models.loading import load_latent_diffusion
from ldm.sample import SampleConfig, default_guidance_scale, resolve_labels, run
from ldm.train import run as train_run
from ldm.utils.checkpoint import file_sha256
from ldm.utils.errors import UserError
from ldm.utils.images import save_png
from tests.conftest import compose_config
from tests.train_cli import sample_cli

# debug=fast (tiny autoencoder and UNet with 10 classes, T=100, EMA) on sklearn digits at 16x16.
TINY = ["debug=fast", "data=digits", "data.image_size=16", "fid.every_n_epochs=0"]
# Sampling settings of the tests: few steps, the stochastic DDPM sampler so that the sampler's own
# noise (not only x_T) must come from the seeded generator for runs to repeat.
FAST = ["device=cpu", "sampler=ddpm", "sampler.steps=4", "num_samples=5", "batch_size=3"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of a `debug=fast` ldm.train.run (stage 1 and stage 2), and `conditioned`: that
    stage-2 checkpoint with noise added to the UNet weights (raw and EMA). Three training batches
    leave the zero-initialised output conv near zero, so labels and guidance would not change a
    single pixel; the perturbed weights make their effect visible."""
    root = tmp_path_factory.mktemp("sample_ckpt")
    cfg = compose_config(TINY, root)
    train_run(cfg)
    stage1 = root / "run" / "checkpoints" / "autoencoder" / "last.ckpt"
    stage2 = root / "run" / "checkpoints" / "diffusion" / "last.ckpt"
    ckpt = torch.load(stage2, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for weights in ("state_dict", "current_model_state"):  # EMA and raw weights
        for name, tensor in ckpt[weights].items():
            if name.startswith("unet.") and tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.1)
    conditioned = root / "conditioned.ckpt"
    torch.save(ckpt, conditioned)
    return {"stage1": stage1, "stage2": stage2, "conditioned": conditioned}


def sample_cfg(tmp_path: Path, ckpt: Path, *overrides: str, out: str = "out", fid: bool = False):
    cfg = compose_config(
        [f"ckpt={ckpt}", f"out_dir={tmp_path / out}", *FAST, *overrides],
        tmp_path,
        config_name="sample",
    )
    with open_dict(cfg):
        cfg.fid = fid  # `fid=true` on the command line is handled by sample.py (group-name clash)
    return cfg


def png_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


# ------------------------------------------------------------------------------ in-process runs
@pytest.fixture(scope="module")
def seeded_runs(checkpoints, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Seed 0 twice (the first also draws the trajectory), seed 1, seed 0 with the raw weights."""
    tmp = tmp_path_factory.mktemp("seeded")
    ckpt = checkpoints["conditioned"]
    runs = {}
    for name, extra in {
        "a": ["seed=0", "trajectory=true", "trajectory_samples=2", "trajectory_steps=3"],
        "b": ["seed=0"],
        "c": ["seed=1"],
        "raw": ["seed=0", "use_ema=false"],
    }.items():
        record = run(sample_cfg(tmp, ckpt, *extra, out=name))
        runs[name] = (tmp / name, record)
    return runs


def test_same_seed_same_png_bytes_other_seed_differs(seeded_runs):
    (out_a, _), (out_b, _), (out_c, _) = seeded_runs["a"], seeded_runs["b"], seeded_runs["c"]
    a, b, c = png_bytes(out_a), png_bytes(out_b), png_bytes(out_c)
    samples = [f"{i:05d}.png" for i in range(5)]
    assert all(a[name] == b[name] for name in [*samples, "grid.png"])
    assert all(a[name] != c[name] for name in samples)


def test_ema_and_raw_weights(seeded_runs):
    (out_ema, ema), (out_raw, raw) = seeded_runs["a"], seeded_runs["raw"]
    assert (ema["weights"], raw["weights"]) == ("ema", "raw")
    assert png_bytes(out_ema)["00000.png"] != png_bytes(out_raw)["00000.png"]


def test_files_and_samples_json(seeded_runs, checkpoints):
    out, record = seeded_runs["a"]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        *(f"{i:05d}.png" for i in range(5)),
        "grid.png",
        "samples.json",
        "trajectory.png",
    ]
    for i in range(5):
        image = Image.open(out / f"{i:05d}.png")
        assert (image.mode, image.size) == ("L", (16, 16))
    # grid: 5 samples spread over the 10 classes -> one row of 5 (column = class), padding 2
    assert Image.open(out / "grid.png").size == (5 * 18 + 2, 18 + 2)
    saved = json.loads((out / "samples.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["checkpoint"]["sha256"] == file_sha256(checkpoints["conditioned"])
    assert saved["checkpoint"]["stage"] == "diffusion"
    assert saved["N"] == 5 and saved["num_classes"] == 10
    assert saved["labels"] == [0, 1, 2, 3, 4]  # even spread over the classes
    assert saved["sampler"] == {**saved["sampler"], "name": "ddpm", "steps": 4, "nfe": 4}
    assert saved["config"]["seed"] == 0 and saved["config"]["sampler"]["steps"] == 4
    assert saved["config"]["batch_size"] == 3 and saved["config"]["ckpt"] == str(
        checkpoints["conditioned"]
    )
    timing = saved["timing"]
    assert timing["seconds"] > 0
    assert timing["images_per_second"] == pytest.approx(5 / timing["seconds"])
    # trajectory: 2 samples x 3 of the 4 steps (first and last included), decoded 16x16 images
    assert saved["trajectory"]["timesteps"][0] == 99 and len(saved["trajectory"]["timesteps"]) == 3
    assert Image.open(out / "trajectory.png").size == (3 * 18 + 2, 2 * 18 + 2)


def test_guidance_and_labels(checkpoints, tmp_path):
    ckpt = checkpoints["conditioned"]
    labels = ["class_label=[3,7]", "num_samples=4", "batch_size=4"]
    guided = run(sample_cfg(tmp_path, ckpt, *labels, "guidance_scale=3", out="g3"))
    plain = run(sample_cfg(tmp_path, ckpt, *labels, "guidance_scale=1", out="g1"))
    assert guided["labels"] == plain["labels"] == [3, 7, 3, 7]
    assert guided["guidance_scale"] == 3.0
    assert png_bytes(tmp_path / "g3") != png_bytes(tmp_path / "g1")

    # Guidance interval above every step's sigma: unguided; rescale changes the images.
    never_cfg = sample_cfg(
        tmp_path, ckpt, *labels, "guidance_scale=3", "guidance_interval=[1e9,null]", out="never"
    )
    never = run(never_cfg)
    assert never["guidance_interval"] == [1e9, None] and never["guidance_rescale"] == 0.0
    assert png_bytes(tmp_path / "never") == png_bytes(tmp_path / "g1")
    rescaled = run(
        sample_cfg(tmp_path, ckpt, *labels, "guidance_scale=3", "guidance_rescale=0.7", out="r")
    )
    assert rescaled["guidance_rescale"] == 0.7 and guided["guidance_interval"] is None
    assert png_bytes(tmp_path / "r") not in (png_bytes(tmp_path / "g3"), png_bytes(tmp_path / "g1"))
    with pytest.raises(UserError, match=r"^guidance_interval=\[2.0, 1.0\] needs 0 <= sigma_lo"):
        run(sample_cfg(tmp_path, ckpt, "guidance_interval=[2.0,1.0]", out="bad"))
    assert not (tmp_path / "bad").exists()

    # guidance_scale=1 is plain conditional sampling: the model's own sample() with these labels
    model, _ = load_latent_diffusion(ckpt)
    sampler = hydra.utils.instantiate(sample_cfg(tmp_path, ckpt, out="unused").sampler)(
        schedule=model.schedule
    )
    images = model.sample(
        4,
        class_labels=torch.tensor([3, 7, 3, 7]),
        generator=torch.Generator().manual_seed(0),
        sampler=sampler,
    )
    for i, image in enumerate(images):
        save_png(image, tmp_path / f"direct{i}.png")
        assert (tmp_path / f"direct{i}.png").read_bytes() == (
            tmp_path / "g1" / f"{i:05d}.png"
        ).read_bytes()

    # a single int label applies to every sample
    single = run(sample_cfg(tmp_path, ckpt, "class_label=9", out="single"))
    assert single["labels"] == [9] * 5


def test_schema_types_and_defaults_of_sample_yaml(tmp_path):
    """conf/sample.yaml is built on the dataclass SampleConfig: its defaults, and Hydra itself
    refuses a value of the wrong type while composing."""
    cfg = compose_config(["ckpt=x", "precision=16"], tmp_path, config_name="sample")
    assert OmegaConf.get_type(cfg) is SampleConfig
    assert (cfg.num_samples, cfg.use_ema, cfg.precision, cfg.nfe_sweep) == (64, True, "16", None)
    assert cfg.sampler.name == "dpm_solver_sde" and cfg.metrics.extractor == "auto"
    for bad in ("num_samples=abc", "guidance_scale=x", "nfe_sweep=[a]", "trajectory=maybe"):
        with pytest.raises(ConfigCompositionException):
            compose_config([bad], tmp_path, config_name="sample")


def test_resolve_labels():
    assert resolve_labels(None, 12, 10, 1.0).tolist() == [*range(10), 0, 1]
    assert resolve_labels(4, 3, 10, 2.0).tolist() == [4, 4, 4]
    assert resolve_labels([1, 2], 5, 10, 1.0).tolist() == [1, 2, 1, 2, 1]
    assert resolve_labels(None, 3, None, 1.0) is None
    with pytest.raises(UserError, match=r"class_label=-1 is outside the model's classes 0\.\.9"):
        resolve_labels([2, -1], 3, 10, 1.0)
    with pytest.raises(
        UserError, match="class_label=3 given but the checkpoint's model is unconditional"
    ):
        resolve_labels(3, 3, None, 1.0)
    with pytest.raises(UserError, match=r"guidance_scale=2\.0 needs a class-conditional model"):
        resolve_labels(None, 3, None, 2.0)


def test_default_guidance_is_the_models_own_where_there_is_a_condition(checkpoints, tmp_path):
    """`sample.py ckpt=PATH` samples as the model's training grids and FID did (its
    val_guidance_scale, 2 for the default model), not unguided."""
    ckpt = torch.load(checkpoints["conditioned"], weights_only=True)
    ckpt["ldm"]["config"]["model"]["diffusion"]["val_guidance_scale"] = 3.0
    path = tmp_path / "g3_model.ckpt"
    torch.save(ckpt, path)
    default = run(sample_cfg(tmp_path, path, out="default"))
    explicit = run(sample_cfg(tmp_path, path, "guidance_scale=3", out="explicit"))
    assert default["guidance_scale"] == explicit["guidance_scale"] == 3.0
    assert png_bytes(tmp_path / "default") == png_bytes(tmp_path / "explicit")
    assert run(sample_cfg(tmp_path, path, "guidance_scale=1", out="g1"))["guidance_scale"] == 1.0
    # nothing to guide towards: unconditional sampling, a text model without prompts, img2img
    # without a class label
    cfg = sample_cfg(tmp_path, path, out="unused")
    hparams = {"val_guidance_scale": 3.0}
    for model in (
        SimpleNamespace(takes_labels=False, takes_prompts=False, hparams=hparams),
        SimpleNamespace(takes_labels=False, takes_prompts=True, hparams=hparams),
    ):
        assert default_guidance_scale(cfg, model, None) == 1.0
    labeled = SimpleNamespace(takes_labels=True, takes_prompts=False, hparams=hparams)
    assert default_guidance_scale(cfg, labeled, {"mode": "inpaint"}) == 1.0
    with open_dict(cfg):
        cfg.class_label = 7
    assert default_guidance_scale(cfg, labeled, {"mode": "inpaint"}) == 3.0


def test_save_png_values(tmp_path):
    rgb = torch.tensor([[[-1.0, 0.0]], [[1.0, 2.0]], [[0.5, -3.0]]])  # (3, 1, 2)
    save_png(rgb, tmp_path / "rgb.png")
    image = Image.open(tmp_path / "rgb.png")
    assert image.mode == "RGB" and list(image.getdata()) == [(0, 255, 191), (128, 255, 0)]
    save_png(rgb[:1], tmp_path / "grey.png")
    assert list(Image.open(tmp_path / "grey.png").getdata()) == [0, 128]
    with pytest.raises(ValueError, match=r"\(2, 1, 2\)"):
        save_png(rgb[:2], tmp_path / "two.png")


# ------------------------------------------------------------------------------ the CLI
def test_cli_writes_samples(checkpoints, tmp_path):
    out = tmp_path / "cli"
    args = [f"ckpt={checkpoints['stage2']}", f"out_dir={out}", *FAST, "fid=false"]
    proc = sample_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sampled 5 images (ddpm, 4 steps" in proc.stdout
    assert len(list(out.glob("0*.png"))) == 5
    assert json.loads((out / "samples.json").read_text())["config"]["fid"] is False
    # Hydra itself wrote nothing (no .hydra/, no log file) next to out_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]


def test_help_lists_the_groups_sampling_reads_and_only_those(tmp_path):
    proc = sample_cli("--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("== Groups it reads ==")[1].split("== Config ==")[0]
    lines = {line.split(":")[0]: line for line in groups.splitlines() if ":" in line}
    conf = Path(__file__).parents[1] / "conf"
    for group, folder in (("sampler", "sampler"), ("fid@metrics", "fid")):
        listed = lines[group].split(":", 1)[1].split("(")[0]
        assert sorted(o.strip() for o in listed.split(",")) == sorted(
            p.stem for p in (conf / folder).glob("*.yaml")
        )
    assert set(lines) == {"sampler", "fid@metrics"}  # not train.py's (experiment, recipe, ...)
    assert "ckpt: ???" in proc.stdout  # the config with its required key


BAD_INPUTS = {
    "missing file": (["ckpt={tmp}/missing.ckpt"], "missing.ckpt"),
    "stage-1 checkpoint": (["ckpt={stage1}"], "is a stage-1 (autoencoder) checkpoint"),
    "steps <= 0": (["ckpt={stage2}", "sampler.steps=0"], "sampler.steps=0"),
    "label outside classes": (["ckpt={stage2}", "class_label=10"], "class_label=10 is outside"),
    "unknown sampler": (["ckpt={stage2}", "sampler=euler"], "sampler='euler' is not an option"),
    "num_samples <= 0": (["ckpt={stage2}", "num_samples=0"], "num_samples=0"),
    "batch_size <= 0": (["ckpt={stage2}", "batch_size=-2"], "batch_size=-2"),
    "fid not a bool": (["ckpt={stage2}", "fid=maybe"], "fid='maybe' must be true or false"),
    # type errors and unknown keys come from the schema (ldm.sample.SampleConfig), in one line
    "seed not an int": (["ckpt={stage2}", "seed=1.5"], "seed=1.5: Value '1.5' of type 'float'"),
    "nfe_sweep of words": (["ckpt={stage2}", "nfe_sweep=[a]"], "nfe_sweep=[a]: Value 'a'"),
    "unknown key": (["ckpt={stage2}", "num_sample=4"], "num_sample=4: no such setting"),
    "unknown FID extractor": (
        ["ckpt={stage2}", "fid@metrics=bar"],
        "fid@metrics='bar' is not an option",
    ),
    "no ckpt": ([], "ckpt is required"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, checkpoints, tmp_path):
    args, needle = BAD_INPUTS[case]
    paths = {"tmp": tmp_path, "stage1": checkpoints["stage1"], "stage2": checkpoints["stage2"]}
    out = tmp_path / "out"
    # FAST first: each case's own setting overrides it
    proc = sample_cli(*FAST, *(a.format(**paths) for a in args), f"out_dir={out}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert lines[0].startswith("error: ")
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no out_dir, no Hydra files


class WritesFile:
    """Unpickling this calls open(path, "w"): it creates `path` if the loader runs pickled code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_callable_is_refused_without_running(checkpoints, tmp_path):
    stage2 = torch.load(checkpoints["stage2"], weights_only=True)

    def hostile(marker: Path) -> Path:
        path = tmp_path / f"hostile_{marker.name}.ckpt"
        torch.save({**stage2, "payload": WritesFile(marker)}, path)
        return path

    # The payload is live: an unsafe load (weights_only=False) does create its marker.
    control = tmp_path / "control_marker"
    torch.load(hostile(control), weights_only=False)
    assert control.exists()

    marker = tmp_path / "marker"
    out = tmp_path / "out"
    proc = sample_cli(f"ckpt={hostile(marker)}", f"out_dir={out}", *FAST, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "io.open" in lines[0], proc.stderr
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------------------ FID and NFE sweep
@pytest.mark.slow
def test_fid_and_nfe_sweep(checkpoints, tmp_path, capsys):
    budget = [
        "metrics.classifier.epochs=1",
        "metrics.kid_subsets=3",
        "metrics.kid_subset_size=4",
        "metrics.batch_size=64",
    ]
    cfg = sample_cfg(
        tmp_path, checkpoints["conditioned"], "num_samples=6", "nfe_sweep=[2,4]", *budget, fid=True
    )
    record = run(cfg)
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["N"] == 6 and metrics["num_real"] > 1000  # digits train split
    assert metrics["fid"] > 0 and metrics["kid"] == pytest.approx(metrics["kid"])
    assert 0.0 <= metrics["cas"] <= 1.0  # conditional model on labelled data
    # 6 samples against 6 of the reals (equal sizes), k = 3: every score is defined.
    assert all(0.0 <= metrics[k] <= 2.0 for k in ("precision", "recall", "density", "coverage"))
    assert metrics["guidance_interval"] is None and metrics["guidance_rescale"] == 0.0
    assert metrics["checkpoint_sha256"] == record["checkpoint"]["sha256"]

    sweep = json.loads((out / "nfe_sweep.json").read_text())
    rows = sweep["rows"]
    assert [r["steps"] for r in rows] == [2, 4] and [r["nfe"] for r in rows] == [2, 4]
    assert all(r["N"] == 6 and r["seconds"] > 0 for r in rows)
    # 4 steps with the same seed and settings regenerates the main run's images: same FID
    assert rows[1]["fid"] == pytest.approx(metrics["fid"], rel=1e-9)
    assert rows[1]["recall"] == metrics["recall"] and rows[1]["coverage"] == metrics["coverage"]
    csv_lines = (out / "nfe_sweep.csv").read_text().splitlines()
    assert (
        csv_lines[0]
        == "steps,nfe,fid,kid,cas,precision,recall,density,coverage,seconds,images_per_second,N"
        and len(csv_lines) == 3
    )
    assert Image.open(out / "nfe_sweep.png").size[0] > 500
    printed = capsys.readouterr().out
    assert "NFE sweep (ddpm, N=6" in printed
    assert "| steps | NFE | FID |" in printed and "\n| 4 | 4 | " in printed  # the Markdown table
