"""sample.py's audio outputs: generated mel images of an audio checkpoint -> 16-bit PCM WAV files.

The front end's settings come from the data config stored in the checkpoint (`data.source.audio`),
so a checkpoint needs nothing else; the vocoder is Griffin-Lim (ldm.audio.frontend).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.audio.frontend import MelConfig, MelFrontend


def is_audio(data_cfg: Mapping[str, Any] | None) -> bool:
    """Whether a (stored) data config describes audio: `modality: audio` (absent: images)."""
    return bool(data_cfg) and data_cfg.get("modality", "image") == "audio"


def frontend_of(data_cfg: Mapping[str, Any]) -> MelFrontend:
    return MelFrontend(MelConfig(**data_cfg["source"]["audio"]))


def audio_record(data_cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What samples.json says about the WAV files (None for image checkpoints)."""
    if not is_audio(data_cfg):
        return None
    frontend = frontend_of(data_cfg)
    c, vocoder = frontend.config, frontend.vocoder
    return {
        "format": "WAV, 16-bit PCM, mono",
        "sample_rate": c.sample_rate,
        "seconds_per_clip": c.num_samples / c.sample_rate,
        "vocoder": f"{type(vocoder).__name__}(iters={getattr(vocoder, 'iters', None)})",
        "front_end": c.to_dict(),
    }


def write_audio(
    images: torch.Tensor, data_cfg: Mapping[str, Any], out: Path, batch_size: int = 64
) -> list[str]:
    """Mel images (N, 1, n_mels, frames) in [-1, 1] -> `out/00000.wav ...`; returns file names."""
    from ldm.audio.wav import write_wav

    frontend = frontend_of(data_cfg)
    rate = frontend.config.sample_rate
    images = images.detach().float().cpu()
    for start in range(0, len(images), batch_size):
        waves = frontend.decode(images[start : start + batch_size])  # (B, num_samples)
        for i, wave in enumerate(waves, start):
            write_wav(out / f"{i:05d}.wav", wave, rate)
    return [f"{0:05d}.wav .. {len(images) - 1:05d}.wav"]
