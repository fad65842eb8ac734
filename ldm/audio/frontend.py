"""Audio front end in plain torch: waveform <-> normalized log-mel "image", and pluggable vocoders.

Forward (`MelFrontend.encode`): resample to `sample_rate` (16 kHz) with a windowed-sinc filter,
trim silence and center the clip in a fixed window of `num_samples` = (frames - 1) * hop samples
(pad with zeros or cut), STFT (Hann window `n_fft`, hop `hop_length`, centered frames), power
spectrum -> mel filterbank (HTK mel scale, `n_mels` triangles from `f_min` to `f_max`) -> dB, and
the fixed dB range [`min_db`, `max_db`] mapped linearly to [-1, 1] (clamped). The result is a
(1, n_mels, frames) image, low frequencies at the bottom row (image convention: row 0 at the top).

Defaults (64 mels x 64 frames): 16 kHz, n_fft 1024 (64 ms window, 15.6 Hz bins), hop 256 (16 ms),
window 63 * 256 = 16,128 samples (1.008 s). Waveforms are peak-normalized to 0.9 before analysis,
so the dB range is relative to full scale and the normalization needs no per-clip statistics:
`min_db`/`max_db` are the stored statistics (they live in the data config, which every
checkpoint stores), chosen from the measured range of the dataset (ldm.data.spoken_digits).

Inverse (`MelFrontend.decode`): [-1, 1] -> dB -> mel power -> linear magnitude through the
filterbank's pseudo-inverse (clamped at 0), then a `Vocoder` makes the waveform: `GriffinLim`
(Griffin & Lim 1984, "Signal estimation from modified short-time Fourier transform", with the
momentum of Perraudin et al. 2013, "A fast Griffin-Lim algorithm"). A neural vocoder can replace
it: any nn.Module with `forward(magnitude (B, n_fft//2+1, T)) -> waveform (B, N)`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.utils.errors import UserError

PEAK = 0.9  # waveforms are scaled to this peak before analysis and after synthesis


@dataclass(frozen=True)
class MelConfig:
    """The front end's settings, stored in each checkpoint's data config (`data.source.audio`)."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 64
    frames: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    min_db: float = -80.0
    max_db: float = 0.0
    trim_db: float = 40.0  # silence: frames more than this below the clip's loudest frame

    @property
    def num_samples(self) -> int:
        """Samples per clip: centered STFT frames give 1 + num_samples / hop = `frames`."""
        return (self.frames - 1) * self.hop_length

    def check(self) -> MelConfig:
        if self.n_fft < self.hop_length or self.hop_length <= 0:
            raise UserError(
                f"data.source.audio.hop_length={self.hop_length} must be in (0, n_fft={self.n_fft}]"
            )
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise UserError(
                "data.source.audio: need 0 <= f_min < f_max <= sample_rate / 2 = "
                f"{self.sample_rate / 2:g} "
                f"(got f_min={self.f_min}, f_max={self.f_max})"
            )
        if self.min_db >= self.max_db:
            raise UserError(
                f"data.source.audio.min_db={self.min_db} must be < max_db={self.max_db}"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float, f_max: float
) -> torch.Tensor:
    """(n_mels, n_freqs) triangular filters, evenly spaced on the HTK mel scale, peak 1 (no area
    normalization); every filter covers at least one FFT bin at the defaults."""
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)  # (F,)
    edges = mel_to_hz(
        torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    )
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    up = (freqs - lower) / (center - lower)
    down = (upper - freqs) / (upper - center)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()  # (M, F)


@functools.lru_cache(maxsize=8)
def sinc_kernel(
    orig: int, new: int, zeros: int = 16, rolloff: float = 0.945
) -> tuple[torch.Tensor, int]:
    """(new, 1, K) polyphase Hann-windowed sinc low-pass kernel for `orig` -> `new` (coprime), and
    its half width; cutoff at `rolloff` x the lower Nyquist."""
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / cutoff)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig  # (1, 1, K)
    t = (-torch.arange(new, dtype=torch.float64)[:, None, None] / new + idx) * cutoff  # (new, 1, K)
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1.0, t))
    return (kernel * window * cutoff / orig).float(), width


def resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited resampling of (..., N) from `orig` to `new` Hz: a Hann-windowed sinc low-pass
    evaluated as a polyphase conv1d (the method of torchaudio's `resample`, sinc_interp_hann, 16
    zero crossings, rolloff 0.945). Output length ceil(N * new / orig)."""
    if orig == new:
        return x
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    kernel, width = sinc_kernel(orig, new)
    shape, length = x.shape, x.shape[-1]
    x = x.reshape(-1, 1, length).float()
    y = F.conv1d(F.pad(x, (width, width + orig)), kernel, stride=orig)  # (B, new, frames)
    out_len = math.ceil(new * length / orig)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[..., :out_len]
    return y.reshape(*shape[:-1], out_len)


class Vocoder(nn.Module):
    """Linear STFT magnitude (B, n_fft // 2 + 1, T) -> waveform (B, (T - 1) * hop)."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length


class GriffinLim(Vocoder):
    """Phase from magnitude by `iters` fast Griffin-Lim iterations (momentum 0.99), seeded phase."""

    def __init__(
        self, n_fft: int, hop_length: int, iters: int = 32, momentum: float = 0.99, seed: int = 0
    ):
        super().__init__(n_fft, hop_length)
        self.iters, self.momentum, self.seed = iters, momentum, seed
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def stft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stft(
            x, self.n_fft, self.hop_length, window=self.window, center=True, return_complex=True
        )

    def istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        return torch.istft(
            spec, self.n_fft, self.hop_length, window=self.window, center=True, length=length
        )

    @torch.no_grad()
    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        length = (magnitude.shape[-1] - 1) * self.hop_length
        generator = torch.Generator().manual_seed(self.seed)
        phase = torch.rand(magnitude.shape, generator=generator).to(magnitude.device) * 2 * math.pi
        angles = torch.polar(torch.ones_like(magnitude), phase)
        previous = torch.zeros_like(angles)
        for _ in range(self.iters):
            rebuilt = self.stft(self.istft(magnitude * angles, length))
            accelerated = rebuilt - self.momentum / (1 + self.momentum) * previous
            angles = accelerated / accelerated.abs().clamp_min(1e-16)
            previous = rebuilt
        return self.istft(magnitude * angles, length)


class MelFrontend(nn.Module):
    """Waveform (B, N) at `sample_rate` <-> mel image (B, 1, n_mels, frames) in [-1, 1]."""

    def __init__(self, config: MelConfig | None = None, vocoder: Vocoder | None = None, **settings):
        super().__init__()
        self.config = (config or MelConfig(**settings)).check()
        c = self.config
        n_freqs = c.n_fft // 2 + 1
        fb = mel_filterbank(n_freqs, c.n_mels, c.sample_rate, c.f_min, c.f_max)  # (M, F)
        self.register_buffer("filterbank", fb, persistent=False)
        self.register_buffer(
            "inverse_filterbank", torch.linalg.pinv(fb), persistent=False
        )  # (F, M)
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        self.power_scale = float(self.window.sum()) ** 2 / 4  # |STFT|^2 of a unit sine's peak bin
        self.vocoder = vocoder if vocoder is not None else GriffinLim(c.n_fft, c.hop_length)

    # ---- waveform preparation
    def fit_window(self, wave: torch.Tensor) -> torch.Tensor:
        """(N,) mono waveform -> (num_samples,): silence trimmed (frames `trim_db` below the
        loudest), the rest centered in the window (zero padding) or center-cropped when longer;
        peak PEAK."""
        c = self.config
        wave = wave.float()
        frame = c.hop_length
        n = (len(wave) // frame) * frame
        if n >= frame:
            energy = wave[:n].reshape(-1, frame).pow(2).mean(1)  # (frames,)
            db = 10 * torch.log10(energy.clamp_min(1e-12))
            loud = torch.nonzero(db > db.max() - c.trim_db).flatten()
            wave = wave[loud[0] * frame : (loud[-1] + 1) * frame]
        target = c.num_samples
        if len(wave) > target:
            start = (len(wave) - target) // 2
            wave = wave[start : start + target]
        left = (target - len(wave)) // 2
        wave = F.pad(wave, (left, target - len(wave) - left))
        peak = wave.abs().max()
        return wave * (PEAK / peak) if peak > 0 else wave

    # ---- forward
    def mel_db(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, n_mels, frames) mel power in dB (re full scale)."""
        spec = torch.stft(
            wave,
            self.config.n_fft,
            self.config.hop_length,
            window=self.window,
            center=True,
            return_complex=True,
        )
        power = spec.abs().pow(2) / self.power_scale  # (B, F, T); a full-scale sine peaks near 0 dB
        return 10 * torch.log10((self.filterbank @ power).clamp_min(1e-10))

    def normalize(self, db: torch.Tensor) -> torch.Tensor:
        c = self.config
        return ((db - c.min_db) / (c.max_db - c.min_db) * 2 - 1).clamp(-1, 1)

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        c = self.config
        return (image.clamp(-1, 1) + 1) / 2 * (c.max_db - c.min_db) + c.min_db

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """Windowed waveforms (B, num_samples) -> images (B, 1, n_mels, frames) in [-1, 1],
        low frequencies at the bottom."""
        return self.normalize(self.mel_db(wave)).flip(-2).unsqueeze(1)

    # ---- inverse
    def magnitude(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, n_mels, frames) -> linear STFT magnitude (B, n_fft // 2 + 1, frames)."""
        mel_power = 10 ** (self.denormalize(image.squeeze(1).flip(-2)) / 10)  # (B, M, T)
        power = (self.inverse_filterbank @ mel_power).clamp_min(0) * self.power_scale
        return power.sqrt()

    @torch.no_grad()
    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, n_mels, frames) in [-1, 1] -> waveforms (B, num_samples) peaked at PEAK."""
        wave = self.vocoder(self.magnitude(image.float()))
        peak = wave.abs().amax(-1, keepdim=True).clamp_min(1e-8)
        return wave * (PEAK / peak)

    def round_trip(self, image: torch.Tensor) -> torch.Tensor:
        """What a listener's spectrogram of the generated sound is: image -> waveform -> image."""
        return self.encode(self.decode(image))


class RoundTrip(nn.Module):
    """Mel image -> waveform (the vocoder) -> mel image: what the metrics see of generated audio,
    so FID/KID/CAS judge the sound, not the spectrogram the model drew."""

    def __init__(self, frontend: MelFrontend):
        super().__init__()
        self.frontend = frontend
        vocoder = frontend.vocoder
        settings = {
            **frontend.config.to_dict(),
            "vocoder": type(vocoder).__name__,
            **{
                k: getattr(vocoder, k) for k in ("iters", "momentum", "seed") if hasattr(vocoder, k)
            },
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        self.cache_key = f"roundtrip-{digest}"  # names it in cached reference scores

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.frontend.round_trip(image)
