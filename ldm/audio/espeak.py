"""espeak-ng speech synthesis through ctypes: text -> 16-bit PCM at the library's rate (22,050 Hz).

The library and its voice data come from the `espeakng-loader` wheel (PyPI). espeak-ng is GPL-3.0:
ldm calls it at run time as a dependency and ships none of it. It is a formant synthesizer, so the
speech it makes is synthetic (clear, robotic), not recorded human speech.

The C API used (espeak-ng's `speak_lib.h`): `espeak_Initialize` in synchronous mode with a synth
callback that collects the samples, `espeak_SetVoiceByName("en-us+f3")` (language + variant),
`espeak_SetParameter` for rate (words per minute), pitch (0-100) and pitch range (0-100), and
`espeak_Synth` + `espeak_Synchronize`. The library holds global state, so one process-wide
`Synthesizer` is used and calls are serialized with a lock.

Reproducible clips (`speak_many`): espeak-ng carries state from one utterance to the next (the same
word in the same voice twice gives different samples, even after re-seeding) and draws noise from
its own generator (`espeak_ng_SetRandSeed`) and libc `rand()`. So
each clip is spoken by a forked child of a small worker process (`python -m ldm.audio.espeak`,
no torch) that initialised the library and never spoke itself, after seeding both generators
with the request's seed: every clip is
then a function of its own request only, whatever was spoken before (measured here).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from ldm.utils.errors import UserError

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_CHARS_UTF8 = 1
POS_CHARACTER = 1
# espeak_PARAMETER
RATE, VOLUME, PITCH, RANGE = 1, 2, 3, 4
EE_OK = 0

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

INSTALL_HINT = "pip install espeakng-loader (espeak-ng, GPL-3.0, used as a run-time dependency)"


class Synthesizer:
    """The espeak-ng library, loaded once; `speak(text, voice, rate, pitch, pitch_range)` -> PCM."""

    def __init__(self, library: str | Path, data_dir: str | Path):
        try:
            self.lib = ctypes.CDLL(str(library))
        except OSError as err:
            raise UserError(
                f"the espeak-ng synthesizer library {str(library)!r} cannot be loaded ({err}); "
                f"{INSTALL_HINT}"
            ) from err
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.sample_rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_dir).encode(), 0
        )
        if self.sample_rate <= 0:
            raise UserError(
                f"espeak-ng failed to initialise with its data in {str(data_dir)!r}; {INSTALL_HINT}"
            )
        self.chunks: list[np.ndarray] = []
        self.callback = _CALLBACK(self.collect)  # kept referenced: the library calls it later
        lib.espeak_SetSynthCallback(self.callback)
        self.lock = threading.Lock()

    def collect(self, wav, num_samples, _events) -> int:
        if num_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0: continue synthesis

    def speak(
        self,
        text: str,
        voice: str = "en-us",
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
    ) -> np.ndarray:
        """int16 samples (N,) at `self.sample_rate` of `text` spoken by `voice` ("lang+variant")."""
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
                raise UserError(f"espeak-ng has no voice {voice!r}")
            for param, value in ((RATE, rate), (PITCH, pitch), (RANGE, pitch_range)):
                self.lib.espeak_SetParameter(param, int(value), 0)
            self.chunks = []
            data = text.encode() + b"\0"
            err = self.lib.espeak_Synth(
                data, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None
            )
            if err != EE_OK:
                raise RuntimeError(f"espeak_Synth failed with error {err} on {text!r}")
            self.lib.espeak_Synchronize()
            chunks, self.chunks = self.chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


def espeak_paths() -> tuple[Path, Path]:
    """(shared library, voice data dir) of the installed espeakng-loader, or a UserError."""
    try:
        import espeakng_loader
    except ImportError as err:
        raise UserError(
            f"the espeak-ng speech synthesizer is not installed: {INSTALL_HINT}"
        ) from err
    library = Path(espeakng_loader.get_library_path())
    if not library.is_file():
        raise UserError(
            f"the espeak-ng synthesizer library is missing at {str(library)!r}; {INSTALL_HINT}"
        )
    try:
        data_dir = Path(espeakng_loader.get_data_path())
    except RuntimeError as err:
        raise UserError(f"espeak-ng voice data missing ({err}); {INSTALL_HINT}") from err
    return library, data_dir


@functools.cache
def synthesizer() -> Synthesizer:
    """The process-wide espeak-ng synthesizer (loaded on first use)."""
    return Synthesizer(*espeak_paths())


def variants() -> list[str]:
    """Names of the voice variants espeak-ng ships (e.g. "f3", "klatt2", "whisper"), sorted."""
    _, data_dir = espeak_paths()
    return sorted(p.name for p in (data_dir / "voices" / "!v").iterdir() if p.is_file())


def speak_many(requests: list[dict]) -> tuple[int, list[np.ndarray]]:
    """(sample rate, int16 PCM per request) for requests {"text", "voice", "rate", "pitch",
    "pitch_range", "seed"}, each spoken from a freshly initialised library (module doc)."""
    espeak_paths()  # a missing synthesizer fails here, in one line
    worker = subprocess.Popen(
        [sys.executable, "-m", "ldm.audio.espeak"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        header = worker.stdout.read(4)
        if len(header) < 4:
            raise UserError(
                f"the espeak-ng worker failed to start: {worker.stderr.read().decode()[-300:]!r}"
            )
        rate, clips = int.from_bytes(header, "little"), []
        for request in requests:
            worker.stdin.write((json.dumps(request) + "\n").encode())
            worker.stdin.flush()
            size = int.from_bytes(worker.stdout.read(4), "little")
            clips.append(np.frombuffer(worker.stdout.read(size), dtype=np.int16).copy())
        return rate, clips
    finally:
        worker.stdin.close()
        worker.wait(timeout=30)


def serve() -> None:
    """The worker of `speak_many`: one request per stdin line, each answered on stdout with a
    4-byte length and the PCM bytes, spoken by a forked child (so this process's state stays
    pristine)."""
    synth, out = synthesizer(), sys.stdout.buffer
    libc = ctypes.CDLL(None)
    out.write(synth.sample_rate.to_bytes(4, "little"))
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: speak from the parent's untouched state
            os.close(read_end)
            code = 0
            try:
                seed = int(request.get("seed", 0))
                synth.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))  # its own noise generator
                libc.srand(seed)  # and libc rand(), which it also calls
                pcm = synth.speak(
                    request["text"],
                    request["voice"],
                    request["rate"],
                    request["pitch"],
                    request["pitch_range"],
                ).tobytes()
                with os.fdopen(write_end, "wb") as f:
                    f.write(pcm)
            except BaseException:  # an empty answer: the caller reports the clip
                code = 1
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            pcm = f.read()
        os.waitpid(pid, 0)
        out.write(len(pcm).to_bytes(4, "little") + pcm)
        out.flush()


if __name__ == "__main__":
    serve()
