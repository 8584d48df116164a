"""Splicing a TopK SAE into tiny.en's encoder: the context manager, feature edits, and splice_eval."""

from __future__ import annotations

import math

import pytest
import torch

from freud_pipeline.audio.text import word_error_rate
from freud_pipeline.sae import TrainConfig, train_sae
from freud_pipeline.sae.splice import (
    mean_replacement,
    sae_replacement,
    splice,
    splice_eval,
    zero_replacement,
)

# Shared with test_sae: the cached capture (activations computed once per session) and two fixtures.
try:
    from test_sae import HOOK, TRAIN_CLIPS, decode_prompt, mlflow_uri, one_intra_op_thread, prompt_frames
except ImportError:  # tests collected as a package
    from tests.test_sae import HOOK, TRAIN_CLIPS, decode_prompt, mlflow_uri, one_intra_op_thread, prompt_frames

__all__ = ["mlflow_uri", "one_intra_op_thread"]  # fixtures: used by pytest, not by name

# Held out from SAE training.
SPLICE_CLIPS = {
    "conf-enteringno": "You are entering conference number.",
    "vm-goodbye": "Goodbye.",
    "conf-getpin": "Please enter the conference PIN number.",
}


@pytest.fixture(scope="module")
def model(tiny_en):
    return tiny_en


@pytest.fixture(scope="module")
def train_frames(tiny_en):
    return prompt_frames(tiny_en, tuple(TRAIN_CLIPS))


@pytest.fixture(scope="module")
def clips():
    return [(decode_prompt(name), text) for name, text in SPLICE_CLIPS.items()]


@pytest.fixture(scope="module")
def trained_topk(train_frames, mlflow_uri, tmp_path_factory):
    """Trained long enough (≈ 0.15 FVU) that splicing it in is a meaningful, not a destructive, intervention."""
    tmp = tmp_path_factory.mktemp("splice_sae")
    cfg = TrainConfig(
        hook=HOOK, model_name="tiny.en", expansion_factor=4, k=32, lr=3e-3, warmup_steps=10, steps=150,
        batch_size=512, log_every=50, eval_every=0, eval_batches=2, dead_after_frames=50_000, device="cpu",
    )  # fmt: skip
    return train_sae(train_frames, cfg, out_dir=tmp / "out", mlflow_tracking_uri=mlflow_uri, experiment="test-sae").sae


def encoder_block(model, mel, hook=HOOK):
    from freud_pipeline.whisper.hooks import EncoderCapture

    return EncoderCapture(model, [hook]).capture(mel)[hook][0]


def test_splice_replaces_only_real_frames_and_is_removed_afterwards(model, clips):
    from freud_pipeline.whisper.hooks import log_mel

    mel = log_mel(clips[0][0]).unsqueeze(0)
    original = encoder_block(model, mel)
    module = dict(model.named_modules())[HOOK]
    with splice(model, HOOK, zero_replacement(), n_frames=10):
        spliced = encoder_block(model, mel)
    assert (spliced[:10] == 0).all() and torch.equal(spliced[10:], original[10:])
    assert not module._forward_hooks
    mean = original.mean(0)
    with splice(model, HOOK, mean_replacement(mean)):
        assert torch.allclose(encoder_block(model, mel), mean.expand_as(original))


def test_error_term_and_feature_edits(trained_topk, model, clips):
    from freud_pipeline.whisper.hooks import log_mel

    x = encoder_block(model, log_mel(clips[0][0]).unsqueeze(0))[:100]
    # With the error term kept and nothing edited, the splice is the identity.
    torch.testing.assert_close(sae_replacement(trained_topk, keep_error=True)(x), x, rtol=1e-4, atol=1e-4)
    latents = trained_topk.encode(x)
    active = int(latents.sum(0).argmax())
    never = int((latents != 0).sum(0).argmin())
    assert (latents[:, never] == 0).all()
    plain = sae_replacement(trained_topk)(x)
    # A factor acts only where its latent fires: editing a silent latent changes nothing.
    torch.testing.assert_close(sae_replacement(trained_topk, edit={never: 10.0})(x), plain)
    doubled = sae_replacement(trained_topk, keep_error=True, edit={active: 2.0})(x)
    expected = x + latents[:, active : active + 1] * trained_topk.W_dec[active]
    torch.testing.assert_close(doubled, expected, rtol=1e-4, atol=1e-4)


def test_splice_eval_orders_cross_entropies_and_reports_wer(trained_topk, model, clips, train_frames):
    result = splice_eval(model, trained_topk, HOOK, clips, mean_activation=train_frames.mean(0), max_new_tokens=48)
    numbers = {k: v for k, v in result.items() if isinstance(v, float)}
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert result["ce_original"] <= result["ce_spliced"] <= result["ce_zero"], numbers
    assert result["ce_spliced"] <= result["ce_mean"]
    assert 0 < result["ce_recovered"] <= 1
    assert result["n_clips"] == 3 and result["n_tokens"] > 10
    assert result["wer_original"] <= 0.2 and result["wer_spliced"] >= 0
    assert [t["reference"] for t in result["transcripts"]] == list(SPLICE_CLIPS.values())
    references = [t["reference"] for t in result["transcripts"]]
    for name in ("original", "spliced"):  # the library's one WER, not a WER of its own
        assert result[f"wer_{name}"] == word_error_rate(references, [t[name] for t in result["transcripts"]])


def test_wer_normalises_both_sides_to_spoken_form():
    assert word_error_rate("please enter the conference pin number", "Please enter the conference PIN, number!") == 0
    assert word_error_rate("press one or pound", "Press 1 or #.") == 0
    assert word_error_rate(["don't stop", "one two"], ["Don't   stop.", "one"]) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="at least one word"):
        word_error_rate(["(silence)"], ["hello"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
