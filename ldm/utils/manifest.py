"""Run manifest: what is needed to rerun a run exactly (commit, packages, seed, data, machine).

A run dir holds `config_resolved.yaml`, `command.txt`, `manifest.json` and, when the code had
uncommitted changes, `git_diff.patch` (the diff against the manifest's commit). A run resumed in
its own dir (`hydra.run.dir=RUN ckpt_path=last`) appends its command line to `command.txt` and
keeps the earlier manifests under `manifest.json["earlier"]`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.utils.launch import slurm_job_id

PACKAGES = (
    "torch",
    "torchvision",
    "pytorch-lightning",
    "hydra-core",
    "omegaconf",
    "torchmetrics",
    "wandb",
    "numpy",
)


def git(repo_dir: Path, *args: str) -> str | None:
    """Output of a git command in `repo_dir`; None outside a git checkout or without git."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(repo_dir: Path) -> dict[str, Any]:
    """Commit hash and dirty flag (uncommitted changes to tracked files) of the code being run."""
    commit = git(repo_dir, "rev-parse", "HEAD")
    status = git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(status.strip()) if status is not None else None,
    }


def launch_info(cfg: DictConfig) -> dict[str, Any]:
    """How the run was launched: Trainer device settings, process launcher, Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    from ldm.utils.launch import external_launcher

    trainer = cfg.get("trainer") or {}
    info: dict[str, Any] = {
        "trainer": {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in (
                (k, trainer.get(k))
                for k in (
                    "accelerator",
                    "devices",
                    "num_nodes",
                    "strategy",
                    "precision",
                    "deterministic",
                )
            )
        },
        "launcher": external_launcher(os.environ),
        "world_size": int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None,
        "slurm_job_id": slurm_job_id(os.environ),
    }
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        info["hydra"] = {
            "mode": str(hydra_cfg.mode.name) if hydra_cfg.mode is not None else None,
            "overrides": list(hydra_cfg.overrides.task),
            "job_num": OmegaConf.select(hydra_cfg, "job.num", default=None, throw_on_missing=False),
        }
    return info


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(cfg: DictConfig, data_fingerprint: str | None) -> dict[str, Any]:
    repo_dir = Path(__file__).resolve().parents[2]
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "git": git_state(repo_dir),
        "packages": package_versions(),
        "python": platform.python_version(),
        "seed": cfg.get("seed"),
        "stage": cfg.get("stage"),
        "ckpt_path": cfg.get("ckpt_path"),
        "data_fingerprint": data_fingerprint,
        "hostname": socket.gethostname(),
        "devices": {
            "cuda": torch.cuda.device_count(),
            "cuda_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_threads": torch.get_num_threads(),
        },
        "launch": launch_info(cfg),
    }


def write_run_files(
    output_dir: Path, cfg: DictConfig, data_fingerprint: str | None
) -> dict[str, Any]:
    """Write config_resolved.yaml, manifest.json, command.txt (and git_diff.patch) in the run
    dir."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    manifest = build_manifest(cfg, data_fingerprint)
    manifest_path = output_dir / "manifest.json"
    if manifest_path.is_file():  # resumed in its own run dir: keep what the earlier runs recorded
        try:
            earlier = json.loads(manifest_path.read_text())
        except ValueError:
            earlier = None
        if isinstance(earlier, dict):
            manifest["earlier"] = [*earlier.pop("earlier", []), earlier]
    if manifest["git"]["dirty"]:
        diff = git(Path(__file__).resolve().parents[2], "diff", "HEAD")
        if diff:
            (output_dir / "git_diff.patch").write_text(diff)
            manifest["git"]["diff_file"] = "git_diff.patch"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    with open(output_dir / "command.txt", "a") as f:
        f.write(manifest["command"] + "\n")
    return manifest
