"""Whisper's time grid, in one place that imports neither torch nor whisper (the app and mining need it too).

The values are Whisper's own (`whisper.audio.SAMPLE_RATE`, `HOP_LENGTH`); tests/test_structure.py checks them
against the installed whisper. One encoder position covers two log-mel frames (the second conv has stride 2).
`frame_loudness_db` measures the audio on the same grid (one value per activation row).
"""

import numpy as np

SAMPLE_RATE = 16000  # Hz, whisper.audio.SAMPLE_RATE
HOP_LENGTH = 160  # samples per log-mel frame, whisper.audio.HOP_LENGTH
MEL_FRAME_SECONDS = HOP_LENGTH / SAMPLE_RATE  # one log-mel column
SAMPLES_PER_FRAME = 2 * HOP_LENGTH  # one encoder position (one activation row)
FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE


def frame_loudness_db(audio: np.ndarray) -> np.ndarray:
    """RMS level in dB (re full scale 1.0; floor 1e-10, i.e. -200 dB) of each 20 ms frame of 16 kHz mono `audio`:
    frame t is samples [t, t+1) x SAMPLES_PER_FRAME, the last partial frame included (RMS over the samples it has),
    so ceil(len / SAMPLES_PER_FRAME) values."""
    audio = np.asarray(audio, np.float32).ravel()
    n_full, rest = divmod(len(audio), SAMPLES_PER_FRAME)
    full = audio[: n_full * SAMPLES_PER_FRAME].reshape(n_full, SAMPLES_PER_FRAME)
    power = np.einsum("ij,ij->i", full, full, dtype=np.float64) / SAMPLES_PER_FRAME
    if rest:
        tail = audio[n_full * SAMPLES_PER_FRAME :].astype(np.float64)
        power = np.r_[power, np.dot(tail, tail) / rest]
    return 20 * np.log10(np.maximum(np.sqrt(power), 1e-10))


__all__ = ["FRAME_SECONDS", "HOP_LENGTH", "MEL_FRAME_SECONDS", "SAMPLES_PER_FRAME", "SAMPLE_RATE", "frame_loudness_db"]
