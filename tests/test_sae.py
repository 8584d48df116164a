"""Sparse autoencoders trained briefly on real tiny.en encoder.blocks.2 activations of Asterisk prompts."""

from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from freud_pipeline.sae import (
    ARCHITECTURES,
    BatchTopKSAE,
    CheckpointError,
    L1SAE,
    TensorFrameSource,
    TopKSAE,
    TrainConfig,
    demo_config,
    evaluate_sae,
    load_checkpoint,
    load_original_freud_checkpoint,
    save_checkpoint,
    train_sae,
)
from freud_pipeline.sae.metrics import dead_fraction, dense_fraction, density_histogram, explained_variance, fvu, l0
from freud_pipeline.sae.resume import load_trainer_state

try:
    from conftest import require_extra
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
HOOK = "encoder.blocks.2"
# ~145 s of speech (~7300 frames), one 30 s window each, and ~15 s held out for evaluation.
TRAIN_CLIPS = [
    "basic-pbx-ivr-main", "demo-echotest", "conf-adminmenu", "screen-callee-options", "vm-options", "demo-abouttotry",
    "demo-moreinfo", "vm-msginstruct",
]  # fmt: skip
EVAL_CLIPS = ["vm-review", "vm-instructions"]


def decode_prompt(name: str) -> np.ndarray:
    if shutil.which("ffmpeg") is None or not (SOUNDS / f"{name}.g722").is_file():
        require_extra(False, "ffmpeg and the Asterisk en_US_f_Allison prompts")
    pcm = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "g722", "-i", str(SOUNDS / f"{name}.g722"),
         "-ar", "16000", "-ac", "1", "-f", "f32le", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return np.frombuffer(pcm, dtype=np.float32).copy()


@functools.cache
def prompt_frames(model, names: tuple[str, ...]) -> torch.Tensor:
    """Real (non-padding) encoder.blocks.2 frames of the prompts, captured as Whisper runs them (30 s windows).
    Cached: both SAE test modules use them."""
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames

    capture = EncoderCapture(model, [HOOK])
    frames = []
    for start in range(0, len(names), 4):
        audio = [decode_prompt(name) for name in names[start : start + 4]]
        acts = capture.capture(torch.stack([log_mel(a) for a in audio]))[HOOK]
        frames += [acts[i, : n_real_frames(len(a))] for i, a in enumerate(audio)]
    return torch.cat(frames).clone()


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """These ops are small: with other processes on the 2 cores, a second OpenMP thread mostly waits for its
    partner (measured 4x slower per step under load), and one thread is as fast when the machine is idle."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def frames(tiny_en) -> dict[str, torch.Tensor]:
    return {"train": prompt_frames(tiny_en, tuple(TRAIN_CLIPS)), "eval": prompt_frames(tiny_en, tuple(EVAL_CLIPS))}


@pytest.fixture(scope="session")
def mlflow_uri(session_data_dir) -> str:
    """The session's temporary store (conftest), shared with other modules: creating its tables takes seconds."""
    return f"sqlite:///{session_data_dir / 'mlflow.db'}"


def quick_config(**overrides) -> TrainConfig:
    defaults = dict(
        hook=HOOK, model_name="tiny.en", expansion_factor=4, k=16, lr=2e-3, warmup_steps=5, steps=60, batch_size=256,
        log_every=10, eval_every=30, eval_batches=2, dead_after_frames=4096, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**defaults, **overrides})


def small_sae(arch: str, d_in: int, n_latents: int, k: int):
    """An SAE of `arch` with k latents per frame (the L0 target for JumpReLU; none for the L1 SAE)."""
    kwargs = {"l1": {}, "jumprelu": {"l0_target": float(k)}}.get(arch, {"k": k})
    return ARCHITECTURES[arch](d_in, n_latents, **kwargs)


def history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def topk_run(frames, mlflow_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("topk")
    result = train_sae(
        frames["train"], quick_config(), out_dir=out, mlflow_tracking_uri=mlflow_uri, experiment="test-sae",
        tags={"purpose": "test"}, eval_source=frames["eval"],
    )  # fmt: skip
    return result


# --- architectures ----------------------------------------------------------------------------------------------
def test_frames_are_real_encoder_activations(frames):
    assert frames["train"].shape[1] == 384 and frames["train"].shape[0] > 7000
    assert torch.isfinite(frames["train"]).all()


def test_topk_trains_with_unit_decoder_rows_and_exactly_k_active(topk_run, frames, mlflow_uri):
    loss = history(mlflow_uri, topk_run.run_id, "loss")
    assert loss[-1] < 0.7 * loss[0]
    sae = topk_run.sae
    assert isinstance(sae, TopKSAE)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents))
    assert history(mlflow_uri, topk_run.run_id, "l0") == [16.0] * len(loss)
    latents = sae.encode(frames["eval"])
    assert ((latents > 0).sum(-1) == 16).all()
    assert 0 <= topk_run.metrics["dead_pct"] <= 100
    assert topk_run.metrics["eval/fvu"] < 0.6


def test_batchtopk_keeps_k_per_frame_on_average_and_learns_a_threshold(frames, mlflow_uri, tmp_path):
    result = train_sae(
        frames["train"], quick_config(architecture="batchtopk"), out_dir=tmp_path, mlflow_tracking_uri=mlflow_uri,
        experiment="test-sae",
    )  # fmt: skip
    loss = history(mlflow_uri, result.run_id, "loss")
    assert loss[-1] < 0.7 * loss[0]
    assert history(mlflow_uri, result.run_id, "l0") == pytest.approx([16.0] * len(loss))
    sae = result.sae
    assert isinstance(sae, BatchTopKSAE) and float(sae.threshold) > 0
    # Inference thresholds each frame on its own: per-frame counts vary, their mean stays near k.
    counts = (sae.encode(frames["eval"]) > 0).sum(-1).float()
    assert counts.std() > 0 and 4 < counts.mean() < 64
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents))


def test_l1_trains_tied_with_unit_columns_on_a_numpy_array(frames, mlflow_uri, tmp_path):
    cfg = quick_config(architecture="l1", eval_every=0, optimiser="radam", optimiser_eps=1e-5)  # as tiny_l1.yaml
    result = train_sae(
        frames["train"].numpy(), cfg, out_dir=tmp_path, mlflow_tracking_uri=mlflow_uri, experiment="test-sae"
    )
    assert load_trainer_state(tmp_path)["optimizer"]["param_groups"][0]["eps"] == 1e-5
    assert MlflowClient(mlflow_uri).get_run(result.run_id).data.params["optimiser_eps"] == "1e-05"
    loss = history(mlflow_uri, result.run_id, "loss")
    assert loss[-1] < 0.7 * loss[0]
    sae = result.sae
    assert isinstance(sae, L1SAE)
    torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(sae.n_latents))
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    torch.testing.assert_close(tensors["W_enc"], tensors["W_dec"].T)
    assert result.metrics["l0"] < sae.n_latents / 2  # the L1 penalty made it sparse
    assert "dead_pct" in result.metrics and "loss_l1" in result.metrics


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_backward_equals_dense_autograd(arch):
    """The top-k layers backpropagate only through the chosen entries; the gradients must be the dense ones."""
    torch.manual_seed(0)
    sae = ARCHITECTURES[arch](16, 64, k=4, k_aux=6).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead)
    out.loss_parts["loss"].backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()

    pre = torch.relu(sae.encoder(x - sae.b_dec))
    x_hat = pre * (out.latents.detach() != 0) @ sae.W_dec + sae.b_dec
    variance = (x - x.mean(0)).pow(2).sum()
    residual = (x - x_hat).detach()
    _, picked = pre.masked_fill(~dead, -1.0).topk(6, dim=-1)
    residual_hat = torch.zeros_like(pre).scatter(-1, picked, 1.0) * pre @ sae.W_dec
    auxk = (residual_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    ((x_hat - x).pow(2).sum() / variance + sae.auxk_alpha * auxk).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, msg=name)


# --- training machinery -------------------------------------------------------------------------------------------
def test_mlflow_run_has_params_step_metrics_and_artifacts(topk_run, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    run = client.get_run(topk_run.run_id)
    assert run.info.status == "FINISHED"
    for key, value in quick_config().model_dump().items():
        assert run.data.params[key] == str(value)
    assert run.data.tags["purpose"] == "test" and run.data.tags["model"] == "tiny.en" and run.data.tags["hook"] == HOOK
    for key in ("loss", "loss_fvu", "loss_auxk", "fvu", "l0", "dead_pct", "dense_pct", "lr", "grad_norm"):
        assert len(history(mlflow_uri, topk_run.run_id, key)) == 6, key
    assert [m.step for m in client.get_metric_history(topk_run.run_id, "eval/fvu")] == [30, 60]
    artifacts = {a.path for a in client.list_artifacts(topk_run.run_id)}
    assert {"checkpoint", "eval_report.json", "feature_density.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(topk_run.run_id, "checkpoint")} == {
        "checkpoint/sae_weights.safetensors", "checkpoint/cfg.json",
    }  # fmt: skip
    report = json.loads((topk_run.checkpoint_dir / "eval_report.json").read_text())
    assert report["fvu"] == pytest.approx(topk_run.metrics["eval/fvu"]) and sum(report["histogram"]["counts"]) > 0


def test_resumed_run_ends_with_identical_weights(frames, mlflow_uri, tmp_path):
    # Dead latents appear within the run, so AuxK and the dead counters are part of what must be restored.
    cfg = quick_config(steps=24, checkpoint_every=12, log_every=4, eval_every=0, dead_after_frames=1024)
    whole = train_sae(
        frames["train"], cfg, out_dir=tmp_path / "whole", mlflow_tracking_uri=mlflow_uri, experiment="test-sae"
    )
    assert max(history(mlflow_uri, whole.run_id, "loss_auxk")) > 0
    resumed = train_sae(
        frames["train"], cfg, out_dir=tmp_path / "resumed", mlflow_tracking_uri=mlflow_uri, experiment="test-sae",
        resume_from=tmp_path / "whole" / "checkpoints" / "step_00000012",
    )  # fmt: skip
    assert resumed.run_id != whole.run_id
    weights = "sae_weights.safetensors"
    a, b = load_file(tmp_path / "whole" / weights), load_file(tmp_path / "resumed" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = load_trainer_state(tmp_path / "whole")
    state_b = load_trainer_state(tmp_path / "resumed")
    assert torch.equal(state_a["firing"]["frames_since_fired"], state_b["firing"]["frames_since_fired"])
    with pytest.raises(CheckpointError, match="batch_size"):
        train_sae(
            frames["train"], cfg.model_copy(update={"batch_size": 128}), out_dir=tmp_path / "bad",
            mlflow_tracking_uri=mlflow_uri, experiment="test-sae", resume_from=tmp_path / "whole",
        )  # fmt: skip


@pytest.mark.parametrize("optimiser", ["adam", "radam"])
def test_optimiser_eps_takes_effect(optimiser):
    from freud_pipeline.sae.train import make_optimizer

    assert TrainConfig(hook=HOOK).optimiser_eps == 1e-8  # PyTorch's default for both: the behaviour before the field

    def trained_weight(eps: float) -> torch.Tensor:
        sae = TopKSAE(8, 32, k=4)
        with torch.no_grad():
            sae.b_dec.zero_()
        optimizer = make_optimizer(quick_config(optimiser=optimiser, optimiser_eps=eps, lr=1e-2), sae)
        assert [g["eps"] for g in optimizer.param_groups] == [eps]
        for _ in range(10):  # RAdam applies the adaptive (eps-dependent) step from its 6th step on
            for p in sae.parameters():
                p.grad = torch.full_like(p, 1e-6)  # gradients near eps: eps decides the step size
            optimizer.step()
        return sae.b_dec.detach().clone()

    moved_default, moved_large = -trained_weight(1e-8), -trained_weight(1e-5)
    assert (moved_large > 0).all() and (moved_large < 0.5 * moved_default).all()


def test_resume_accepts_trainer_states_from_before_optimiser_eps():
    from freud_pipeline.sae.train import _check_resumable

    saved = quick_config().model_dump()
    del saved["optimiser_eps"]  # trainer states written before the field: trained with PyTorch's default
    _check_resumable(saved, quick_config())
    with pytest.raises(CheckpointError, match="optimiser_eps"):
        _check_resumable(saved, quick_config(optimiser_eps=1e-5))


def test_saved_sae_takes_raw_activations(topk_run, frames):
    scale = topk_run.input_scale
    x = frames["eval"]
    assert abs(math.log(scale)) > 0.1  # the scaling is not a no-op here, so folding is actually tested
    assert float((frames["train"] * scale).norm(dim=-1).mean()) == pytest.approx(math.sqrt(384), rel=0.1)
    raw = load_checkpoint(topk_run.checkpoint_dir)
    unfolded = TopKSAE(384, raw.n_latents, k=16)
    unfolded.load_state_dict(load_trainer_state(topk_run.checkpoint_dir)["sae"])
    unfolded.eval()
    with torch.no_grad():
        scaled = unfolded(x * scale)
        direct = raw(x)
    torch.testing.assert_close(direct.x_hat, scaled.x_hat / scale, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(direct.latents, scaled.latents / scale, rtol=1e-4, atol=1e-4)
    assert evaluate_sae(raw, x, HOOK, 1, batch_size=len(x)).fvu == pytest.approx(fvu(x, direct.x_hat), rel=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_folding_matches_scaled_inputs_for_every_architecture(arch):
    torch.manual_seed(1)
    sae = small_sae(arch, 32, 128, 8).eval()
    with torch.no_grad():
        for p in sae.parameters():
            if p.dim() == 1:
                p.normal_()  # non-zero biases (and JumpReLU's thresholds): the part folding has to get right
        if arch in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.5)
    from freud_pipeline.sae.scaling import folded_copy

    x, scale = 3 * torch.randn(64, 32), 0.37
    folded = folded_copy(sae, scale)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).x_hat, sae(x * scale).x_hat / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(folded.encode(x), sae.encode(x * scale) / scale, rtol=1e-4, atol=1e-5)


# --- checkpoints ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_checkpoint_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    sae = small_sae(arch, 48, 96, 6).eval()
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        sae.threshold.fill_(0.1)
    save_checkpoint(sae, tmp_path, {"hook_name": HOOK, "model_name": "tiny.en"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_in"] == 48 and cfg["d_sae"] == 96 and cfg["freud_architecture"] == arch
    assert cfg["architecture"] == ("topk" if arch == "topk" else "standard" if arch == "l1" else "jumprelu")  # SAELens'
    assert cfg["hook_name"] == HOOK and cfg["model_name"] == "tiny.en" and cfg["normalize_activations"] == "none"
    assert cfg["dtype"] == "float32" and cfg["k"] == (None if arch in ("l1", "jumprelu") else 6)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (48, 96) and tensors["W_dec"].shape == (96, 48)
    assert tensors["b_enc"].shape == (96,) and tensors["b_dec"].shape == (48,)
    loaded = load_checkpoint(tmp_path)
    assert type(loaded) is type(sae) and loaded.cfg["hook_name"] == HOOK
    x = torch.randn(20, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))
        torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("arch", ["batchtopk", "l1", "topk"])  # the architectures that existed then
def test_checkpoints_of_the_old_layout_still_load(arch, tmp_path):
    """Before the SAELens layout: sae.safetensors, our architecture name in `architecture`, a scalar threshold."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sae = ARCHITECTURES[arch](48, 96, **({} if arch == "l1" else {"k": 6})).eval()
    with torch.no_grad():
        for p in sae.parameters():
            if p.dim() == 1:
                p.normal_()
    tensors = {k: v.detach().clone().contiguous() for k, v in sae.export_tensors().items()}
    if arch == "batchtopk":
        tensors["threshold"] = torch.tensor(0.3)
        sae.threshold.fill_(0.3)
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, old / "sae.safetensors", metadata={"format": "pt"})
    cfg = {"dtype": "float32", "normalize_activations": "none", "hook_name": HOOK, "model_name": "tiny.en", "k": None,
           **sae.cfg, "step": 7}  # fmt: skip
    (old / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_checkpoint(old)
    assert type(loaded) is type(sae) and loaded.metadata["hook_name"] == HOOK and loaded.metadata["step"] == 7
    x = 3 * torch.randn(20, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))
        torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    # Saved again, it is in the new layout, without the stale old weights file, and its metadata carries over.
    save_checkpoint(loaded, old)
    assert sorted(p.name for p in old.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    resaved = json.loads((old / "cfg.json").read_text())
    assert resaved["freud_architecture"] == arch and resaved["step"] == 7 and resaved["hook_name"] == HOOK
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(old).encode(x), sae.encode(x))


def test_checkpoints_that_are_not_ours_are_refused(tmp_path):
    sae = BatchTopKSAE(8, 16, k=2).eval()
    save_checkpoint(sae, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    del cfg["freud_architecture"]  # e.g. a JumpReLU SAE SAELens trained: not necessarily a BatchTopK SAE
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="freud_architecture"):
        load_checkpoint(tmp_path / "a")
    from safetensors.torch import save_file

    save_checkpoint(sae, tmp_path / "b")
    tensors = load_file(tmp_path / "b" / "sae_weights.safetensors")
    tensors["threshold"] = torch.linspace(0, 1, 16)  # per-latent thresholds: JumpReLU, not BatchTopK
    save_file(tensors, tmp_path / "b" / "sae_weights.safetensors")
    with pytest.raises(CheckpointError, match="threshold differs"):
        load_checkpoint(tmp_path / "b")


def test_original_freud_checkpoints_load(tmp_path):
    d, n = 24, 64
    torch.manual_seed(0)
    hparams = {"activation_size": d, "whisper_config": {"model": "tiny", "layer_name": "encoder.blocks.1"}}
    # L1 (tied, DDP-prefixed keys, columns not yet unit norm as saved mid-training).
    W, b = torch.randn(d, n), 0.1 * torch.randn(n)
    torch.save({
        "model": {"module.decoder.weight": W, "module.encoder_bias": b}, "optimizer": {}, "scheduler": {}, "step": 7,
        "best_val_loss": 1.0,
        "hparams": {
            **hparams, "autoencoder_variant": "l1", "autoencoder_config": {"n_dict_components": n, "recon_alpha": 1e4},
        },
    }, tmp_path / "l1.pth")  # fmt: skip
    # TopK in EleutherAI's layout.
    enc_w, enc_b, W_dec, b_dec = torch.randn(n, d), 0.1 * torch.randn(n), torch.randn(n, d), torch.randn(d)
    torch.save({
        "model": {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
        "optimizer": {}, "scheduler": {}, "step": 3, "best_val_loss": 1.0,
        "hparams": {**hparams, "autoencoder_variant": "topk", "autoencoder_config": {"k": 5, "expansion_factor": 32}},
    }, tmp_path / "topk.pth")  # fmt: skip

    x = torch.randn(10, d)
    l1 = load_original_freud_checkpoint(tmp_path / "l1.pth")
    assert isinstance(l1, L1SAE)
    assert l1.metadata["hook_name"] == "encoder.blocks.1" and l1.metadata["model_name"] == "tiny"
    unit = torch.nn.functional.normalize(W, dim=0)
    with torch.no_grad():
        torch.testing.assert_close(l1.encode(x), torch.relu(x @ unit + b))
        torch.testing.assert_close(l1.decode(l1.encode(x)), torch.relu(x @ unit + b) @ unit.T)
    topk = load_original_freud_checkpoint(tmp_path / "topk.pth")
    assert isinstance(topk, TopKSAE) and topk.k == 5 and topk.n_latents == n
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    values, index = pre.topk(5, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, index, values)
    with torch.no_grad():
        torch.testing.assert_close(topk.encode(x), expected)
        torch.testing.assert_close(topk.decode(expected), expected @ W_dec + b_dec)
    torch.save({"model": {}, "hparams": {**hparams, "autoencoder_variant": "gated"}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="gated"):
        load_original_freud_checkpoint(tmp_path / "bad.pth")


# --- metrics and config -------------------------------------------------------------------------------------------
def test_metrics_on_known_cases():
    torch.manual_seed(0)
    x = torch.randn(1000, 8) + 5
    assert fvu(x, x) == 0 and fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    # A constant offset is unexplained variance for FVU but not for explained variance.
    assert explained_variance(x, x + 3) == pytest.approx(1.0) and fvu(x, x + 3) > 5
    latents = torch.zeros(10, 4)
    latents[:, 0] = 1  # fires everywhere: dense
    latents[0, 1] = 2  # fires on 10%: not dense (the bound is strict)
    assert l0(latents) == pytest.approx(1.1)
    frequency = (latents != 0).double().mean(0)
    assert dead_fraction(frequency) == 0.5 and dense_fraction(frequency) == 0.25
    histogram = density_histogram(frequency)
    assert histogram["n_dead"] == 2 and sum(histogram["counts"]) == 2


def test_tensor_source_serves_full_reshuffled_batches():
    source = TensorFrameSource(torch.arange(10.0).unsqueeze(1), hook=HOOK)
    batches = list(zip(range(4), source.random_frames(HOOK, 4, seed=0)))
    assert all(b.shape == (4, 1) for _, b in batches)  # full batches, even across the end of a pass
    first_pass = torch.cat([b for _, b in batches]).flatten()[:10].tolist()
    assert sorted(first_pass) == list(range(10)) and first_pass != list(range(10))  # every frame once, shuffled
    assert source.width(HOOK) == 1
    with pytest.raises(ValueError):
        source.width("encoder.blocks.0")


def test_configs_validate():
    demo = demo_config()
    assert demo.architecture == "topk" and demo.expansion_factor == 16 and demo.k == 64 and demo.hook == HOOK
    # demo_config is configs/train/demo_topk.yaml (what RESULTS.md "Demo SAE" measured), apart from its device.
    import yaml

    from freud_pipeline.defs.sae import SaeAssetConfig, run_config

    run = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/train/demo_topk.yaml").read_text())
    assert run_config(SaeAssetConfig(**run["config"]), "tiny.en").train_config() == demo_config(device="cpu")
    with pytest.raises(ValueError):
        TrainConfig(hook=HOOK, architecture="gated")
    with pytest.raises(ValueError):
        TrainConfig(hook=HOOK, learning_rate=1e-3)  # unknown fields are errors, not silently ignored
