"""Splice an SAE into Whisper's encoder and measure what the model loses.

`splice(model, hook, f)` replaces the hooked activation x by f(x) for as long as the context is open (a forward
hook returning a new output). Replacements: `sae_replacement` (x_hat, optionally + the error term x - x_hat, and
optionally with latents scaled for feature editing), `zero_replacement`, `mean_replacement`.

`splice_eval` compares teacher-forced decoder cross-entropy on reference transcripts and greedy-decoding WER
with the original activation, the SAE's reconstruction, and zero / mean ablation. Only positions holding real
audio are replaced: the padding Whisper appends up to 30 s is not what the SAE was trained on.

Threads: a splice holds the model's lock (`model_lock`) while it is open, so a forward pass of another thread
that holds the lock too (every capture, splice and decode here does) never runs through it. Code that runs the
model inside a splice, or decodes (whisper's decoder registers key/value cache hooks), holds the lock as well.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from torch import Tensor
from whisper.tokenizer import get_tokenizer

from freud_pipeline.audio.text import normalise_transcript, word_error_rate
from freud_pipeline.sae.base import SparseAutoencoder
from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames, validate_hooks
from freud_pipeline.whisper.models import model_lock

Replacement = Callable[[Tensor], Tensor]  # [T, d] activations of one clip -> replacement of the same shape


@contextmanager
def splice(
    model: whisper.model.Whisper, hook: str, replace: Replacement, n_frames: int | Sequence[int] | None = None
) -> Iterator[None]:
    """While open, the output of `hook` at the first `n_frames` positions (per batch item) is `replace(output)`.
    The model's lock is held while it is open: open and run it in one thread."""
    validate_hooks(model, [hook])
    module = dict(model.named_modules())[hook]

    def swap(_module, _inputs, output):
        act = output[0] if isinstance(output, tuple) else output  # attention modules return (out, qk)
        limits = [n_frames] * act.shape[0] if n_frames is None or isinstance(n_frames, int) else list(n_frames)
        new = act.clone()
        for row, limit in enumerate(limits):
            new[row, :limit] = replace(act[row, :limit]).to(act.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    with model_lock(model):
        handle = module.register_forward_hook(swap)
        try:
            yield
        finally:
            handle.remove()


def sae_replacement(
    sae: SparseAutoencoder, *, keep_error: bool = False, edit: dict[int, float] | None = None
) -> Replacement:
    """x -> x_hat. `keep_error` adds back x - x_hat (so only edits change anything). `edit={latent: factor}`
    multiplies a latent's activation; inactive latents stay at zero, so a factor acts only where the latent fires."""
    parameter = next(sae.parameters())

    @torch.no_grad()
    def replace(x: Tensor) -> Tensor:
        x_in = x.to(parameter.device, parameter.dtype)
        latents = sae.encode(x_in)
        x_hat = sae.decode(latents)
        if edit:
            index = torch.tensor(list(edit), device=latents.device)
            latents[:, index] *= torch.tensor(list(edit.values()), dtype=latents.dtype, device=latents.device)
            edited = sae.decode(latents)
        else:
            edited = x_hat
        return (edited + (x_in - x_hat) if keep_error else edited).to(x.device, x.dtype)

    return replace


def zero_replacement() -> Replacement:
    return torch.zeros_like


def mean_replacement(mean: Tensor) -> Replacement:
    return lambda x: mean.to(x.device, x.dtype).expand_as(x)


def _encode(model, mels: Tensor, hook: str, replace: Replacement | None, n_frames: list[int]) -> Tensor:
    if replace is None:
        return model.embed_audio(mels)
    with splice(model, hook, replace, n_frames):
        return model.embed_audio(mels)


def _cross_entropy(model, features: Tensor, token_rows: list[list[int]], n_prompt: int) -> tuple[float, int]:
    """Summed CE of the transcript tokens (and end-of-text) given the audio features, and how many tokens."""
    total, count = 0.0, 0
    for row, tokens in enumerate(token_rows):
        tokens_t = torch.tensor([tokens], device=features.device)
        logits = model.logits(tokens_t[:, :-1], features[row : row + 1])
        # Predictions from the last prompt position on: the transcript's tokens, then end-of-text.
        total += float(F.cross_entropy(logits[0, n_prompt - 1 :].float(), tokens_t[0, n_prompt:], reduction="sum"))
        count += len(tokens) - n_prompt
    return total, count


@torch.no_grad()
def splice_eval(
    model: whisper.model.Whisper,
    sae: SparseAutoencoder,
    hook: str,
    clips: list[tuple[np.ndarray, str]],
    *,
    keep_error: bool = False,
    mean_activation: Tensor | None = None,
    max_new_tokens: int | None = None,
) -> dict:
    """CE per token with original / SAE-spliced / zero- / mean-ablated activations, CE recovered, and WER.

    `clips`: (float32 mono 16 kHz audio up to 30 s, reference transcript). `mean_activation` [d] defaults to the
    mean over these clips' real frames. `max_new_tokens` caps greedy decoding (default: Whisper's 224), which a
    poor reconstruction can send into a repetition loop.
    CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_orig): 1 is perfect, 0 no better than zero ablation.
    """
    if not clips:
        raise ValueError("splice_eval needs at least one (audio, transcript) clip")
    if any(not normalise_transcript(text) for _, text in clips):
        raise ValueError("every clip needs a non-empty reference transcript for CE and WER")
    with model_lock(model):  # encodes, splices and decodes: the model is ours until the result is in
        validate_hooks(model, [hook])
        device = next(model.parameters()).device
        mels = torch.stack([log_mel(audio, model.dims.n_mels) for audio, _ in clips]).to(device)
        n_frames = [n_real_frames(len(audio)) for audio, _ in clips]
        if mean_activation is None:
            captured = EncoderCapture(model, [hook]).capture(mels)[hook]
            mean_activation = torch.cat([captured[i, :n] for i, n in enumerate(n_frames)]).mean(0)

        tokenizer = get_tokenizer(multilingual=model.is_multilingual, language="en", task="transcribe")
        prompt = list(tokenizer.sot_sequence_including_notimestamps)
        token_rows = [prompt + tokenizer.encode(" " + text.strip()) + [tokenizer.eot] for _, text in clips]

        conditions = {
            "original": None,
            "spliced": sae_replacement(sae, keep_error=keep_error),
            "zero": zero_replacement(),
            "mean": mean_replacement(mean_activation),
        }
        result: dict = {"n_clips": len(clips)}
        features = {}
        for name, replace in conditions.items():
            features[name] = _encode(model, mels, hook, replace, n_frames)
            total, count = _cross_entropy(model, features[name], token_rows, len(prompt))
            result[f"ce_{name}"] = total / count
        result["n_tokens"] = count
        gap_zero = result["ce_zero"] - result["ce_original"]
        gap_mean = result["ce_mean"] - result["ce_original"]
        result["ce_recovered"] = (result["ce_zero"] - result["ce_spliced"]) / gap_zero if gap_zero else float("nan")
        result["ce_recovered_vs_mean"] = (
            (result["ce_mean"] - result["ce_spliced"]) / gap_mean if gap_mean else float("nan"))

        options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False,
                                          sample_len=max_new_tokens)
        references = [text for _, text in clips]
        transcripts = {"reference": [text for _, text in clips]}
        for name in ("original", "spliced"):
            # Features, not mels: decode() recognises their shape and skips the encoder, so the splice is kept.
            transcripts[name] = [r.text for r in whisper.decode(model, features[name], options)]
            result[f"wer_{name}"] = word_error_rate(references, transcripts[name])
        result["transcripts"] = [dict(zip(transcripts, row)) for row in zip(*transcripts.values())]
        return result
