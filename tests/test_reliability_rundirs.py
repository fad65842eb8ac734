"""Runs that share a machine or a filesystem never share a run dir (ldm.utils.rundir): unique names
to the millisecond plus a random suffix, exclusive creation, and a lock that refuses a second live
run in one line while a stopped run's dir can be resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from ldm.utils.errors import UserError
from ldm.utils.rundir import LOCK_NAME, claim_dir, read_owner, release_dir, run_name
from tests.conftest import CONF_DIR, ROOT
from tests.train_cli import FAST, explain, load_ckpt, train_cli

HOLD = """
import sys, time
from ldm.utils.rundir import claim_dir
claim_dir(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def hold_dir(path: Path) -> subprocess.Popen:
    """Another process that owns `path` as a live run would."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_run_names_differ_within_one_millisecond_and_carry_the_slurm_job():
    now = datetime(2026, 12, 1, 9, 41, 7, 312000)
    names = {run_name({}, now) for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith("2026-12-01_09-41-07.312-") for n in names)
    assert run_name({"SLURM_JOB_ID": "77"}, now).endswith("-slurm77")
    array = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "79", "SLURM_ARRAY_TASK_ID": "3"}
    assert run_name(array, now).endswith("-slurm79_3")


def resolved_run_dir(tmp_path: Path) -> str:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=fast"], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    cfg.paths.root_dir = str(tmp_path)
    first = OmegaConf.select(cfg, "hydra.run.dir")
    assert OmegaConf.select(cfg, "hydra.run.dir") == first  # one value per config (cached)
    return first


def test_configs_composed_in_the_same_second_get_distinct_run_dirs(tmp_path):
    a, b = resolved_run_dir(tmp_path), resolved_run_dir(tmp_path)
    assert a != b and Path(a).parent == Path(b).parent == tmp_path / "logs" / "train" / "runs"


def test_a_live_run_keeps_others_out_and_a_dead_one_leaves_a_resumable_dir(tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = hold_dir(run_dir)
    try:
        owner = read_owner(run_dir / LOCK_NAME)
        assert owner["pid"] == holder.pid and owner["host"]
        with pytest.raises(UserError, match=f"is in use by a live run \\(pid {holder.pid} on host"):
            claim_dir(run_dir)
        # train.py says so in one line and exits 2 before writing anything there
        started = time.monotonic()
        refused = train_cli(*FAST, f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=tmp_path)
        assert refused.returncode == 2, explain(refused)
        assert (
            refused.stderr.strip().splitlines() == [refused.stderr.strip().splitlines()[-1]]
            and f"pid {holder.pid}" in refused.stderr
        )
        assert time.monotonic() - started < 60
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The owner died without cleaning up: its lock is stale, and the dir can be taken over.
    caplog.set_level("INFO")
    assert claim_dir(run_dir)
    assert f"stale lock of pid {holder.pid}" in caplog.text
    assert read_owner(run_dir / LOCK_NAME)["pid"] == os.getpid()
    release_dir(run_dir)


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_dirs_and_stage_1(tmp_path):
    """Before: both wrote into logs/train/runs/<second> and stage 2 could take the other run's
    stage-1 checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *FAST, f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    for proc in procs:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-4000:]
    run_dirs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(run_dirs) == 2
    seeds = set()
    for run_dir in run_dirs:
        seeds.add(json.loads((run_dir / "manifest.json").read_text())["seed"])
        assert (run_dir / "final_samples.png").is_file()
        for stage in ("autoencoder", "diffusion"):
            names = sorted(p.name for p in (run_dir / "checkpoints" / stage).iterdir())
            assert names == ["epoch000.ckpt", "last.ckpt"], names  # no other run's -v1 files
        # stage 2 carries this run's own stage-1 weights
        stage1 = load_ckpt(run_dir / "checkpoints" / "autoencoder" / "last.ckpt")["state_dict"]
        stage2 = load_ckpt(run_dir / "checkpoints" / "diffusion" / "last.ckpt")["state_dict"]
        for key, value in stage1.items():
            if f"autoencoder.{key}" in stage2:
                assert torch.equal(stage2[f"autoencoder.{key}"], value), key
    assert seeds == {1, 2}
