"""Hook points of Whisper's audio encoder and an encoder-only capture of their activations.

Hook names are module names, as in the original FREUD: `encoder.blocks.{i}` (residual stream after block i),
`encoder.blocks.{i}.mlp.0|1|2` (MLP pre-activation, post-GELU "neurons", output), `encoder.blocks.{i}.attn`
(attention output) and `encoder.ln_post`. Capture runs the encoder only, and only up to the deepest block any
requested hook needs: the text decoder is never run to reach an encoder activation. A capture holds the
model's lock (`models.model_lock`) from registering its hooks to removing them, so captures of one shared model
from several threads never see each other's forward passes.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.audio import N_FRAMES, N_SAMPLES

from freud_pipeline.errors import HookError
from freud_pipeline.frames import SAMPLES_PER_FRAME
from freud_pipeline.whisper.models import model_lock

WINDOW_FRAMES = N_FRAMES // 2  # 1500 encoder positions per 30 s window

_BLOCK_HOOK = re.compile(r"^encoder\.blocks\.(\d+)(?:\.(attn|mlp\.[012]))?$")


def hook_points(model: whisper.model.Whisper) -> dict[str, tuple[int, ...]]:
    """Every valid hook name with the shape of one window's activation: (frames, width)."""
    dims = model.dims
    frames, width = dims.n_audio_ctx, dims.n_audio_state
    points: dict[str, tuple[int, ...]] = {}
    for i in range(dims.n_audio_layer):
        points[f"encoder.blocks.{i}"] = (frames, width)
        points[f"encoder.blocks.{i}.attn"] = (frames, width)
        points[f"encoder.blocks.{i}.mlp.0"] = (frames, 4 * width)
        points[f"encoder.blocks.{i}.mlp.1"] = (frames, 4 * width)
        points[f"encoder.blocks.{i}.mlp.2"] = (frames, width)
    points["encoder.ln_post"] = (frames, width)
    return points


def validate_hooks(model: whisper.model.Whisper, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    if not names:
        raise HookError("no hook point given; `freud hooks` lists them")
    valid = hook_points(model)
    bad = [n for n in names if n not in valid]
    if bad:
        raise HookError(
            f"unknown hook point(s) {', '.join(map(repr, bad))} for a {model.dims.n_audio_layer}-block encoder. "
            f"Valid: {', '.join(valid)}"
        )
    return list(dict.fromkeys(names))


def hook_width(model: whisper.model.Whisper, name: str) -> int:
    return hook_points(model)[validate_hooks(model, [name])[0]][1]


def last_block_needed(model: whisper.model.Whisper, names: Sequence[str]) -> int:
    """Index of the deepest encoder block the hooks depend on (ln_post needs them all)."""
    deepest = -1
    for name in names:
        match = _BLOCK_HOOK.match(name)
        deepest = max(deepest, int(match.group(1)) if match else model.dims.n_audio_layer - 1)
    return deepest


def n_real_frames(n_samples: int) -> int:
    """Encoder positions covering real audio: ceil(duration / 20 ms), at most one window."""
    return min(WINDOW_FRAMES, max(1, math.ceil(n_samples / SAMPLES_PER_FRAME)))


def log_mel(audio: np.ndarray | torch.Tensor, n_mels: int = 80, pad: bool = True) -> torch.Tensor:
    """Whisper's log-mel spectrogram of one window, padded (or cut) to 30 s as Whisper runs it."""
    if isinstance(audio, np.ndarray) and not audio.flags.writeable:
        audio = audio.copy()  # torch would share a read-only array's memory (and warn that writing it is undefined)
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if pad:
        audio = whisper.pad_or_trim(audio, N_SAMPLES)
    return whisper.log_mel_spectrogram(audio, n_mels=n_mels)


def split_windows(audio: np.ndarray) -> list[np.ndarray]:
    """Consecutive 30 s windows (the last one shorter); a clip is never silently truncated."""
    if len(audio) == 0:
        return [audio]
    return [audio[start : start + N_SAMPLES] for start in range(0, len(audio), N_SAMPLES)]


def _output_of(name: str, output):
    # MultiHeadAttention returns (out, qk); everything else returns a tensor.
    return output[0] if isinstance(output, tuple) else output


class EncoderCapture:
    """Capture several hook points in one encoder pass.

    `capture(mel)` takes a batch of log-mels [B, n_mels, T] (T = 3000 for padded windows, or fewer frames for
    trimmed clips) and returns {hook: Tensor[B, T/2, width]}. Safe to call from several threads on one model.
    """

    def __init__(self, model: whisper.model.Whisper, hooks: Sequence[str]):
        self.model = model
        self.hooks = validate_hooks(model, hooks)
        self.last_block = last_block_needed(model, self.hooks)

    @contextmanager
    def _registered(self) -> Iterator[dict[str, torch.Tensor]]:
        store: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        handles = []
        for name in self.hooks:
            def keep(_module, _inputs, output, name=name):
                store[name] = _output_of(name, output)

            handles.append(modules[name].register_forward_hook(keep))
        try:
            yield store
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def capture(self, mel: torch.Tensor) -> dict[str, torch.Tensor]:
        encoder = self.model.encoder
        if mel.dim() == 2:
            mel = mel.unsqueeze(0)
        mel = mel.to(encoder.conv1.weight.device, encoder.conv1.weight.dtype)
        with model_lock(self.model), self._registered() as store:
            x = F.gelu(encoder.conv1(mel))
            x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
            # Sliced rather than asserted equal, so trimmed (shorter than 30 s) inputs work too.
            x = x + encoder.positional_embedding[: x.shape[1]].to(x.dtype)
            for block in encoder.blocks[: self.last_block + 1]:
                x = block(x)
            if "encoder.ln_post" in self.hooks:
                encoder.ln_post(x)
        return {name: store[name] for name in self.hooks}
