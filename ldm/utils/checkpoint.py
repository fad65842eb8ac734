"""Safe checkpoint reading: tensors and plain data only, one clear error per failure."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import secrets
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ldm.utils.errors import UserError

STAGES = ("autoencoder", "diffusion")

# `checkpoint["ldm"]["format_version"]`: the layout of ldm checkpoints (state_dict keys, the stored
# config, the `ldm` entry). Bump it when a change makes older code misread new checkpoints; files
# without the entry were written before versions existed (version 0) and still load.
CHECKPOINT_FORMAT_VERSION = 1

# torch's weights-only unpickler names the refused global inside a long multi-line message.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: (GLOBAL [\w.]+)")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_torch_file(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on CPU with one-line UserErrors.

    Pickled code (a `__reduce__` payload, any class outside torch's allowlist) is refused before it
    runs. `mmap=True` maps tensors lazily, so reading only the stored config of a big file is cheap.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise UserError(
                f"{what} {str(path)!r} holds pickled objects other than tensors and plain data "
                f"({refused.group(1)}); refused, nothing in it was run"
            ) from err
        raise UserError(
            f"{what} {str(path)!r} is truncated or not a torch checkpoint (unknown format)"
        ) from err
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError) as err:
        # RuntimeError: a cut zip archive; EOFError: empty or cut legacy file;
        # KeyError: foreign bytes.
        if "mmap can only be used" in str(err):  # legacy (non-zip) or foreign bytes, read with mmap
            detail = "not a zip-format torch file"
        elif isinstance(err, RuntimeError | OSError):
            detail = (
                str(err).splitlines()[0].split(". ")[0][:120] if str(err) else type(err).__name__
            )
        else:
            detail = "file is empty" if path.stat().st_size == 0 else "unknown format"
        raise UserError(
            f"{what} {str(path)!r} is truncated or not a torch checkpoint ({detail})"
        ) from err


def check_ldm_checkpoint(ckpt: Any, path: str | Path, expected_stage: str | None = None) -> None:
    """An ldm checkpoint carries `state_dict` and `ldm = {"stage", "config", "format_version"}`;
    check them (and the stage). A format version newer than CHECKPOINT_FORMAT_VERSION is refused."""
    path = str(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "ldm" not in ckpt:
        raise UserError(f"{path!r} is not an ldm checkpoint (no 'state_dict'/'ldm' entries)")
    meta = ckpt["ldm"]
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise UserError(f"{path!r} is not an ldm checkpoint (its 'ldm' entry has no config)")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise UserError(
            f"{path!r} has checkpoint format version {version!r}, newer than this ldm reads "
            f"(format version {CHECKPOINT_FORMAT_VERSION}); update ldm to load it"
        )
    stage = meta.get("stage")
    if stage not in STAGES:
        raise UserError(f"{path!r} names an unknown stage {stage!r}; expected one of {STAGES}")
    if expected_stage is not None and stage != expected_stage:
        number = "1" if stage == "autoencoder" else "2"
        article = "an" if expected_stage == "autoencoder" else "a"
        raise UserError(
            f"{path!r} is a stage-{number} ({stage}) checkpoint; "
            f"{article} {expected_stage} checkpoint is needed"
        )


def state_dict_mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str | None:
    """One line describing how `given` differs from a module's `expected` state_dict, or None.

    (torch's own strict-load error spans many lines, one per key.)
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: {tuple(given[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in given
        and torch.is_tensor(v)
        and torch.is_tensor(given[k])
        and given[k].shape != v.shape
    ]
    parts = [
        f"{len(found)} {label} (first: {found[0]})"
        for label, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if found
    ]
    return "; ".join(parts) or None


def load_checkpoint(
    path: str | Path, expected_stage: str | None = None, mmap: bool = False
) -> dict[str, Any]:
    """Load an ldm checkpoint with `torch.load(weights_only=True)`: pickled code is refused, never
    run.

    Checks that the file is an ldm checkpoint (it carries `checkpoint["ldm"]` with the stage and the
    resolved config) and, when `expected_stage` is given, that it is of that stage.
    """
    ckpt = read_torch_file(path, mmap=mmap)
    check_ldm_checkpoint(ckpt, path, expected_stage)
    return ckpt


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(f)` on a hidden temp file next to `path`, fsync it, then rename it over `path`.

    Either the new file is complete or the old one is untouched (a crash, ENOSPC or an exception in
    `write` leaves no partial file behind). The temp file lives in the target's directory because a
    rename is atomic only within one filesystem; the directory is fsynced so the rename survives a
    power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open honours the umask (mkstemp would leave the file mode 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
