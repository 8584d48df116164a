"""The real offline tiny.en: transcription quality, hook points and encoder-only capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import whisper

from freud_pipeline.audio.text import word_error_rate
from freud_pipeline.errors import HookError, ModelUnavailableError, UnknownModelError
from freud_pipeline.whisper.hooks import EncoderCapture, hook_points, log_mel, n_real_frames, validate_hooks
from freud_pipeline.whisper.models import available_models, load_model, resolve_model

from conftest import asterisk_audio


def transcribe(model, audio: np.ndarray) -> str:
    return whisper.transcribe(model, audio, fp16=False, language="en", temperature=0.0)["text"]


def test_asterisk_prompt_transcribes_with_low_wer(tiny_en):
    reference = "please leave your message after the tone when done hang up or press the pound key"
    hypothesis = transcribe(tiny_en, asterisk_audio("vm-intro"))
    assert word_error_rate(reference, hypothesis) <= 0.2, hypothesis


def test_festival_sentence_transcribes_with_low_wer(tiny_en, tmp_path):
    from freud_pipeline.audio.datasets import build_festival_speech, load_manifest
    from freud_pipeline.audio.decode import load_audio

    build = build_festival_speech(tmp_path / "festival", n_sentences=2, seed=3, data_root=tmp_path)
    manifest = load_manifest(build.manifest_path)
    errors = []
    for row in manifest.itertuples():
        hypothesis = transcribe(tiny_en, load_audio(tmp_path / row.path))
        errors.append(word_error_rate(row.transcript, hypothesis))
    assert min(errors) <= 0.2 and np.mean(errors) <= 0.25, errors


def test_mlp_hook_equals_manual_forward_through_three_blocks(tiny_en):
    audio = asterisk_audio("vm-goodbye")
    mel = log_mel(audio).unsqueeze(0)
    captured = EncoderCapture(tiny_en, ["encoder.blocks.2.mlp.1"]).capture(mel)["encoder.blocks.2.mlp.1"][0]
    assert captured.shape == (1500, 1536)

    enc = tiny_en.encoder
    with torch.no_grad():
        x = torch.nn.functional.gelu(enc.conv1(mel))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1) + enc.positional_embedding
        for block in enc.blocks[:2]:
            x = block(x)
        block = enc.blocks[2]
        x = x + block.attn(block.attn_ln(x))[0]
        manual = torch.nn.functional.gelu(block.mlp[0](block.mlp_ln(x)))[0]
    torch.testing.assert_close(captured, manual, atol=1e-5, rtol=0)


def test_several_hooks_in_one_pass_match_full_encoder(tiny_en):
    mel = log_mel(asterisk_audio("auth-thankyou")).unsqueeze(0)
    hooks = ["encoder.blocks.0", "encoder.blocks.2", "encoder.blocks.1.attn", "encoder.ln_post"]
    captured = EncoderCapture(tiny_en, hooks).capture(mel)
    with torch.no_grad():
        full = tiny_en.encoder(mel)
    torch.testing.assert_close(captured["encoder.ln_post"], full, atol=1e-5, rtol=0)
    assert all(captured[h].shape == (1, 1500, 384) for h in hooks)


def test_capture_never_runs_the_text_decoder(tiny_en, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text decoder ran")

    monkeypatch.setattr(tiny_en.decoder, "forward", refuse)
    mel = log_mel(asterisk_audio("auth-thankyou")).unsqueeze(0)
    assert EncoderCapture(tiny_en, ["encoder.blocks.3.mlp.2"]).capture(mel)["encoder.blocks.3.mlp.2"].shape[-1] == 384


def test_hook_points_and_validation(tiny_en):
    points = hook_points(tiny_en)
    assert points["encoder.blocks.2.mlp.1"] == (1500, 1536)
    assert points["encoder.ln_post"] == (1500, 384)
    assert len(points) == 4 * 5 + 1
    with pytest.raises(HookError, match="encoder.blocks.2.mlp.1"):  # the message lists the valid names
        validate_hooks(tiny_en, ["encoder.blocks.9"])
    with pytest.raises(HookError):
        validate_hooks(tiny_en, ["decoder.blocks.0"])


def test_real_frames_follow_duration():
    assert n_real_frames(16000) == 50
    assert n_real_frames(16001) == 51
    assert n_real_frames(16000 * 40) == 1500


def test_model_names_resolve_or_fail_clearly():
    assert {"tiny", "tiny.en", "base.en", "small", "medium.en", "large-v1", "large-v2", "large-v3", "turbo"} <= set(
        available_models()
    )
    with pytest.raises(UnknownModelError, match="Official names"):
        resolve_model("tiny-ish")
    with pytest.raises(ModelUnavailableError, match="available offline here: .*tiny.en"):
        resolve_model("base.en")  # offline in tests: the message names what can be had


def test_local_checkpoint_path_loads(tiny_en):
    path = tiny_en.freud_checkpoint.checkpoint
    model = load_model(str(path))
    assert model.dims.n_mels == 80 and model.freud_checkpoint.source == "local"


def test_log_mel_of_a_read_only_array_equals_the_writable_one_without_a_warning():
    """Decoded audio may be a read-only view (a mapped file, a shared buffer): torch would share its memory and warn
    that writing it is undefined; log_mel copies it instead."""
    import warnings

    audio = asterisk_audio("auth-thankyou")
    frozen = audio.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(log_mel(frozen), log_mel(audio))
