"""SAELens loads our SAE checkpoints as saved: the real sae-lens, on SAEs trained briefly on real tiny.en
activations, computes the same latents and reconstructions as our own loader (docs/SAE_FORMAT.md).

sae-lens is not a FREUD dependency: scripts/install.sh installs it, with the few packages `import sae_lens` needs
that the venv lacks, into .venv/extras/sae_lens (`pip install --no-deps --target`). It runs in a subprocess that
puts that directory on sys.path after the venv's packages, so neither our pins nor this test process see its
packages (transformers, wandb, datasets, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from freud_pipeline.sae import BatchTopKSAE, JumpReLUSAE, TrainConfig, load_checkpoint, train_sae
from freud_pipeline.sae.checkpoint import CFG_FILE, WEIGHTS_FILE

try:
    from conftest import require_extra
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra

# Shared with test_sae: the cached capture (activations computed once per session) and two fixtures.
try:
    from test_sae import EVAL_CLIPS, HOOK, TRAIN_CLIPS, mlflow_uri, one_intra_op_thread, prompt_frames
except ImportError:  # tests collected as a package
    from tests.test_sae import EVAL_CLIPS, HOOK, TRAIN_CLIPS, mlflow_uri, one_intra_op_thread, prompt_frames

__all__ = ["mlflow_uri", "one_intra_op_thread"]  # fixtures: used by pytest, not by name

REPO = Path(__file__).resolve().parents[1]
SAE_LENS_DIR = REPO / ".venv" / "extras" / "sae_lens"
SAE_LENS_VERSION = "6.54.12"  # what scripts/install.sh installs
ARCHS = ("topk", "l1", "batchtopk", "jumprelu", "matryoshka_batchtopk")
# SAELens has no inference class for Matryoshka BatchTopK SAEs: it saves them, as BatchTopK ones, as JumpReLU.
SAELENS_ARCHITECTURE = {"topk": "topk", "l1": "standard", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                        "matryoshka_batchtopk": "jumprelu"}
SAELENS_CLASS = {"topk": "TopKSAE", "l1": "StandardSAE", "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE",
                 "matryoshka_batchtopk": "JumpReLUSAE"}

# Runs in the subprocess: load every checkpoint with SAELens, encode and decode the frames, save the results.
SAELENS_SCRIPT = """
import json, sys
sys.path.append(sys.argv[1])  # after the venv's packages: never shadows them
import torch
torch.set_num_threads(1)
import sae_lens
from safetensors.torch import load_file, save_file

x = load_file(sys.argv[2])["x"]
results, info = {}, {"version": sae_lens.__version__}
for name, directory in json.loads(sys.argv[4]).items():
    sae = sae_lens.SAE.load_from_disk(directory)
    with torch.no_grad():
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
    results[name + ".latents"] = (latents.to_dense() if latents.is_sparse else latents).contiguous()
    results[name + ".x_hat"] = x_hat.contiguous()
    cfg = sae.cfg
    info[name] = {
        "class": type(sae).__name__, "architecture": cfg.architecture(), "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "k": getattr(cfg, "k", None), "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations, "hook_name": cfg.metadata.hook_name,
        "model_name": cfg.metadata.model_name,
    }
save_file(results, sys.argv[3])
print(json.dumps(info))
"""


@pytest.fixture(scope="module")
def frames(tiny_en) -> dict[str, torch.Tensor]:
    return {"train": prompt_frames(tiny_en, tuple(TRAIN_CLIPS)), "eval": prompt_frames(tiny_en, tuple(EVAL_CLIPS))}


@pytest.fixture(scope="module")
def checkpoints(frames, mlflow_uri, tmp_path_factory) -> dict[str, Path]:
    """Per architecture, the `checkpoint` artifact train_sae uploaded to MLflow (what the registry points at),
    downloaded as is."""
    tmp = tmp_path_factory.mktemp("interop")
    client = MlflowClient(mlflow_uri)
    found = {}
    for arch in ARCHS:
        cfg = TrainConfig(
            architecture=arch, hook=HOOK, model_name="tiny.en", expansion_factor=4, k=16, l0_target=16,
            matryoshka_prefixes=[0.125, 0.5], lr=2e-3, warmup_steps=5, steps=40, batch_size=256, log_every=20,
            eval_every=0, eval_batches=1, dead_after_frames=4096, device="cpu",
        )  # fmt: skip
        result = train_sae(frames["train"], cfg, out_dir=tmp / "train" / arch, mlflow_tracking_uri=mlflow_uri,
                           experiment="test-sae-interop")  # fmt: skip
        if arch in ("batchtopk", "matryoshka_batchtopk"):
            assert isinstance(result.sae, BatchTopKSAE) and float(result.sae.threshold) > 0
        if arch == "jumprelu":
            assert isinstance(result.sae, JumpReLUSAE)
        (tmp / "mlflow" / arch).mkdir(parents=True)
        found[arch] = Path(client.download_artifacts(result.run_id, "checkpoint", str(tmp / "mlflow" / arch)))
    return found


@pytest.fixture(scope="module")
def saelens(checkpoints, frames, tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """(what SAELens reports about each checkpoint, its latents and reconstructions of the eval frames)."""
    require_extra((SAE_LENS_DIR / f"sae_lens-{SAE_LENS_VERSION}.dist-info").is_dir(),
                  f"sae-lens {SAE_LENS_VERSION} in {SAE_LENS_DIR}")
    tmp = tmp_path_factory.mktemp("saelens")
    save_file({"x": frames["eval"].contiguous()}, tmp / "x.safetensors")
    # Offline and quiet: loading from disk needs no network, and nothing may phone home from a test.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", SAELENS_SCRIPT, str(SAE_LENS_DIR), str(tmp / "x.safetensors"),
         str(tmp / "out.safetensors"), json.dumps({k: str(v) for k, v in checkpoints.items()})],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), load_file(tmp / "out.safetensors")


def test_checkpoint_artifact_is_in_the_saelens_layout(checkpoints):
    for arch, directory in checkpoints.items():
        assert sorted(p.name for p in directory.iterdir()) == sorted([CFG_FILE, WEIGHTS_FILE]), arch
        cfg = json.loads((directory / CFG_FILE).read_text())
        assert cfg["freud_architecture"] == arch and cfg["architecture"] == SAELENS_ARCHITECTURE[arch]
        assert "sae_lens_version" not in cfg  # SAELens reads it as its pre-6.0 flat config (docs/SAE_FORMAT.md)
    for arch in ("batchtopk", "matryoshka_batchtopk"):  # one threshold, repeated per latent
        threshold = load_file(checkpoints[arch] / WEIGHTS_FILE)["threshold"]
        assert threshold.shape == (384 * 4,) and bool((threshold == threshold[0]).all()) and float(threshold[0]) > 0
    threshold = load_file(checkpoints["jumprelu"] / WEIGHTS_FILE)["threshold"]  # learned per latent
    assert threshold.shape == (384 * 4,) and threshold.unique().numel() > 384 and bool((threshold >= 0).all())
    cfg = json.loads((checkpoints["matryoshka_batchtopk"] / CFG_FILE).read_text())
    assert cfg["matryoshka_prefixes"] == [192, 768, 1536]


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_checkpoint_as_saved_and_matches_ours(arch, checkpoints, saelens, frames):
    info, outputs = saelens
    assert info["version"] == SAE_LENS_VERSION
    seen = info[arch]
    assert seen["class"] == SAELENS_CLASS[arch]
    assert (seen["d_in"], seen["d_sae"], seen["apply_b_dec_to_input"], seen["normalize_activations"]) == (
        384, 384 * 4, True, "none")
    assert (seen["hook_name"], seen["model_name"]) == (HOOK, "tiny.en")
    if arch == "topk":
        assert seen["k"] == 16

    ours = load_checkpoint(checkpoints[arch])
    x = frames["eval"]
    with torch.no_grad():
        latents = ours.encode(x)
        x_hat = ours.decode(latents)
    assert latents.count_nonzero() > 0  # a real test: latents fire
    torch.testing.assert_close(outputs[f"{arch}.latents"], latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[f"{arch}.x_hat"], x_hat, rtol=1e-5, atol=1e-5)
    if arch == "topk":
        assert ((outputs["topk.latents"] != 0).sum(-1) <= 16).all()
