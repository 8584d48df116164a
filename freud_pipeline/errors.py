"""Errors a user can act on. Each names what was wrong and what would be accepted."""


class FreudError(Exception):
    """Base class for every error FREUD raises on bad input or missing resources."""


class AudioError(FreudError, ValueError):
    """Audio could not be used."""


class EmptyAudioError(AudioError):
    """The input holds no samples (zero bytes, or a valid container with no audio frames)."""


class CorruptAudioError(AudioError):
    """The input looks like audio but cannot be decoded."""


class NotAudioError(AudioError):
    """The input is not an audio format ffmpeg recognises (e.g. text, an image)."""


class AudioTooLongError(AudioError):
    """The input is longer than the configured limit."""


class UnreadableAudioError(AudioError):
    """The input exists but cannot be read: a directory, no permission, an I/O error."""


class RefusedAudioError(AudioError):
    """The input is of a kind that may open other files or URLs (a playlist, a concat list): never decoded."""


class AudioTimeoutError(AudioError):
    """ffmpeg or ffprobe did not finish within the configured time."""


class ModelError(FreudError, ValueError):
    """A Whisper model name or checkpoint could not be resolved."""


class UnknownModelError(ModelError):
    """The name is neither an official Whisper model nor an existing checkpoint path."""


class ModelUnavailableError(ModelError):
    """The model is known but cannot be obtained here (e.g. offline)."""


class DeviceUnavailableError(FreudError, ValueError):
    """The requested torch device does not exist here (e.g. CUDA on a machine without it)."""


class HookError(FreudError, ValueError):
    """A hook point name is not valid for the model."""


class DatasetUnavailableError(FreudError, RuntimeError):
    """A dataset cannot be downloaded or found (e.g. offline)."""


class FeatureSetError(FreudError, KeyError):
    """An unknown feature set was asked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FeatureIndexError(FreudError, IndexError):
    """A feature index outside the set's range."""
