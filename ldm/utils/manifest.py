"""Run manifest: what is needed to rerun a run exactly (commit, packages, seed, data, machine)."""

from __future__ import annotations

import json
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

PACKAGES = ("torch", "torchvision", "pytorch-lightning", "hydra-core", "omegaconf", "torchmetrics", "wandb", "numpy")


def git_state(repo_dir: Path) -> dict[str, Any]:
    """Commit hash and dirty flag of the code being run (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


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
        "data_fingerprint": data_fingerprint,
        "hostname": socket.gethostname(),
        "devices": {
            "cuda": torch.cuda.device_count(),
            "cuda_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_threads": torch.get_num_threads(),
        },
    }


def write_run_files(output_dir: Path, cfg: DictConfig, data_fingerprint: str | None) -> dict[str, Any]:
    """Write config_resolved.yaml, manifest.json and command.txt into the run directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    manifest = build_manifest(cfg, data_fingerprint)
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (output_dir / "command.txt").write_text(manifest["command"] + "\n")
    return manifest
