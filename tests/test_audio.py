"""Audio: the mel front end and Griffin-Lim, synthetic spoken digits, WAV files, an audio run end to
end, and the refusals between image and audio paths."""

from __future__ import annotations

import math
import sys
import wave
from pathlib import Path

import pytest
import torch

from ldm.audio.frontend import GriffinLim, MelConfig, MelFrontend, resample
from ldm.audio.wav import read_wav, write_wav
from ldm.data.spoken_digits import SpokenDigits
from ldm.utils.errors import UserError
from tests.conftest import ROOT, compose_config

IMAGE_CKPT = ROOT / "tests" / "fixtures" / "diffusion_6fef1e3_debug_fast.ckpt"
# 32 mels x 32 frames (0.5 s): a small front end for fast tests.
SMALL_AUDIO = {"n_mels": 32, "frames": 32}


def spoken(word: str = "seven", voice: str = "en-us+m3") -> torch.Tensor:
    """One espeak-ng clip at 16 kHz, float in [-1, 1]."""
    from ldm.audio.espeak import synthesizer

    synth = synthesizer()
    pcm = torch.from_numpy(synth.speak(word, voice).astype("float32") / 32768.0)
    return resample(pcm, synth.sample_rate, 16000)


# ------------------------------------------------------------------------------ front end
def test_resample_keeps_a_sine():
    t = torch.arange(22050) / 22050
    out = resample(torch.sin(2 * math.pi * 1000 * t), 22050, 16000)
    ref = torch.sin(2 * math.pi * 1000 * torch.arange(16000) / 16000)
    assert out.shape == (16000,)
    assert (out[200:-200] - ref[200:-200]).abs().max() < 5e-3  # edges: zero padding


def test_mel_shape_range_and_full_scale_sine():
    fe = MelFrontend()
    c = fe.config
    assert c.num_samples == 63 * 256 and (c.n_mels, c.frames) == (64, 64)
    sine = 0.9 * torch.sin(2 * math.pi * 440 * torch.arange(c.num_samples) / 16000)[None]
    image = fe.encode(sine)
    assert image.shape == (1, 1, 64, 64) and image.min() >= -1 and image.max() <= 1
    assert -3.0 < fe.mel_db(sine).max() < 1.0  # a full-scale sine sits near 0 dB (0.9 -> -0.9 dB)
    # low frequencies at the bottom row: 440 Hz is in the lower third of the rows
    assert image[0, 0, :, 32].argmax() > 40


def test_griffin_lim_round_trip_error_is_bounded():
    fe = MelFrontend()
    waves = torch.stack(
        [fe.fit_window(spoken(w, v)) for w, v in [("seven", "en-us+m3"), ("two", "en+f2")]]
    )
    image = fe.encode(waves)
    error = (fe.round_trip(image) - image).abs().mean()
    assert error < 0.08  # measured 0.04 on 80 dataset clips: a few dB on an 80 dB range
    # the bound means something: with 0 iterations (random phase) the error is far larger
    no_phase = MelFrontend(vocoder=GriffinLim(1024, 256, iters=0))
    assert (no_phase.round_trip(image) - image).abs().mean() > 1.5 * error


# ------------------------------------------------------------------------------ dataset
def test_spoken_digits_deterministic_split_by_voice_and_cached(tmp_path, monkeypatch):
    kw = {"num_clips": 20, "audio": SMALL_AUDIO, "variants": ["m1", "m3", "f2", "f4", "klatt"]}
    a = SpokenDigits(cache_dir=tmp_path / "a", **kw).build()
    b = SpokenDigits(cache_dir=tmp_path / "b", **kw).build()
    other = SpokenDigits(cache_dir=tmp_path / "c", seed=1, **kw).build()
    assert a.images.shape == (20, 1, 32, 32) and a.labels.tolist() == [i % 10 for i in range(20)]
    assert torch.equal(a.images, b.images) and torch.equal(a.waves, b.waves)
    assert not torch.equal(a.images, other.images)
    assert a.images.min() >= -1 and a.images.max() <= 1

    source = SpokenDigits(cache_dir=tmp_path / "a", **kw)
    train, val = source.split(a, 0.4, seed=0)
    assert sorted(train + val) == list(range(20))
    train_voices = {a.clips[i]["variant"] for i in train}
    val_voices = {a.clips[i]["variant"] for i in val}
    assert len(val_voices) == 2 and not train_voices & val_voices
    assert source.split(a, 0.4, seed=0) == (train, val)

    # A cached dataset is read back, not synthesized again (no synthesizer needed).
    import ldm.audio.espeak as espeak

    monkeypatch.setattr(espeak, "synthesizer", lambda: pytest.fail("synthesized again"))
    assert torch.equal(source.build().images, a.images)


def test_datamodule_uses_the_voice_split(tmp_path):
    cfg = compose_config(
        ["data=spoken_digits", "data.image_size=32", "data.source.num_clips=30"], tmp_path
    )
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, batch_size=8)
    dm.setup()
    assert dm.modality == "audio"
    held_out = {dm.full_dataset.clips[i]["variant"] for i in dm.val_dataset.indices}
    heard = {dm.full_dataset.clips[i]["variant"] for i in dm.train_dataset.indices}
    assert held_out and not held_out & heard


# ------------------------------------------------------------------------------ WAV and bad input
def test_wav_written_is_valid_16_bit_pcm(tmp_path):
    x = 0.5 * torch.sin(2 * math.pi * 300 * torch.arange(16000) / 16000)
    write_wav(tmp_path / "a.wav", x, 16000)
    with wave.open(str(tmp_path / "a.wav"), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert w.getnframes() == 16000
    back, rate = read_wav(tmp_path / "a.wav", 16000)
    assert rate == 16000 and (back - x).abs().max() < 1e-4


def test_bad_audio_input_one_line_each(tmp_path, monkeypatch):
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all")
    with pytest.raises(UserError, match="is not a PCM WAV audio file"):
        read_wav(text, 16000)
    write_wav(tmp_path / "short.wav", torch.zeros(500), 16000)
    with pytest.raises(UserError, match=r"500 samples .* shorter than the 1024-sample"):
        read_wav(tmp_path / "short.wav", 16000, min_samples=1024)
    write_wav(tmp_path / "cd.wav", torch.zeros(22050), 22050)
    with pytest.raises(UserError, match="sampled at 22050 Hz but 16000 Hz is expected"):
        read_wav(tmp_path / "cd.wav", 16000)
    assert read_wav(tmp_path / "cd.wav", 16000, resample=True)[0].shape == (16000,)

    import ldm.audio.espeak as espeak

    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # not installed
    with pytest.raises(UserError, match="speech synthesizer is not installed: pip install espeak"):
        espeak.espeak_paths()
    with pytest.raises(UserError, match="cannot be loaded"):
        espeak.Synthesizer(tmp_path / "libespeak-ng.so", tmp_path)
    for err in (UserError("x"),):
        assert "\n" not in str(err)


def test_front_end_settings_checked():
    with pytest.raises(UserError, match="f_max"):
        MelConfig(f_max=9000).check()
    with pytest.raises(UserError, match="min_db"):
        MelConfig(min_db=0.0, max_db=-10.0).check()


# ------------------------------------------------------------------------------ end to end
AUDIO_FAST = [
    "debug=fast",
    "data=spoken_digits",
    "data.image_size=32",
    "data.source.num_clips=100",
    "fid.num_samples=20",
    "fid.kid_subset_size=10",
]


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory) -> Path:
    from ldm.train import run as train_run

    root = tmp_path_factory.mktemp("audio_run")
    cfg = compose_config(AUDIO_FAST, root)
    train_run(cfg)
    return root


@pytest.mark.slow
def test_audio_debug_fast_end_to_end(audio_run, tmp_path):
    """Both stages on spoken digits, FID after the waveform round trip, WAVs during validation,
    then sample.py writes valid WAVs of the right length and rate and ldm.audio.listen hears
    them."""
    import json

    from omegaconf import open_dict

    from ldm.audio.listen import listen
    from ldm.sample import run as sample_run

    run_dir = audio_run / "run"
    stage2 = run_dir / "checkpoints" / "diffusion" / "last.ckpt"
    assert stage2.is_file()
    assert len(list(run_dir.rglob("audio/epoch000_*_digit*.wav"))) == 10  # AudioSamples callback
    cfg = compose_config(
        [
            f"ckpt={stage2}",
            f"out_dir={tmp_path / 'out'}",
            "device=cpu",
            "num_samples=4",
            "sampler.steps=4",
        ],
        tmp_path,
        config_name="sample",
    )
    with open_dict(cfg):
        cfg.fid = True
        cfg.metrics.classifier.epochs = 1
        cfg.metrics.kid_subset_size = 2
    record = sample_run(cfg)
    out = tmp_path / "out"
    assert record["audio"]["sample_rate"] == 16000
    assert "00000.wav .. 00003.wav" in json.loads((out / "samples.json").read_text())["files"]
    for i in range(4):
        with wave.open(str(out / f"{i:05d}.wav"), "rb") as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
            assert w.getnframes() == 31 * 256  # the 32-frame window
    assert 0.0 <= record["metrics"]["cas"] <= 1.0
    rows = listen(stage2, [out / "00000.wav"])
    assert 0 <= rows[0]["heard_digit"] <= 9 and rows[0]["duration_s"] > 0


@pytest.mark.slow
def test_image_and_audio_checkpoints_refused_by_the_other_path(audio_run, tmp_path):
    from ldm.audio.listen import listen
    from ldm.utils.validation import validate_config

    write_wav(tmp_path / "a.wav", torch.zeros(16000), 16000)
    with pytest.raises(UserError, match=r"is an image checkpoint .* needs an audio checkpoint"):
        listen(IMAGE_CKPT, [tmp_path / "a.wav"])
    audio_ae = audio_run / "run" / "checkpoints" / "autoencoder" / "last.ckpt"
    cfg = compose_config(
        ["debug=fast", "stage=diffusion", f"autoencoder_ckpt={audio_ae}", "data.image_size=32"],
        tmp_path,
    )
    with pytest.raises(UserError, match=r"trained on audio data .* is image data"):
        validate_config(cfg)
    cfg = compose_config(["debug=fast", "data=spoken_digits", "fid=inception"], tmp_path)
    with pytest.raises(UserError, match=r"fid.extractor=inception is for images"):
        validate_config(cfg)
