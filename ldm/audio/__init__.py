"""Audio: the espeak-ng synthesizer (ctypes), the mel front end and vocoders, WAV files."""
