"""Splicing a TopK SAE into tiny.en's encoder: the context manager, feature edits, and splice_eval."""

from __future__ import annotations

import math

import pytest
import torch

from freud_pipeline.audio.text import word_error_rate, word_errors
from freud_pipeline.sae import TrainConfig, train_sae
from freud_pipeline.sae.splice import (
    encoder_suffix,
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


def test_splice_eval_reports_changes_with_bootstrap_intervals_from_its_per_clip_numbers(trained_topk, model, clips):
    result = splice_eval(model, trained_topk, HOOK, clips, max_new_tokens=48, batch_size=2)
    per_clip = result["per_clip"]
    assert len(per_clip["n_tokens"]) == 3 and sum(per_clip["n_tokens"]) == result["n_tokens"]
    for name in ("original", "spliced", "zero", "mean"):
        assert sum(per_clip[f"ce_{name}"]) / result["n_tokens"] == pytest.approx(result[f"ce_{name}"])
    references = [t["reference"] for t in result["transcripts"]]
    errors, words = word_errors(references, [t["spliced"] for t in result["transcripts"]])
    assert errors.tolist() == per_clip["word_errors_spliced"] and words.sum() == result["n_words"]
    assert result["delta_wer"] == pytest.approx(result["wer_spliced"] - result["wer_original"])
    assert result["delta_ce"] == pytest.approx(result["ce_spliced"] - result["ce_original"])
    for name in ("delta_ce", "delta_wer", "ce_recovered"):
        assert result[f"{name}_ci_low"] <= result[name] + 1e-12 <= result[f"{name}_ci_high"] + 2e-12, name
    assert result["delta_ce_ci_high"] > result["delta_ce_ci_low"]  # three clips differ: the interval has width
    assert result["confidence"] == 0.95
    # Batching and the shared encoder prefix change nothing: one clip at a time gives the same numbers.
    single = splice_eval(model, trained_topk, HOOK, clips, max_new_tokens=48, batch_size=1)
    for name in ("ce_original", "ce_spliced", "ce_zero", "ce_mean", "wer_original", "wer_spliced"):
        assert single[name] == pytest.approx(result[name], rel=1e-4), name


def test_the_encoder_suffix_from_a_residual_hook_equals_a_spliced_full_pass(model, clips):
    from freud_pipeline.whisper.hooks import log_mel

    mel = log_mel(clips[0][0]).unsqueeze(0)
    hooked = encoder_block(model, mel).unsqueeze(0)
    suffix = encoder_suffix(model, HOOK)
    with torch.no_grad():
        torch.testing.assert_close(suffix(hooked), model.embed_audio(mel), rtol=1e-4, atol=1e-4)
        zeroed = hooked.clone()
        zeroed[:, :10] = 0
        with splice(model, HOOK, zero_replacement(), n_frames=10):
            spliced = model.embed_audio(mel)
        torch.testing.assert_close(suffix(zeroed), spliced, rtol=1e-4, atol=1e-4)
    assert encoder_suffix(model, HOOK + ".mlp.1") is None  # not a residual stream: full spliced passes instead


def test_wer_normalises_both_sides_to_spoken_form():
    assert word_error_rate("please enter the conference pin number", "Please enter the conference PIN, number!") == 0
    assert word_error_rate("press one or pound", "Press 1 or #.") == 0
    assert word_error_rate(["don't stop", "one two"], ["Don't   stop.", "one"]) == pytest.approx(1 / 4)
    errors, words = word_errors(["don't stop", "one two", "a b"], ["Don't   stop.", "one", "a x b c"])
    assert errors.tolist() == [0, 1, 2] and words.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="at least one word"):
        word_error_rate(["(silence)"], ["hello"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
