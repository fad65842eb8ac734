"""Safe checkpoint reading: tensors and plain data only, one clear error per failure."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ldm.utils.errors import UserError

STAGES = ("autoencoder", "diffusion")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, expected_stage: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)`: pickled code is refused, never run.

    Checks that the file is an ldm checkpoint (it carries `checkpoint["ldm"]` with the stage and the
    resolved config) and, when `expected_stage` is given, that it is of that stage.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {str(path)!r} holds objects other than tensors and plain data; refused ({first})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise UserError(f"checkpoint {str(path)!r} is truncated or not a torch checkpoint ({type(err).__name__})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "ldm" not in ckpt:
        raise UserError(f"{str(path)!r} is not an ldm checkpoint (no 'state_dict'/'ldm' entries)")
    stage = ckpt["ldm"].get("stage")
    if stage not in STAGES:
        raise UserError(f"{str(path)!r} names an unknown stage {stage!r}")
    if expected_stage is not None and stage != expected_stage:
        raise UserError(f"{str(path)!r} is a stage-{'1' if stage == 'autoencoder' else '2'} ({stage}) checkpoint; a {expected_stage} checkpoint is needed")
    return ckpt
