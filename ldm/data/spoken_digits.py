"""Spoken digits: the ten English digit words synthesized by espeak-ng, as 1-channel mel "images".

Synthetic speech, made offline: espeak-ng (a formant synthesizer, GPL-3.0, called at run time
through the `espeakng-loader` wheel, ldm.audio.espeak) speaks "zero" .. "nine" in many voices.
A voice is an English accent (`accents`, e.g. en-us, en-gb-scotland) with one of espeak-ng's
voice variants (`m3`, `f2`, `klatt4`, `whisper`, ...: timbre, pitch range, breathiness). Each clip
draws its voice, speaking rate (words per minute), base pitch and pitch range from a numpy RNG
seeded by `seed`, so the same settings give the same clips on any machine.

Clips are resampled to 16 kHz, silence-trimmed, centered in a ~1 s window and turned into
normalized log-mel images (ldm.audio.frontend) of shape (1, n_mels, frames) in [-1, 1]. The clips
(int16 waveforms) and images are generated once and cached under
`<cache_dir>/spoken_digits/clips_<hash of the settings>.pt`, built once under a file lock and
renamed into place (ldm.utils.cache_lock.build_once); a cached dataset needs no synthesizer.

Split: by voice variant, so the validation split holds voices never heard in training
(`split`, called by ImageDataModule instead of its random split). The held-out variants are a
seeded choice of `val_fraction` of all variants, across all accents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.audio.frontend import MelConfig, MelFrontend, resample
from ldm.data.sources import Source, TensorImageDataset, tensor_fingerprint
from ldm.utils.cache_lock import build_once
from ldm.utils.checkpoint import read_torch_file
from ldm.utils.errors import UserError

log = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = (
    "en-us",
    "en",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
CACHE_VERSION = 3  # bump when the synthesis or front-end code changes what is cached


class SpokenDigitsDataset(TensorImageDataset):
    """Mel images (N, 1, n_mels, frames) and labels (N,), plus each clip's waveform and voice."""

    def __init__(self, images, labels, waves, clips: list[dict[str, Any]], sample_rate: int):
        super().__init__(images, labels)
        self.waves, self.clips, self.sample_rate = waves, clips, sample_rate  # waves: (N, S) int16


class SpokenDigits(Source):
    """Source for ImageDataModule (`data=spoken_digits`); see the module docstring.

    Args:
        num_clips: clips made (cycling through the digits: num_clips / 10 per digit).
        seed: the voice/rate/pitch draw of every clip.
        cache_dir: root of the cache (`${paths.cache_dir}`).
        audio: front-end settings (ldm.audio.frontend.MelConfig fields).
        accents: espeak-ng English voices the variants are combined with.
        variants: espeak-ng variant names; null: all the library ships.
        rate: [min, max] speaking rate, words per minute.
        pitch: [min, max] base pitch (espeak-ng scale 0-100).
        pitch_range: [min, max] intonation range (0-100).
    """

    name = "spoken_digits"
    num_classes = 10
    modality = "audio"

    def __init__(
        self,
        num_clips: int = 3000,
        seed: int = 0,
        cache_dir: str | Path = ".cache/ldm",
        audio: dict[str, Any] | None = None,
        accents: list[str] | tuple[str, ...] = ACCENTS,
        variants: list[str] | None = None,
        rate: tuple[int, int] | list[int] = (130, 230),
        pitch: tuple[int, int] | list[int] = (20, 80),
        pitch_range: tuple[int, int] | list[int] = (20, 80),
    ):
        if num_clips < 10:
            raise UserError(f"data.source.num_clips={num_clips} must be >= 10 (one per digit)")
        for key, (lo, hi) in (("rate", rate), ("pitch", pitch), ("pitch_range", pitch_range)):
            if not 0 <= lo <= hi:
                raise UserError(f"data.source.{key}=[{lo}, {hi}] must be 0 <= min <= max")
        self.num_clips, self.seed, self.cache_dir = num_clips, seed, Path(cache_dir)
        self.audio = MelConfig(**(audio or {})).check()
        self.frontend = MelFrontend(self.audio)
        self.accents, self.variant_names = list(accents), variants
        self.rate, self.pitch, self.pitch_range = list(rate), list(pitch), list(pitch_range)

    # ---- what is made
    def variants(self) -> list[str]:
        """The voice variants to draw from: the configured ones, else all espeak-ng ships."""
        if self.variant_names is not None:
            return list(self.variant_names)
        from ldm.audio.espeak import variants

        return variants()

    def settings(self) -> dict[str, Any]:
        """Everything the clips depend on (keys the cache; no library needed to compute it)."""
        return {
            "version": CACHE_VERSION,
            "num_clips": self.num_clips,
            "seed": self.seed,
            "audio": self.audio.to_dict(),
            "accents": self.accents,
            "variants": "all" if self.variant_names is None else list(self.variant_names),
            "rate": self.rate,
            "pitch": self.pitch,
            "pitch_range": self.pitch_range,
        }

    def cache_path(self, settings: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / "spoken_digits" / f"clips_{key}.pt"

    def plan(self, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """Every clip's word, voice, rate and pitch, drawn from the seeded RNG."""
        rng = np.random.default_rng(settings["seed"])
        variants, accents = self.variants(), settings["accents"]
        clips = []
        for i in range(settings["num_clips"]):
            variant = variants[rng.integers(len(variants))]
            accent = accents[rng.integers(len(accents))]
            clips.append(
                {
                    "label": i % 10,
                    "word": DIGIT_WORDS[i % 10],
                    "accent": accent,
                    "variant": variant,
                    "rate": int(rng.integers(self.rate[0], self.rate[1] + 1)),
                    "pitch": int(rng.integers(self.pitch[0], self.pitch[1] + 1)),
                    "pitch_range": int(rng.integers(self.pitch_range[0], self.pitch_range[1] + 1)),
                    "noise_seed": int(rng.integers(2**31 - 1)),
                }
            )
        return clips

    def synthesize(self, clips: list[dict[str, Any]]) -> torch.Tensor:
        """Speak the planned clips -> windowed 16 kHz waveforms (N, num_samples) int16. Each clip
        is spoken from a fresh synthesizer state (ldm.audio.espeak.speak_many): reproducible."""
        from ldm.audio.espeak import speak_many

        requests = [
            {
                "text": c["word"],
                "voice": f"{c['accent']}+{c['variant']}",
                "rate": c["rate"],
                "pitch": c["pitch"],
                "pitch_range": c["pitch_range"],
                "seed": c["noise_seed"],
            }
            for c in clips
        ]
        rate, pcms = speak_many(requests)
        waves = torch.empty(len(clips), self.audio.num_samples, dtype=torch.int16)
        for i, (clip, pcm) in enumerate(zip(clips, pcms)):
            if len(pcm) == 0:
                raise RuntimeError(f"espeak-ng produced no audio for clip {i}: {clip}")
            clip["seconds"] = round(len(pcm) / rate, 4)
            wave = resample(
                torch.from_numpy(pcm.astype(np.float32) / 32768.0), rate, self.audio.sample_rate
            )
            waves[i] = (self.frontend.fit_window(wave) * 32767).round().to(torch.int16)
        return waves

    def images(self, waves: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """int16 waveforms (N, S) -> mel images (N, 1, n_mels, frames) in [-1, 1]."""
        out = [
            self.frontend.encode(waves[i : i + batch_size].float() / 32767.0)
            for i in range(0, len(waves), batch_size)
        ]
        return torch.cat(out)

    def db_statistics(self, waves: torch.Tensor) -> dict[str, float]:
        """Percentiles of the mel dB values of up to 500 clips, over the bins above the -100 dB
        floor (the silent padding): what `min_db` / `max_db` were chosen from."""
        db = self.frontend.mel_db(waves[:500].float() / 32767.0).flatten()
        voiced = db[db > -99.0]
        pick = torch.randperm(len(voiced), generator=torch.Generator().manual_seed(0))[:200000]
        q = torch.tensor([0.01, 0.05, 0.25, 0.5, 0.95, 0.99, 0.999])
        values = [*torch.quantile(voiced[pick], q).tolist(), float(voiced.max())]
        names = ["p1", "p5", "p25", "p50", "p95", "p99", "p99.9", "max"]
        stats = {k: round(v, 2) for k, v in zip(names, values)}
        stats["floor_fraction"] = round(1 - len(voiced) / len(db), 4)
        return stats

    def generate(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Synthesize every clip and its mel image (the cache's content)."""
        start = time.perf_counter()
        clips = self.plan(settings)
        waves = self.synthesize(clips)
        payload = {
            "settings": settings,
            "clips": clips,
            "waves": waves,
            "images": self.images(waves),
            "labels": torch.tensor([c["label"] for c in clips], dtype=torch.long),
            "db_statistics": self.db_statistics(waves),
        }
        log.info(
            "spoken digits: synthesized %d clips with espeak-ng in %.1fs (mel dB percentiles %s)",
            len(clips),
            time.perf_counter() - start,
            payload["db_statistics"],
        )
        return payload

    def build(self) -> SpokenDigitsDataset:
        """The clips from the cache, synthesized first (once, under a lock) if absent."""
        settings = self.settings()
        path = build_once(
            self.cache_path(settings),
            lambda tmp: torch.save(self.generate(settings), tmp),
            "spoken digits clips",
        )
        payload = read_torch_file(path, what="spoken digits cache")
        if payload.get("settings") != settings:
            raise UserError(f"spoken digits cache {str(path)!r} holds other settings; delete it")
        return SpokenDigitsDataset(
            payload["images"],
            payload["labels"],
            payload["waves"],
            payload["clips"],
            self.audio.sample_rate,
        )

    def fingerprint(self, dataset: SpokenDigitsDataset) -> str:
        return f"{self.name}-{tensor_fingerprint(dataset.images, dataset.labels)}"

    # ---- split by voice
    def split(
        self, dataset: SpokenDigitsDataset, val_fraction: float, seed: int
    ) -> tuple[list[int], list[int]]:
        """(train, val) clip indices: the val clips are those of a seeded `val_fraction` of the
        voice variants, so no validation voice is heard in training."""
        if not 0.0 < val_fraction < 1.0:
            raise UserError(
                f"data.val_fraction={val_fraction} must be in (0, 1): spoken digits hold out voices"
            )
        variants = sorted({c["variant"] for c in dataset.clips})
        if len(variants) < 2:
            raise UserError(
                f"data.source.variants holds {len(variants)} voice; the voice split needs >= 2"
            )
        order = torch.randperm(len(variants), generator=torch.Generator().manual_seed(seed))
        n_val = min(max(1, round(len(variants) * val_fraction)), len(variants) - 1)
        held_out = {variants[i] for i in order[:n_val].tolist()}
        train = [i for i, c in enumerate(dataset.clips) if c["variant"] not in held_out]
        val = [i for i, c in enumerate(dataset.clips) if c["variant"] in held_out]
        if not train or not val:
            raise UserError(
                f"data.source.num_clips={len(dataset)} is too few to hold out voices "
                f"({len(train)} train / {len(val)} val clips)"
            )
        return train, val
