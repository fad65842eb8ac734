"""WAV files through the standard library's `wave`: 16-bit PCM out, checked reads in.

`read_wav` turns every bad input into one UserError line naming the file: not a WAV file, a
compression or sample width other than PCM 8/16/24/32-bit, a sample rate other than the expected
one (unless `resample=True`), a clip shorter than the analysis window.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch

from ldm.audio.frontend import resample as resample_wave
from ldm.utils.checkpoint import atomic_write
from ldm.utils.errors import UserError


def write_wav(path: str | Path, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write a mono waveform (N,) in [-1, 1] as 16-bit PCM (clipped), atomically."""
    pcm = (waveform.detach().float().cpu().clamp(-1, 1) * 32767).round().to(torch.int16).numpy()

    def write(f) -> None:
        with wave.open(f, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(pcm.astype("<i2").tobytes())

    atomic_write(path, write)


def read_wav(
    path: str | Path,
    sample_rate: int | None = None,
    min_samples: int = 0,
    resample: bool = False,
) -> tuple[torch.Tensor, int]:
    """(mono waveform (N,) float32 in [-1, 1], sample rate) of a PCM WAV file; channels averaged.

    `sample_rate`: the rate the caller needs; another rate is an error unless `resample=True`,
    which resamples (band-limited). `min_samples`: shorter clips (at the final rate) are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"audio file {str(path)!r} does not exist")
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as err:
        raise UserError(f"{str(path)!r} is not a PCM WAV audio file ({err})") from err
    if width not in (1, 2, 3, 4):
        raise UserError(f"{str(path)!r}: {8 * width}-bit samples are not supported (8/16/24/32)")
    raw = np.frombuffer(frames, dtype=np.uint8)
    if width == 1:
        x = (raw.astype(np.float32) - 128) / 128
    elif width == 3:
        b = raw.reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16) << 8 >> 8).astype(np.float32) / 2**23
    else:
        x = np.frombuffer(frames, dtype=f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)
    wave_ = torch.from_numpy(x.reshape(-1, channels).mean(1))  # (N,)
    if sample_rate is not None and rate != sample_rate:
        if not resample:
            raise UserError(
                f"{str(path)!r} is sampled at {rate} Hz but {sample_rate} Hz is expected "
                "(resample it, or pass resample=true)"
            )
        wave_, rate = resample_wave(wave_, rate, sample_rate), sample_rate
    if len(wave_) < min_samples:
        raise UserError(
            f"{str(path)!r} holds {len(wave_)} samples ({len(wave_) / rate * 1000:.0f} ms at "
            f"{rate} Hz), shorter than the {min_samples}-sample "
            f"({min_samples / rate * 1000:.0f} ms) analysis window"
        )
    return wave_, rate
