"""Hear WAV files the way the project's judge does: `python -m ldm.audio.listen CKPT FILE.wav ...`

For each file: the digit the spectrogram classifier hears (trained on the train voices of the
checkpoint's data, ldm.metrics.train_classifier, cached) with its probability, the duration of the
sound (non-silent span: frames within 40 dB of the loudest) and its median pitch (F0 by
autocorrelation over voiced frames), as one JSON line per file.

CKPT is an audio (data=spoken_digits) checkpoint of either stage; an image checkpoint is refused.
Files must be WAV at the checkpoint's sample rate (16 kHz) unless `--resample` is given, and at
least one STFT window (n_fft samples) long.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ldm.audio.frontend import MelConfig, MelFrontend
from ldm.audio.wav import read_wav
from ldm.utils.errors import UserError


def stored_config(ckpt_path: str | Path) -> dict[str, Any]:
    from ldm.utils.checkpoint import load_checkpoint

    return load_checkpoint(ckpt_path, mmap=True)["ldm"]["config"]


def require_audio(config: dict[str, Any], what: str, needs: str) -> dict[str, Any]:
    """The stored data config of an audio checkpoint; a one-line UserError for an image one."""
    data = config.get("data") or {}
    if data.get("modality", "image") != "audio":
        raise UserError(
            f"{what} is an image checkpoint (data={data.get('name')}); {needs} needs an audio "
            "checkpoint (data=spoken_digits)"
        )
    return data


def frontend_from_data_config(data: dict[str, Any]) -> MelFrontend:
    return MelFrontend(MelConfig(**data["source"]["audio"]))


def duration_seconds(
    wave: torch.Tensor, sample_rate: int, hop: int = 256, db: float = 40.0
) -> float:
    """Length of the span from the first to the last frame within `db` of the loudest frame."""
    n = (len(wave) // hop) * hop
    energy = wave[:n].reshape(-1, hop).pow(2).mean(1)
    level = 10 * torch.log10(energy.clamp_min(1e-12))
    loud = torch.nonzero(level > level.max() - db).flatten()
    return float((loud[-1] - loud[0] + 1) * hop / sample_rate) if len(loud) else 0.0


def median_pitch(
    wave: torch.Tensor, sample_rate: int, fmin: float = 60.0, fmax: float = 400.0
) -> float | None:
    """Median F0 (Hz) over voiced 40 ms frames: the autocorrelation peak in [fmin, fmax], voiced
    when the peak exceeds 0.5 of the frame energy and the frame is within 25 dB of the loudest.
    None when no frame is voiced (whispered or silent)."""
    size, hop = int(0.04 * sample_rate), int(0.01 * sample_rate)
    if len(wave) < size:
        return None
    frames = wave.unfold(0, size, hop)  # (T, size)
    frames = frames - frames.mean(1, keepdim=True)
    energy = frames.pow(2).sum(1)
    spec = torch.fft.rfft(frames, n=2 * size)
    ac = torch.fft.irfft(spec.abs().pow(2), n=2 * size)[:, :size]  # (T, size)
    lo, hi = int(sample_rate / fmax), int(sample_rate / fmin)
    peak, lag = ac[:, lo:hi].max(1)
    loud = 10 * torch.log10(energy.clamp_min(1e-12))
    voiced = (peak > 0.5 * ac[:, 0]) & (loud > loud.max() - 25)
    if not voiced.any():
        return None
    return float(sample_rate / (lag[voiced] + lo).float().median())


def classifier_for(ckpt_path: str | Path, config: dict[str, Any]):
    """The checkpoint data's spectrogram classifier (trained on its train voices; cached)."""
    from omegaconf import OmegaConf

    from ldm.config import stage_section
    from ldm.metrics.train_classifier import get_or_train_classifier
    from ldm.utils.instantiate import safe_instantiate

    data = stage_section(OmegaConf.create(config), "diffusion", "data")  # shared data + stage's
    datamodule = safe_instantiate(data, f"checkpoint {str(ckpt_path)!r} data config")
    fid = config.get("fid") or {}
    return get_or_train_classifier(
        datamodule, fid.get("cache_dir", ".cache/ldm"), **(fid.get("classifier") or {})
    )


def listen(
    ckpt_path: str | Path, files: list[str | Path], resample: bool = False
) -> list[dict[str, Any]]:
    config = stored_config(ckpt_path)
    data = require_audio(config, f"checkpoint {str(ckpt_path)!r}", "ldm.audio.listen")
    frontend = frontend_from_data_config(data)
    c = frontend.config
    waves = [read_wav(f, c.sample_rate, c.n_fft, resample)[0] for f in files]  # all checked first
    classifier, summary = classifier_for(ckpt_path, config)
    rows = []
    with torch.no_grad():
        for path, wave in zip(files, waves):
            image = frontend.encode(frontend.fit_window(wave)[None])  # (1, 1, M, T)
            probs = classifier(image).softmax(1)[0]
            rows.append(
                {
                    "file": str(path),
                    "heard_digit": int(probs.argmax()),
                    "probability": round(float(probs.max()), 4),
                    "duration_s": round(duration_seconds(wave, c.sample_rate), 3),
                    "median_pitch_hz": (
                        None if (f0 := median_pitch(wave, c.sample_rate)) is None else round(f0, 1)
                    ),
                    "classifier_heldout_voice_accuracy": summary["test_accuracy"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = list(sys.argv[1:] if argv is None else argv)
    resample = "--resample" in args
    args = [a for a in args if a != "--resample"]
    if len(args) < 2:
        raise SystemExit(
            "usage: python -m ldm.audio.listen CKPT FILE.wav [FILE.wav ...] [--resample]"
        )
    try:
        rows = listen(args[0], args[1:], resample)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
