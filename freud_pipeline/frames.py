"""Whisper's time grid, in one place that imports neither torch nor whisper (the app and mining need it too).

The values are Whisper's own (`whisper.audio.SAMPLE_RATE`, `HOP_LENGTH`); tests/test_structure.py checks them
against the installed whisper. One encoder position covers two log-mel frames (the second conv has stride 2).
"""

SAMPLE_RATE = 16000  # Hz, whisper.audio.SAMPLE_RATE
HOP_LENGTH = 160  # samples per log-mel frame, whisper.audio.HOP_LENGTH
MEL_FRAME_SECONDS = HOP_LENGTH / SAMPLE_RATE  # one log-mel column
SAMPLES_PER_FRAME = 2 * HOP_LENGTH  # one encoder position (one activation row)
FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE

__all__ = ["FRAME_SECONDS", "HOP_LENGTH", "MEL_FRAME_SECONDS", "SAMPLES_PER_FRAME", "SAMPLE_RATE"]
