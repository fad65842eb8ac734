"""Export an ldm checkpoint to safetensors (weights + the stored config as JSON) and load it back.

    python -m ldm.models.export CKPT OUT.safetensors

The file holds the checkpoint's `state_dict` (for stage 2 that is the EMA weights when EMA was on,
plus the frozen stage-1 weights) and, in the safetensors metadata under "ldm", the JSON of
`{"stage", "config"}`. Loading rebuilds the module through the same builders as checkpoints
(`ldm.models.loading`), so the same `_target_` allowlist applies; no pickle is involved at all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ldm.models.loading import autoencoder_from_checkpoint, latent_diffusion_from_checkpoint
from ldm.utils.checkpoint import atomic_write, check_ldm_checkpoint, load_checkpoint
from ldm.utils.errors import UserError

METADATA_KEY = "ldm"


def unshared(state_dict: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage (safetensors refuses tied or strided views)."""
    tensors, seen = {}, set()
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise UserError(
                f"checkpoint {str(path)!r}: state_dict[{key!r}] "
                f"is a {type(value).__name__}, not a tensor"
            )
        ptr = value.untyped_storage().data_ptr()
        tensors[key] = (
            value.detach().clone().contiguous() if ptr in seen else value.detach().contiguous()
        )
        seen.add(ptr)
    return tensors


def export_safetensors(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Write `out_path` (.safetensors) from an ldm checkpoint; returns the path written."""
    ckpt = load_checkpoint(ckpt_path)
    tensors = unshared(ckpt["state_dict"], ckpt_path)
    meta = {k: v for k, v in ckpt["ldm"].items() if k in ("stage", "config", "format_version")}
    payload = save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    atomic_write(out_path, lambda f: f.write(payload))
    return Path(out_path)


def read_safetensors_export(path: str | Path) -> dict[str, Any]:
    """`{"state_dict", "ldm"}` from an export, shaped like a checkpoint and checked like one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"safetensors file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{str(path)!r} is truncated or not a safetensors file ({err})") from err
    if METADATA_KEY not in metadata:
        raise UserError(f"{str(path)!r} is not an ldm export (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise UserError(
            f"{str(path)!r} holds unreadable '{METADATA_KEY}' metadata ({err})"
        ) from err
    ckpt = {"state_dict": state_dict, "ldm": meta}
    check_ldm_checkpoint(ckpt, path)
    return ckpt


def load_safetensors_export(path: str | Path, expected_stage: str | None = None) -> torch.nn.Module:
    """Rebuild the exported module (autoencoder or LatentDiffusion) in eval mode, strict load."""
    ckpt = read_safetensors_export(path)
    check_ldm_checkpoint(ckpt, path, expected_stage)
    if ckpt["ldm"]["stage"] == "autoencoder":
        return autoencoder_from_checkpoint(ckpt, path)
    return latent_diffusion_from_checkpoint(ckpt, path)


def main(argv: list[str] | None = None) -> None:
    from ldm.utils.cli import exit_on_user_error

    parser = argparse.ArgumentParser(
        prog="python -m ldm.models.export", description=__doc__.splitlines()[0]
    )
    parser.add_argument("ckpt", help="an ldm checkpoint (.ckpt) of either stage")
    parser.add_argument("out", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        out = export_safetensors(args.ckpt, args.out)
    except UserError as err:
        exit_on_user_error(err)
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); "
        "load it with ldm.models.export.load_safetensors_export"
    )


if __name__ == "__main__":
    main()
