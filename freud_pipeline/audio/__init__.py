"""Audio in: decoding to 16 kHz mono, transcripts, forced alignment and the dataset builders."""

from freud_pipeline.audio.decode import SAMPLE_RATE, audio_duration, load_audio, write_wav
from freud_pipeline.audio.text import normalise_transcript

__all__ = ["SAMPLE_RATE", "audio_duration", "load_audio", "normalise_transcript", "write_wav"]
