"""The JumpReLU and Matryoshka BatchTopK SAEs: the defining property of each, checkpoints, folding, per-prefix FVU
and exact resumption, on small synthetic sparse data (known dictionaries with heavy-tailed feature frequencies)."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

from freud_pipeline.sae import (
    BatchTopKSAE,
    CheckpointError,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    TrainConfig,
    evaluate_sae,
    load_checkpoint,
    save_checkpoint,
    train_sae,
)
from freud_pipeline.sae.firing import FiringTracker
from freud_pipeline.sae.matryoshka import resolve_prefixes
from freud_pipeline.sae.metrics import fvu
from freud_pipeline.sae.resume import load_trainer_state
from freud_pipeline.sae.scaling import folded_copy
from freud_pipeline.sae.train import lr_factor, make_optimizer, training_step

HOOK = "encoder.blocks.2"
D, N_LATENTS = 32, 128


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mlflow_uri(session_data_dir) -> str:
    return f"sqlite:///{session_data_dir / 'mlflow.db'}"


def sparse_frames(n_frames: int = 8192, n_features: int = 96, seed: int = 0) -> torch.Tensor:
    """Frames made of ~4 of `n_features` unit directions each, with Zipf-like frequencies (a few features are
    common, most rare, as in real activations) and magnitudes in [0.5, 2.5]."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(n_features, D, generator=g), dim=1)
    frequency = torch.arange(1, n_features + 1).float() ** -1.2
    on = torch.rand(n_frames, n_features, generator=g) < (4 * frequency / frequency.sum()).clamp(max=1)
    return (on * (0.5 + 2 * torch.rand(n_frames, n_features, generator=g))) @ dictionary


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return sparse_frames()


def train_steps(sae, frames: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 256) -> list[float]:
    """`steps` of the trainer's own step (train.training_step) on random batches; the L0 of each step."""
    cfg = TrainConfig(hook=HOOK, lr=lr, warmup_steps=0, steps=steps, schedule="linear-warmup", device="cpu")
    optimizer = make_optimizer(cfg, sae)
    scheduler = LambdaLR(optimizer, lr_factor(cfg))
    tracker = FiringTracker(sae.n_latents, 10**9, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    l0 = []
    for _ in range(steps):
        out, _, _ = training_step(sae, frames[torch.randint(len(frames), (batch,), generator=g)], optimizer,
                                  scheduler, tracker, 1.0)  # fmt: skip
        l0.append(out.l0())
    return l0


# --- JumpReLU ----------------------------------------------------------------------------------------------------
class _DenseJumpReLU(torch.autograd.Function):
    """The paper's JumpReLU and step with their rectangle-kernel pseudo-derivatives, written densely."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold), (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad_z, grad_step):
        pre, threshold = ctx.saved_tensors
        kernel = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre) / ctx.bandwidth
        grad_threshold = (-threshold * kernel * grad_z - kernel * grad_step).sum(0)
        return grad_z * (pre > threshold), grad_threshold, None


@pytest.mark.parametrize("l0_target", [6.0, None])
def test_jumprelu_gradients_reach_the_thresholds(l0_target):
    """The sparse forward's gradients equal the dense straight-through estimator's, and the thresholds get some."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(16, 64, l0_coefficient=0.3, l0_target=l0_target, jumprelu_bandwidth=0.5).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
        sae.threshold.uniform_(0, 1)
    x = torch.randn(32, 16, dtype=torch.float64)
    out = sae(x)
    out.loss_parts["loss"].backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    assert sparse_grads["threshold"].count_nonzero() > 32  # most latents have frames near their threshold here
    sae.zero_grad()

    z, step = _DenseJumpReLU.apply(sae.encoder(x - sae.b_dec), sae.threshold, sae.jumprelu_bandwidth)
    x_hat = z @ sae.W_dec + sae.b_dec
    l0 = step.sum(-1).mean()
    penalty = l0 if l0_target is None else (l0 / l0_target - 1) ** 2
    loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum() + 0.3 * penalty
    loss.backward()
    torch.testing.assert_close(out.loss_parts["loss"].detach(), loss.detach())
    assert out.l0() == pytest.approx(float(l0.detach()))
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, msg=name)


def test_jumprelu_l0_moves_to_its_target(frames):
    torch.manual_seed(0)
    sae = JumpReLUSAE(D, N_LATENTS, l0_coefficient=1.0, l0_target=8.0)  # thresholds at 0.01: half the latents fire
    with torch.no_grad():
        sae.b_dec.copy_(frames.mean(0))
    l0 = train_steps(sae, frames, 250)
    assert l0[0] > 40 and abs(sum(l0[-20:]) / 20 - 8) < 2
    assert (sae.threshold > 0.05).float().mean() > 0.9  # it got there by raising the thresholds
    sae.eval()
    with torch.no_grad():
        assert fvu(frames[:2048], sae(frames[:2048]).x_hat) < 0.2


def test_jumprelu_starts_at_its_target_from_data(frames):
    torch.manual_seed(0)
    sae = JumpReLUSAE(D, N_LATENTS, l0_target=8.0).eval()
    sae.init_from_data(frames[:2048])
    with torch.no_grad():
        assert 6 < sae(frames[:2048]).l0() < 10
        counts = (sae.encode(frames[:2048]) > 0).sum(0)
    assert counts.min() > 0  # per latent, the same firing rate: none starts dead


def jumprelu_with_varied_thresholds() -> JumpReLUSAE:
    torch.manual_seed(1)
    sae = JumpReLUSAE(D, N_LATENTS, l0_target=8.0).eval()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
        sae.threshold.uniform_(0, 1.5)
    return sae


def test_jumprelu_checkpoint_round_trip(tmp_path):
    sae = jumprelu_with_varied_thresholds()
    save_checkpoint(sae, tmp_path, {"hook_name": HOOK, "model_name": "tiny.en"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["freud_architecture"]) == ("jumprelu", "jumprelu")  # SAELens', ours
    assert (cfg["l0_target"], cfg["l0_coefficient"], cfg["jumprelu_bandwidth"]) == (8.0, 1.0, 0.05)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    torch.testing.assert_close(tensors["threshold"], sae.threshold.detach())  # per latent, SAELens' layout
    loaded = load_checkpoint(tmp_path)
    assert type(loaded) is JumpReLUSAE and loaded.l0_target == 8.0
    x = 3 * torch.randn(64, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))
        torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
        # SAELens' equations: ReLU(pre) * (pre > threshold)
        pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
        torch.testing.assert_close(loaded.encode(x), pre.relu() * (pre > tensors["threshold"]))


def test_jumprelu_folding_divides_the_thresholds():
    sae = jumprelu_with_varied_thresholds()
    x, scale = 3 * torch.randn(64, D), 0.37
    folded = folded_copy(sae, scale)
    torch.testing.assert_close(folded.threshold, sae.threshold / scale)
    with torch.no_grad():
        assert sae.encode(x * scale).count_nonzero() > 0
        torch.testing.assert_close(folded(x).x_hat, sae(x * scale).x_hat / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(folded.encode(x), sae.encode(x * scale) / scale, rtol=1e-4, atol=1e-5)


# --- Matryoshka BatchTopK ----------------------------------------------------------------------------------------
def test_prefixes_resolve_to_nested_latent_counts():
    assert resolve_prefixes([1 / 16, 0.25, 1.0], 128) == [8, 32, 128]
    assert resolve_prefixes([16, 48], 128) == [16, 48, 128]  # the full dictionary is always the last prefix
    assert resolve_prefixes([0.125, 64.0], 128) == [16, 64, 128]
    for bad in ([32, 16], [0.5, 0.25], [200], [1.5]):
        with pytest.raises(ValueError):
            resolve_prefixes(bad, 128)
    with pytest.raises(ValueError, match="matryoshka_prefixes"):
        TrainConfig(hook=HOOK, matryoshka_prefixes=[0.5, 0.25])
    assert MatryoshkaBatchTopKSAE(D, N_LATENTS, k=4).cfg["matryoshka_prefixes"] == [8, 32, 128]


def test_matryoshka_prefix_alone_reconstructs_better_than_a_flat_sae(frames):
    """Trained alike (same init seed, data, batches, steps, k), the Matryoshka SAE's first 16 latents reconstruct
    held-out frames far better than the first 16 latents of a flat BatchTopK SAE; the full dictionaries are close."""
    train, held_out = frames[:-2048], frames[-2048:]
    result = {}
    for name, sae_class, extra in (("matryoshka", MatryoshkaBatchTopKSAE, {"matryoshka_prefixes": [16, 48]}),
                                   ("flat", BatchTopKSAE, {})):  # fmt: skip
        torch.manual_seed(0)
        sae = sae_class(D, N_LATENTS, k=4, **extra)
        sae.init_from_data(train[:2048])
        train_steps(sae, train, 300)
        sae.eval()
        with torch.no_grad():
            latents = sae.encode(held_out)
            result[name] = {p: fvu(held_out, latents[:, :p] @ sae.W_dec[:p] + sae.b_dec) for p in (16, 48, N_LATENTS)}
        if name == "matryoshka":
            assert sae.prefix_fvu(held_out) == pytest.approx(result[name], rel=1e-5)  # the same numbers
    matryoshka, flat = result["matryoshka"], result["flat"]
    assert matryoshka[16] > matryoshka[48] > matryoshka[N_LATENTS]  # each prefix refines the one before
    assert matryoshka[16] < 0.5 * flat[16] and matryoshka[48] < 0.6 * flat[48]
    assert matryoshka[N_LATENTS] < 0.2 and flat[N_LATENTS] < 0.2


def test_evaluation_reports_fvu_per_prefix(frames):
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(D, N_LATENTS, k=4, matryoshka_prefixes=[16, 48])
    sae.init_from_data(frames[:2048])
    train_steps(sae, frames, 100)
    report = evaluate_sae(sae, frames, HOOK, 2, batch_size=1024)
    # An SAE trained on scaled frames, evaluated at its scale: the same FVUs.
    scaled = evaluate_sae(sae, frames / 2, HOOK, 2, batch_size=1024, input_scale=2.0)
    assert scaled.prefix_fvu == pytest.approx(report.prefix_fvu, rel=1e-5)
    assert set(report.prefix_fvu) == {16, 48, N_LATENTS}
    assert report.prefix_fvu[N_LATENTS] == pytest.approx(report.fvu, rel=1e-9)
    assert report.prefix_fvu[16] > report.prefix_fvu[48] > report.fvu
    scalars = report.scalars()
    assert scalars["fvu_prefix_16"] == report.prefix_fvu[16] and "fvu_prefix_16" in report.to_json()
    assert "fvu_prefix_16" not in evaluate_sae(BatchTopKSAE(D, N_LATENTS, k=4), frames, HOOK, 1).scalars()


def test_matryoshka_checkpoint_is_saved_as_saelens_saves_it(tmp_path, frames):
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(D, N_LATENTS, k=4, matryoshka_prefixes=[16, 48])
    sae.init_from_data(frames[:2048])
    train_steps(sae, frames, 10)
    sae.eval()
    save_checkpoint(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["freud_architecture"]) == ("jumprelu", "matryoshka_batchtopk")
    assert cfg["matryoshka_prefixes"] == [16, 48, N_LATENTS] and cfg["k"] == 4
    threshold = load_file(tmp_path / "sae_weights.safetensors")["threshold"]
    assert threshold.shape == (N_LATENTS,) and bool((threshold == float(sae.threshold)).all())
    loaded = load_checkpoint(tmp_path)
    assert type(loaded) is MatryoshkaBatchTopKSAE and loaded.matryoshka_prefixes == [16, 48, N_LATENTS]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(frames[:256]), sae.encode(frames[:256]))
    assert loaded.prefix_fvu(frames[:256]) == pytest.approx(sae.prefix_fvu(frames[:256]))


# --- through train_sae: per-prefix metrics, exact resumption --------------------------------------------------------
def quick_config(architecture: str, **overrides) -> TrainConfig:
    defaults = dict(
        architecture=architecture, hook=HOOK, model_name="synthetic", expansion_factor=4, k=4, l0_target=8.0,
        matryoshka_prefixes=[16, 48], lr=3e-3, warmup_steps=5, steps=24, batch_size=256, log_every=4,
        eval_every=0, eval_batches=2, checkpoint_every=12, dead_after_frames=256, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**defaults, **overrides})


@pytest.mark.parametrize("architecture", ["jumprelu", "matryoshka_batchtopk"])
def test_resumed_run_ends_with_identical_weights(architecture, frames, mlflow_uri, tmp_path):
    cfg = quick_config(architecture)
    kwargs = dict(mlflow_tracking_uri=mlflow_uri, experiment="test-sae-frontier")
    whole = train_sae(frames, cfg, out_dir=tmp_path / "whole", eval_source=frames[:2048], **kwargs)
    train_sae(frames, cfg, out_dir=tmp_path / "resumed", eval_source=frames[:2048],
              resume_from=tmp_path / "whole" / "checkpoints" / "step_00000012", **kwargs)  # fmt: skip
    a = load_file(tmp_path / "whole" / "sae_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "sae_weights.safetensors")
    assert a.keys() == b.keys() and "threshold" in a and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = load_trainer_state(tmp_path / "whole"), load_trainer_state(tmp_path / "resumed")
    assert all(torch.equal(state_a["sae"][k], state_b["sae"][k]) for k in state_a["sae"])
    assert isinstance(whole.sae, JumpReLUSAE if architecture == "jumprelu" else MatryoshkaBatchTopKSAE)
    history = MlflowClient(mlflow_uri).get_metric_history
    if architecture == "matryoshka_batchtopk":
        assert max(m.value for m in history(whole.run_id, "loss_auxk")) > 0  # AuxK and dead counters restored
        for size in (16, 48, 128):
            assert len(history(whole.run_id, f"loss_fvu_prefix_{size}")) == 6
        prefixes = [whole.metrics[f"eval/fvu_prefix_{size}"] for size in (16, 48, 128)]
        assert prefixes[0] > prefixes[1] > prefixes[2] == pytest.approx(whole.metrics["eval/fvu"])
    else:
        assert len(history(whole.run_id, "loss_l0_penalty")) == 6 and 2 < whole.metrics["eval/l0"] < 20
    with pytest.raises(CheckpointError, match="l0_target" if architecture == "jumprelu" else "matryoshka_prefixes"):
        changed = {"l0_target": 4.0} if architecture == "jumprelu" else {"matryoshka_prefixes": [32, 64]}
        train_sae(frames, cfg.model_copy(update=changed), out_dir=tmp_path / "bad",
                  resume_from=tmp_path / "whole", **kwargs)  # fmt: skip
