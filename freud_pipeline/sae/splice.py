"""Splice an SAE into Whisper's encoder and measure what the model loses.

`splice(model, hook, f)` replaces the hooked activation x by f(x) for as long as the context is open (a forward
hook returning a new output). Replacements: `sae_replacement` (x_hat, optionally + the error term x - x_hat, and
optionally with latents scaled for feature editing), `zero_replacement`, `mean_replacement`.

`splice_eval` compares teacher-forced decoder cross-entropy on reference transcripts and greedy-decoding WER
with the original activation, the SAE's reconstruction, and zero / mean ablation. Only positions holding real
audio are replaced: the padding Whisper appends up to 30 s is not what the SAE was trained on. Its pieces
(`original_pass`, `encode_replaced` with one replacement per batch row, `transcript_tokens`, `cross_entropy`,
`greedy_options`) are shared with `features.effects`, which ablates one SAE feature at a time.

Threads: a splice holds the model's lock (`model_lock`) while it is open, so a forward pass of another thread
that holds the lock too (every capture, splice and decode here does) never runs through it. Code that runs the
model inside a splice, or decodes (whisper's decoder registers key/value cache hooks), holds the lock as well.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from torch import Tensor
from whisper.tokenizer import get_tokenizer

from freud_pipeline.audio.text import normalise_transcript, word_errors
from freud_pipeline.sae.base import SparseAutoencoder
from freud_pipeline.whisper.hooks import log_mel, n_real_frames, validate_hooks
from freud_pipeline.whisper.models import model_lock

Replacement = Callable[[Tensor], Tensor]  # [T, d] activations of one clip -> replacement of the same shape
_RESIDUAL_HOOK = re.compile(r"^encoder\.blocks\.(\d+)$")


def _replaced(x: Tensor, replace: Replacement | Sequence[Replacement], n_frames: Sequence[int]) -> Tensor:
    """x [B, T, d] with its first n_frames[b] positions of each row b replaced (by replace[b] when `replace` is a
    sequence: one replacement per row, e.g. several ablations of one clip as one batch)."""
    new = x.clone()
    for row, limit in enumerate(n_frames):
        fn = replace[row] if isinstance(replace, Sequence) else replace
        new[row, :limit] = fn(x[row, :limit]).to(x.dtype)
    return new


@contextmanager
def splice(
    model: whisper.model.Whisper, hook: str, replace: Replacement | Sequence[Replacement],
    n_frames: int | Sequence[int] | None = None
) -> Iterator[None]:
    """While open, the output of `hook` at the first `n_frames` positions (per batch item) is `replace(output)`
    (`replace[b](output)` for batch item b when given one replacement per item).
    The model's lock is held while it is open: open and run it in one thread."""
    validate_hooks(model, [hook])
    module = dict(model.named_modules())[hook]

    def swap(_module, _inputs, output):
        act = output[0] if isinstance(output, tuple) else output  # attention modules return (out, qk)
        limits = [n_frames] * act.shape[0] if n_frames is None or isinstance(n_frames, int) else list(n_frames)
        new = _replaced(act, replace, limits)
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


def encoder_suffix(model: whisper.model.Whisper, hook: str) -> Callable[[Tensor], Tensor] | None:
    """When `hook` is a whole residual block (`encoder.blocks.N`), the rest of the encoder from that block's
    output to the audio features; else None. Lets an evaluation run the blocks before the hook once and only the
    rest once per replacement."""
    match = _RESIDUAL_HOOK.match(hook)
    if not match or int(match.group(1)) >= len(model.encoder.blocks):
        return None
    rest = list(model.encoder.blocks)[int(match.group(1)) + 1 :]

    def run(x: Tensor) -> Tensor:
        for block in rest:
            x = block(x)
        return model.encoder.ln_post(x)

    return run


def original_pass(model, mels: Tensor, hook: str) -> tuple[Tensor, Tensor]:
    """Audio features and the hook's output [B, 1500, d] of one unmodified encoder pass."""
    module = dict(model.named_modules())[hook]
    kept: list[Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, _i, output: kept.append(output[0] if isinstance(output, tuple) else output))
    try:
        features = model.embed_audio(mels)
    finally:
        handle.remove()
    return features, kept[0]


def encode_replaced(model, mels: Tensor | None, hook: str, replace: Replacement | Sequence[Replacement],
                    n_frames: list[int], hooked: Tensor | None, suffix) -> Tensor:
    """Audio features with the hook's output replaced: from the kept hook output `hooked` through `suffix`
    (`encoder_suffix`) when both are given, else a spliced pass over `mels`."""
    if suffix is not None and hooked is not None:
        return suffix(_replaced(hooked, replace, n_frames))
    with splice(model, hook, replace, n_frames):
        return model.embed_audio(mels)


def transcript_tokens(model) -> tuple[list[int], Callable[[str], list[int]]]:
    """(the prompt, text -> prompt + the text's tokens + end-of-text): the rows `cross_entropy` scores."""
    tokenizer = get_tokenizer(multilingual=model.is_multilingual, language="en", task="transcribe")
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    return prompt, lambda text: prompt + tokenizer.encode(" " + text.strip()) + [tokenizer.eot]


def greedy_options(max_new_tokens: int | None = None) -> whisper.DecodingOptions:
    """Greedy English decoding without timestamps in fp32, capped at `max_new_tokens` (default Whisper's 224)."""
    return whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=max_new_tokens)


def cross_entropy(model, features: Tensor, token_rows: list[list[int]], n_prompt: int) -> np.ndarray:
    """Per clip: summed CE of the transcript tokens (and end-of-text) given the audio features. One teacher-forced
    decoder pass for the batch: rows are padded after their end-of-text, which a causal decoder never attends to."""
    longest = max(len(tokens) for tokens in token_rows)
    pad = token_rows[0][-1]
    tokens = torch.tensor([row + [pad] * (longest - len(row)) for row in token_rows], device=features.device)
    logits = model.logits(tokens[:, :-1], features).float()
    totals = []
    for row, length in enumerate(len(tokens) for tokens in token_rows):
        # Predictions from the last prompt position on: the transcript's tokens, then end-of-text.
        totals.append(float(F.cross_entropy(logits[row, n_prompt - 1 : length - 1], tokens[row, n_prompt:length],
                                            reduction="sum")))
    return np.asarray(totals)


CONDITIONS = ("original", "spliced", "zero", "mean")


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
    batch_size: int = 8,
    n_resamples: int = 2000,
    confidence: float = 0.95,
) -> dict:
    """CE per token with original / SAE-spliced / zero- / mean-ablated activations, CE recovered, WER, and the
    changes the SAE makes (ΔCE, ΔWER) with bootstrap confidence intervals over clips.

    `clips`: (float32 mono 16 kHz audio up to 30 s, reference transcript). `mean_activation` [d] defaults to the
    mean over these clips' real frames. `max_new_tokens` caps greedy decoding (default: Whisper's 224), which a
    poor reconstruction can send into a repetition loop. Clips run `batch_size` at a time; for a residual-stream
    hook the blocks before it run once per clip and only the rest of the encoder once per condition.
    CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_orig): 1 is perfect, 0 no better than zero ablation.
    ΔCE = CE_spliced - CE_original (nats per token), ΔWER = WER_spliced - WER_original (corpus WERs); their
    `<name>_ci_low/_ci_high` are paired percentile-bootstrap intervals (`confidence`, clips resampled together
    across conditions, `n_resamples` times, fixed seed), as is CE recovered's. `per_clip` holds the numbers
    they are computed from, so a report can be recomputed or split.
    """
    if not clips:
        raise ValueError("splice_eval needs at least one (audio, transcript) clip")
    if any(not normalise_transcript(text) for _, text in clips):
        raise ValueError("every clip needs a non-empty reference transcript for CE and WER")
    with model_lock(model):  # encodes, splices and decodes: the model is ours until the result is in
        validate_hooks(model, [hook])
        device = next(model.parameters()).device
        suffix = encoder_suffix(model, hook)
        prompt, tokens_of = transcript_tokens(model)
        options = greedy_options(max_new_tokens)
        replacements = {"spliced": sae_replacement(sae, keep_error=keep_error), "zero": zero_replacement()}
        ce = {name: [] for name in CONDITIONS}
        transcripts: dict[str, list[str]] = {"reference": [text for _, text in clips], "original": [], "spliced": []}
        n_tokens, kept_hooked = [], []
        mean_sum, mean_count = None, 0
        chunks = [clips[start : start + batch_size] for start in range(0, len(clips), batch_size)]

        def prepared(chunk):  # (real frames, token rows) of a chunk's clips
            return [n_real_frames(len(audio)) for audio, _ in chunk], [tokens_of(text) for _, text in chunk]

        def mels_of(chunk):
            return torch.stack([log_mel(audio, model.dims.n_mels) for audio, _ in chunk]).to(device)

        for chunk in chunks:
            mels = mels_of(chunk)
            n_frames, token_rows = prepared(chunk)
            n_tokens += [len(tokens) - len(prompt) for tokens in token_rows]
            features, hooked = original_pass(model, mels, hook)
            if mean_activation is None:
                real = torch.cat([hooked[i, :n] for i, n in enumerate(n_frames)]).double()
                mean_sum = real.sum(0) if mean_sum is None else mean_sum + real.sum(0)
                mean_count += len(real)
            kept_hooked.append(hooked if suffix is not None else None)
            ce["original"].append(cross_entropy(model, features, token_rows, len(prompt)))
            # Features, not mels: decode() recognises their shape and skips the encoder, so a splice is kept.
            transcripts["original"] += [r.text for r in whisper.decode(model, features, options)]
            for name, replace in replacements.items():
                features = encode_replaced(model, mels, hook, replace, n_frames, hooked, suffix)
                ce[name].append(cross_entropy(model, features, token_rows, len(prompt)))
                if name == "spliced":
                    transcripts["spliced"] += [r.text for r in whisper.decode(model, features, options)]
        if mean_activation is None:
            mean_activation = (mean_sum / mean_count).float()
        mean = mean_replacement(mean_activation)
        for chunk, hooked in zip(chunks, kept_hooked):  # the mean is known only now
            mels = None if hooked is not None else mels_of(chunk)
            n_frames, token_rows = prepared(chunk)
            ce["mean"].append(cross_entropy(model, encode_replaced(model, mels, hook, mean, n_frames, hooked, suffix),
                                            token_rows, len(prompt)))
    return _summarise({name: np.concatenate(rows) for name, rows in ce.items()}, np.asarray(n_tokens),
                      transcripts, n_resamples=n_resamples, confidence=confidence)


def _summarise(ce: dict[str, np.ndarray], n_tokens: np.ndarray, transcripts: dict[str, list[str]], *,
               n_resamples: int, confidence: float) -> dict:
    """The corpus-level numbers of splice_eval, their bootstrap intervals, and the per-clip rows."""
    from scipy.stats import bootstrap

    errors = {name: word_errors(transcripts["reference"], transcripts[name]) for name in ("original", "spliced")}
    n_words = errors["original"][1]
    result: dict = {"n_clips": len(n_tokens), "n_tokens": int(n_tokens.sum()), "n_words": int(n_words.sum())}
    for name in CONDITIONS:
        result[f"ce_{name}"] = float(ce[name].sum() / n_tokens.sum())
    for name in ("original", "spliced"):
        result[f"wer_{name}"] = float(errors[name][0].sum() / n_words.sum())

    def recovered(zero, spliced, original, axis=-1):
        return (zero.sum(axis) - spliced.sum(axis)) / (zero.sum(axis) - original.sum(axis))

    def ratio_change(new, old, denominator, axis=-1):
        return (new.sum(axis) - old.sum(axis)) / denominator.sum(axis)

    gap_mean = ce["mean"].sum() - ce["original"].sum()
    result["ce_recovered"] = float(recovered(ce["zero"], ce["spliced"], ce["original"]))
    result["ce_recovered_vs_mean"] = (float((ce["mean"].sum() - ce["spliced"].sum()) / gap_mean) if gap_mean
                                      else float("nan"))
    result["delta_ce"] = result["ce_spliced"] - result["ce_original"]
    result["delta_wer"] = result["wer_spliced"] - result["wer_original"]
    intervals = {
        "ce_recovered": (recovered, (ce["zero"], ce["spliced"], ce["original"])),
        "delta_ce": (ratio_change, (ce["spliced"], ce["original"], n_tokens.astype(float))),
        "delta_wer": (ratio_change, (errors["spliced"][0], errors["original"][0], n_words.astype(float))),
    }
    for name, (statistic, data) in intervals.items():
        if len(n_tokens) < 2:
            low = high = float("nan")
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ci = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                               confidence_level=confidence, method="percentile", random_state=0).confidence_interval
            low, high = float(ci.low), float(ci.high)
        result[f"{name}_ci_low"], result[f"{name}_ci_high"] = low, high
    result["confidence"] = confidence
    result["per_clip"] = {"n_tokens": n_tokens.tolist(), "n_words": n_words.tolist(),
                          **{f"ce_{name}": ce[name].tolist() for name in CONDITIONS},
                          **{f"word_errors_{name}": errors[name][0].tolist() for name in ("original", "spliced")}}
    result["transcripts"] = [dict(zip(transcripts, row)) for row in zip(*transcripts.values())]
    return result
