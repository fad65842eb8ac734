"""Exact reruns: the same seed gives bitwise-equal weights and losses (a different seed does not),
and `python train.py --config-dir RUN/.hydra --config-name config` reruns a run into a fresh dir
with the same final weights. The run dir holds what a rerun needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_cli import (
    FAST,
    assert_same_training_state,
    explain,
    load_ckpt,
    logged,
    train_cli,
    train_in_process,
)

STAGE1 = ["stage=autoencoder", "stage_trainer.autoencoder.max_epochs=2"]


@pytest.mark.slow
def test_same_seed_same_weights_and_losses_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg, _ = train_in_process([*STAGE1, f"seed={seed}"], tmp_path / name)
        runs[name] = Path(cfg.paths.output_dir)
    last = {name: run / "checkpoints" / "autoencoder" / "last.ckpt" for name, run in runs.items()}
    assert_same_training_state(last["a"], last["b"])
    losses = {name: logged(run, "autoencoder") for name, run in runs.items()}
    assert len(losses["a"]) == 6 and losses["a"] == losses["b"]
    weights_a, weights_c = load_ckpt(last["a"])["state_dict"], load_ckpt(last["c"])["state_dict"]
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    assert losses["a"] != losses["c"]


@pytest.mark.slow
def test_rerun_from_a_run_dir_reproduces_its_final_weights(tmp_path):
    original = tmp_path / "original"
    first = train_cli(*FAST, *STAGE1, f"hydra.run.dir={original}", cwd=tmp_path)
    assert first.returncode == 0, explain(first)

    # What the run dir holds for a rerun.
    manifest = json.loads((original / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["data_fingerprint"].startswith("mnist5k-32-")
    assert len(manifest["git"]["commit"]) == 40 and isinstance(manifest["git"]["dirty"], bool)
    assert manifest["packages"]["torch"] and manifest["packages"]["pytorch-lightning"]
    assert manifest["hostname"] and "cuda" in manifest["devices"]
    assert manifest["launch"]["trainer"]["deterministic"] is True
    assert f"hydra.run.dir={original}" in (original / "command.txt").read_text()
    assert yaml.safe_load((original / "config_resolved.yaml").read_text())["paths"]["output_dir"] == str(original)
    saved = yaml.safe_load((original / ".hydra" / "config.yaml").read_text())
    assert saved["paths"]["output_dir"] == "${hydra:runtime.output_dir}"  # resolved afresh by a rerun

    rerun = train_cli("--config-dir", str(original / ".hydra"), "--config-name", "config", cwd=tmp_path)
    assert rerun.returncode == 0, explain(rerun)
    # A fresh dir in the project's layout (logs/<task_name>/runs/<time>), not the original one.
    (rerun_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert (rerun_dir / "train.log").is_file() and "--config-dir" in (rerun_dir / "command.txt").read_text()
    assert_same_training_state(original / "checkpoints" / "autoencoder" / "last.ckpt", rerun_dir / "checkpoints" / "autoencoder" / "last.ckpt")
    assert logged(original, "autoencoder") == logged(rerun_dir, "autoencoder")
