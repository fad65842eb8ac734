"""Checkpoint faults: truncated, foreign and hostile files; strict loads; atomic writes; safetensors
export."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.callbacks.safety import AtomicCheckpointIO
from ldm.models.export import export_safetensors, load_safetensors_export
from ldm.models.loading import load_autoencoder, load_state_strict
from ldm.utils.checkpoint import atomic_write, load_checkpoint, read_torch_file, state_dict_mismatch
from ldm.utils.errors import UserError
from ldm.utils.instantiate import safe_instantiate
from tests.conftest import CONF_DIR, ROOT


class WriteFileOnLoad:
    """A pickled payload: unpickling it calls Path.write_text, i.e. runs code from the file."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.target, "payload ran"))


def tiny_autoencoder_config(num_channels: int = 1, image_size: int = 16) -> dict:
    """The real conf/model/autoencoder/kl.yaml, shrunk, inside the resolved run config a checkpoint
    stores."""
    ae = OmegaConf.load(CONF_DIR / "model" / "autoencoder" / "kl.yaml")
    ae.encoder.ch, ae.encoder.ch_mult, ae.encoder.mid_attention, ae.latent_channels = (
        8,
        [1, 2],
        False,
        2,
    )
    cfg = OmegaConf.create(
        {
            "data": {"num_channels": num_channels, "image_size": image_size},
            "trainer": {"gradient_clip_val": None},  # the autoencoder's grad_clip follows it
        }
    )
    cfg.model = {"autoencoder": ae}
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def ae_ckpt(tmp_path):
    """A real stage-1 checkpoint file (what StoreConfigInCheckpoint + ModelCheckpoint write)."""
    config = tiny_autoencoder_config()
    torch.manual_seed(0)
    ae = safe_instantiate(config["model"]["autoencoder"])
    path = tmp_path / "ae.ckpt"
    torch.save(
        {"state_dict": ae.state_dict(), "ldm": {"stage": "autoencoder", "config": config}}, path
    )
    return path, ae


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save(
        {
            "state_dict": {},
            "ldm": {"stage": "autoencoder", "config": {}},
            "x": WriteFileOnLoad(marker),
        },
        tmp_path / "evil.ckpt",
    )
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path / "evil.ckpt")
    assert "holds pickled objects other than tensors and plain data (GLOBAL" in one_line(err)
    assert "nothing in it was run" in str(err.value)
    assert not marker.exists()
    # resuming a run (`ckpt_path=`: Lightning reads through the CheckpointIO) is guarded the
    # same way
    from pytorch_lightning.demos.boring_classes import BoringModel

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=tmp_path,
    )
    with pytest.raises(UserError, match="holds pickled objects"):
        trainer.fit(BoringModel(), ckpt_path=tmp_path / "evil.ckpt")
    assert not marker.exists()
    # control: the payload is real; an unsafe load runs it
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.read_text() == "payload ran"


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("missing", None, "does not exist"),
        (
            "truncated",
            "truncate",
            "is truncated or not a torch checkpoint (PytorchStreamReader failed reading zip "
            "archive: failed finding central directory)",
        ),
        ("empty", b"", "is truncated or not a torch checkpoint (file is empty)"),
        (
            "text",
            b"model weights: see attached\n",
            "is truncated or not a torch checkpoint (unknown format)",
        ),
        ("text2", b"hello\n", "is truncated or not a torch checkpoint (unknown format)"),
        (
            "foreign",
            {"weights": torch.randn(3)},
            "is not an ldm checkpoint (no 'state_dict'/'ldm' entries)",
        ),
        (
            "lightning",
            {"state_dict": {}, "ldm": "x"},
            "is not an ldm checkpoint (its 'ldm' entry has no config)",
        ),
        (
            "stage",
            {"state_dict": {}, "ldm": {"stage": "gan", "config": {}}},
            "names an unknown stage 'gan'",
        ),
    ],
)
def test_bad_checkpoint_files_give_one_line(tmp_path, ae_ckpt, name, make, expected):
    path = tmp_path / f"{name}.ckpt"
    if make == "truncate":
        data = ae_ckpt[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif isinstance(make, bytes):
        path.write_bytes(make)
    elif make is not None:
        torch.save(make, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(path) in one_line(err) and expected in str(err.value)


def test_wrong_stage_is_named(ae_ckpt):
    with pytest.raises(UserError) as err:
        load_checkpoint(ae_ckpt[0], expected_stage="diffusion")
    assert "is a stage-1 (autoencoder) checkpoint; a diffusion checkpoint is needed" in one_line(
        err
    )


def test_load_autoencoder_roundtrip_and_strict_keys_and_shapes(tmp_path, ae_ckpt):
    path, ae = ae_ckpt
    loaded, _ = load_autoencoder(path)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), ae.eval().encode(x))
    ckpt = read_torch_file(path)
    missing = dict(ckpt["state_dict"])
    key = next(iter(missing))
    del missing[key]
    with pytest.raises(UserError) as err:
        load_state_strict(loaded, missing, path)
    assert one_line(err).startswith(
        f"checkpoint {str(path)!r} does not fit the model its config describes"
    )
    conv = "decoder.conv_out.weight"
    reshaped = {k: v[..., :1] if k == conv else v for k, v in ckpt["state_dict"].items()}
    with pytest.raises(UserError):
        load_state_strict(loaded, reshaped, path)
    expected = loaded.state_dict()
    assert state_dict_mismatch(expected, ckpt["state_dict"]) is None
    assert state_dict_mismatch(expected, missing) == f"1 missing keys (first: {key})"
    shape = tuple(expected[conv].shape)
    assert state_dict_mismatch(expected, {**reshaped, "extra": torch.ones(1)}) == (
        f"1 unexpected keys (first: extra); 1 shape mismatches (first: {conv}: "
        f"{(*shape[:-1], 1)} in the file, {shape} in the model)"
    )
    # a checkpoint whose config describes another architecture than its weights
    ckpt["ldm"]["config"]["model"]["autoencoder"]["encoder"]["ch"] = 16
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(
        UserError, match=r"'.*other\.ckpt' does not fit the model its config describes"
    ):
        load_autoencoder(tmp_path / "other.ckpt")


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "ldm.utils.instantiate.os.system",
        "torch.nn.modules.module.torch.load",
        "builtins.exec",
    ],
)
def test_stored_target_outside_allowlist_is_refused_and_not_run(tmp_path, target):
    marker = tmp_path / "ran"
    config = {"encoder": {"_target_": target, "_args_": [f"touch {marker}"]}}
    with pytest.raises(UserError) as err:
        safe_instantiate(config, where="checkpoint 'x.ckpt'")
    assert one_line(err).startswith(f"checkpoint 'x.ckpt' names _target_={target!r}")
    assert not marker.exists()


def test_stored_config_checks(tmp_path):
    assert isinstance(
        safe_instantiate({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}),
        torch.nn.Linear,
    )
    with pytest.raises(UserError, match=r"_target_='ldm.nope.Thing', which does not exist"):
        safe_instantiate({"_target_": "ldm.nope.Thing"})
    with pytest.raises(UserError, match=r"holds an interpolation at a.name='\$\{oc.env:HOME\}'"):
        safe_instantiate({"a": {"_target_": "torch.nn.Identity", "name": "${oc.env:HOME}"}})


def test_hostile_target_inside_a_checkpoint_is_refused(tmp_path, ae_ckpt):
    marker = tmp_path / "ran"
    ckpt = read_torch_file(ae_ckpt[0])
    ckpt["ldm"]["config"]["model"]["autoencoder"] = {
        "_target_": "os.system",
        "_args_": [f"touch {marker}"],
    }
    torch.save(ckpt, tmp_path / "hostile.ckpt")
    with pytest.raises(UserError, match=r"checkpoint '.*hostile\.ckpt' names _target_='os.system'"):
        load_autoencoder(tmp_path / "hostile.ckpt")
    assert not marker.exists()


def half_then_fail(obj, f, *args, **kwargs):
    """A torch.save that dies midway (disk full): half of the real bytes reach the file, then
    ENOSPC."""
    import io

    buf = io.BytesIO()
    REAL_SAVE(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    raise OSError(28, "No space left on device")


REAL_SAVE = torch.save


def test_failed_write_keeps_the_old_last_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, last)
    good = last.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert last.stat().st_mode & 0o777 == 0o666 & ~umask
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(1000)}}, last)
    assert last.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # control: the same fault through a plain write leaves half a file
    with open(tmp_path / "plain.ckpt", "wb") as f, pytest.raises(OSError):
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, f)
    monkeypatch.setattr(torch, "save", REAL_SAVE)
    with pytest.raises(UserError, match="truncated"):
        read_torch_file(tmp_path / "plain.ckpt")


def test_trainer_save_goes_through_the_atomic_writer(tmp_path, monkeypatch):
    from pytorch_lightning.demos.boring_classes import BoringModel

    model = BoringModel()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=tmp_path,
    )
    trainer.fit(model)
    last = tmp_path / "last.ckpt"
    trainer.save_checkpoint(last)
    good = last.read_bytes()
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst))
    )
    trainer.save_checkpoint(last)
    assert (
        pathlib.Path(replaced[0][0]).parent == tmp_path
    )  # temp file next to the target: same filesystem
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(last)
    assert read_torch_file(last)["global_step"] == 1 and len(last.read_bytes()) == len(good)


def test_atomic_write_cleans_up_after_an_exception(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"old")

    def explode(f):
        f.write(b"new but partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", explode)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and (
        tmp_path / "out.bin"
    ).read_bytes() == b"old"


def test_safetensors_export_roundtrip(tmp_path, ae_ckpt):
    path, ae = ae_ckpt
    out = export_safetensors(path, tmp_path / "ae.safetensors")
    loaded = load_safetensors_export(out)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert type(loaded) is type(ae) and torch.equal(loaded.encode(x), ae.eval().encode(x))
    assert torch.equal(loaded.scale_factor, ae.scale_factor)
    with pytest.raises(UserError, match="a diffusion checkpoint is needed"):
        load_safetensors_export(out, expected_stage="diffusion")
    data = out.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        UserError, match=r"'.*cut\.safetensors' is truncated or not a safetensors file"
    ):
        load_safetensors_export(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="is not an ldm export"):
        load_safetensors_export(tmp_path / "plain.safetensors")


def test_export_cli(tmp_path, ae_ckpt, capsys):
    from ldm.models.export import main

    main([str(ae_ckpt[0]), str(tmp_path / "o.safetensors")])
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'o.safetensors'} (")
    assert load_safetensors_export(tmp_path / "o.safetensors").latent_channels == 2
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "text.ckpt"), str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and err.count("\n") == 1
        and not (tmp_path / "x.safetensors").exists()
    )
    assert err == (
        f"error: checkpoint {str(tmp_path / 'text.ckpt')!r} is truncated or not a torch "
        "checkpoint (unknown format)\n"
    )


@pytest.mark.slow
def test_export_as_python_module(tmp_path, ae_ckpt):
    out = tmp_path / "o.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "ldm.models.export", str(ae_ckpt[0]), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0 and run.stdout.startswith(f"wrote {out}") and out.is_file()


def test_safetensors_export_of_a_stage2_checkpoint(tmp_path):
    from ldm.models.loading import load_latent_diffusion
    from tests.conftest import compose_config

    cfg = compose_config(["debug=fast"], tmp_path)
    config = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    torch.manual_seed(0)
    ae = safe_instantiate(config["model"]["autoencoder"])
    model = safe_instantiate(
        {k: v for k, v in config["model"]["diffusion"].items() if k != "latent_cache"},
        autoencoder=ae,
    )
    torch.save(
        {"state_dict": model.state_dict(), "ldm": {"stage": "diffusion", "config": config}},
        tmp_path / "ld.ckpt",
    )
    from_ckpt, _ = load_latent_diffusion(tmp_path / "ld.ckpt")
    loaded = load_safetensors_export(
        export_safetensors(tmp_path / "ld.ckpt", tmp_path / "ld.safetensors")
    )
    assert type(loaded) is type(model)
    for key, value in from_ckpt.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.autoencoder.scale_factor, model.autoencoder.scale_factor)


def test_resume_reads_lightning_checkpoints_weights_only(tmp_path):
    """Every entry Lightning writes (loops, optimizer, callback states) loads with
    weights_only=True."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.demos.boring_classes import BoringModel

    def trainer(max_steps):
        return pl.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=tmp_path,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)],
        )

    trainer(2).fit(BoringModel())
    resumed = trainer(4)
    resumed.fit(BoringModel(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 4 and read_torch_file(tmp_path / "last.ckpt")["global_step"] == 4
