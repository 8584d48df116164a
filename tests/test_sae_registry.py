"""The SAE model registry (a real MLflow sqlite store), the quality check, the training configs in configs/train,
and our checkpoint format against the SAELens conventions it follows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from freud_pipeline.sae import ARCHITECTURES, TrainConfig, load_checkpoint, save_checkpoint
from freud_pipeline.sae.registry import (
    CHAMPION,
    QualityThresholds,
    champion_version,
    check_thresholds,
    describe_versions,
    download_champion,
    promote_if_better,
    register_checkpoint,
    registered_model_name,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))
GOOD = {"fvu": 0.2, "dead_pct": 5.0, "dense_pct": 1.0, "ce_recovered": 0.8}


@pytest.fixture(scope="module")
def client(session_data_dir) -> MlflowClient:
    """The session's sqlite store (created once per session: its migrations take seconds)."""
    return MlflowClient(f"sqlite:///{session_data_dir / 'mlflow.db'}")


@pytest.fixture(scope="module")
def experiment_id(client, session_data_dir) -> str:
    found = client.get_experiment_by_name("test-registry")
    if found is not None:
        return found.experiment_id
    return client.create_experiment("test-registry", artifact_location=(session_data_dir / "reg-art").as_uri())


def trained_run(client: MlflowClient, experiment_id: str, tmp_path: Path, seed: int) -> str:
    """A finished run whose `checkpoint` artifact is a real (tiny) SAE checkpoint, as train_sae leaves one."""
    torch.manual_seed(seed)
    sae = ARCHITECTURES["topk"](8, 32, k=4)
    sae.metadata = {"hook_name": "encoder.blocks.2", "model_name": "tiny.en"}
    directory = save_checkpoint(sae, tmp_path / f"ckpt-{seed}", {"seed": seed})
    run_id = client.create_run(experiment_id).info.run_id
    client.log_artifacts(run_id, str(directory), "checkpoint")
    client.set_terminated(run_id)
    return run_id


@pytest.fixture
def registered(client, experiment_id, tmp_path, request):
    """register(metrics) -> version: a new run registered under a model name unique to the test."""
    name = registered_model_name("tiny.en", "encoder.blocks.2", f"topk_{request.node.name}")
    count = iter(range(100))

    def register() -> str:
        return register_checkpoint(client, name, trained_run(client, experiment_id, tmp_path, next(count)))

    return name, register


# --- quality check ------------------------------------------------------------------------------------------------
def test_thresholds_pass_fail_and_treat_unmeasured_as_failing():
    assert check_thresholds(GOOD) == []
    failures = check_thresholds({**GOOD, "fvu": 0.7, "ce_recovered": 0.2})
    assert failures == ["fvu 0.7 > 0.5", "ce_recovered 0.2 < 0.5"]
    assert check_thresholds({**GOOD, "dead_pct": 60}, {"max_dead_pct": 75}) == []
    assert len(check_thresholds({**GOOD, "ce_recovered": math.nan})) == 1
    assert "not measured" in check_thresholds({"fvu": 0.1, "dead_pct": 0.0})[0]
    # A limit set to None is not checked; dense % is off by default.
    assert check_thresholds({"fvu": 0.1, "dead_pct": 0.0}, QualityThresholds(min_ce_recovered=None)) == []
    assert check_thresholds({**GOOD, "dense_pct": 30}, {"max_dense_pct": 10}) == ["dense_pct 30 > 10"]
    with pytest.raises(ValueError):
        QualityThresholds(max_fuv=0.3)  # a misspelt threshold is an error, not a silent default


def test_registered_model_names():
    assert registered_model_name("tiny.en", "encoder.blocks.2", "topk") == "freud-sae.tiny_en.encoder_blocks_2.topk"
    assert registered_model_name("large-v3", "encoder.blocks.16", "l1") == "freud-sae.large_v3.encoder_blocks_16.l1"
    with pytest.raises(ValueError):
        registered_model_name("", "encoder.blocks.2", "topk")


# --- promotion ----------------------------------------------------------------------------------------------------
def test_champion_moves_only_to_passing_and_better_versions(client, registered):
    name, register = registered
    assert champion_version(client, name) is None

    first = register()
    promoted, reason = promote_if_better(client, name, first, {**GOOD, "ce_recovered": 0.70})
    assert promoted and "first version" in reason
    assert champion_version(client, name).version == int(first)

    worse = register()
    promoted, reason = promote_if_better(client, name, worse, {**GOOD, "ce_recovered": 0.65})
    assert not promoted and "does not beat champion version" in reason
    assert champion_version(client, name).version == int(first)

    equal = register()
    assert promote_if_better(client, name, equal, {**GOOD, "ce_recovered": 0.70})[0] is False  # ties keep the champion

    better = register()
    promoted, reason = promote_if_better(client, name, better, {**GOOD, "ce_recovered": 0.90})
    assert promoted and f"beats champion version {first}" in reason
    assert champion_version(client, name).version == int(better)

    # Far better on CE recovered, but the check fails (FVU): never the champion.
    failing = register()
    promoted, reason = promote_if_better(client, name, failing, {**GOOD, "fvu": 0.9, "ce_recovered": 0.99})
    assert not promoted and reason.startswith("quality check failed: fvu 0.9 > 0.5")
    assert champion_version(client, name).version == int(better)

    tags = {int(v.version): v.tags for v in client.search_model_versions(f"name = '{name}'")}
    assert tags[int(failing)]["quality_check"] == "failed" and tags[int(better)]["quality_check"] == "passed"
    assert float(tags[int(better)]["metric.ce_recovered"]) == 0.90
    assert tags[int(worse)]["promotion"].startswith("ce_recovered 0.6500 does not beat")
    rows = describe_versions(client, name)
    assert [r["version"] for r in rows] == sorted((int(v) for v in (first, worse, equal, better, failing)), reverse=True)
    assert next(r for r in rows if r["version"] == int(better))["aliases"] == [CHAMPION]


def test_a_failing_first_version_does_not_become_champion(client, registered):
    name, register = registered
    version = register()
    promoted, reason = promote_if_better(client, name, version, {**GOOD, "ce_recovered": 0.3})
    assert not promoted and "ce_recovered 0.3 < 0.5" in reason
    assert champion_version(client, name) is None
    # Stricter, configurable thresholds apply the same way.
    version = register()
    assert not promote_if_better(client, name, version, GOOD, {"max_fvu": 0.1})[0]
    assert promote_if_better(client, name, version, GOOD, {"max_fvu": 0.25})[0]


def test_the_champion_checkpoint_downloads_and_loads(client, registered, tmp_path):
    name, register = registered
    version = register()
    promote_if_better(client, name, version, GOOD)
    champion = champion_version(client, name)
    assert champion.source == f"runs:/{champion.run_id}/checkpoint"
    sae = load_checkpoint(download_champion(client, name, tmp_path / "dl"))
    assert sae.n_latents == 32 and sae.metadata["seed"] == 0


# --- the Dagster asset check ------------------------------------------------------------------------------------
def _asset_output(metrics: dict, thresholds: dict | None = None, registry: dict | None = None) -> dict:
    return {"run_id": "r1", "checkpoint_dir": "/x", "model": "tiny.en", "hook": "encoder.blocks.2",
            "architecture": "topk", "experiment_id": "1", "registry": registry or {},
            "quality": {"metrics": metrics, "thresholds": QualityThresholds(**(thresholds or {})).model_dump()}}


def test_sae_quality_check_applies_the_asset_thresholds():
    from freud_pipeline.defs.sae import sae_quality

    spec = next(iter(sae_quality.check_specs))
    assert spec.name == "sae_quality" and spec.asset_key == dg.AssetKey("topk_sae") and spec.blocking

    passed = sae_quality(topk_sae=_asset_output(GOOD, registry={
        "name": "freud-sae.tiny_en.encoder_blocks_2.topk", "version": "3", "promoted": True, "reason": "first"}))
    assert passed.passed and passed.metadata["model_version"].value == 3
    assert passed.metadata["mlflow_run"].value.endswith("/#/experiments/1/runs/r1")
    failed = sae_quality(topk_sae=_asset_output({**GOOD, "dead_pct": 70.0}))
    assert not failed.passed and failed.severity == dg.AssetCheckSeverity.ERROR
    assert failed.description == "dead_pct 70 > 50"
    # Thresholds travel with the asset's output: the check judges by the config the SAE was trained with.
    assert sae_quality(topk_sae=_asset_output({**GOOD, "dead_pct": 70.0}, {"max_dead_pct": 80.0})).passed


def test_check_and_promotion_agree(client, registered):
    """The rule the asset uses to promote is the check's rule: whatever the check fails is never promoted."""
    from freud_pipeline.defs.sae import sae_quality

    name, register = registered
    cases = [{**GOOD, "ce_recovered": 0.55}, {**GOOD, "fvu": 0.51, "ce_recovered": 0.95},
             {**GOOD, "dead_pct": 50.5, "ce_recovered": 0.97}, {**GOOD, "ce_recovered": 0.6}]
    for metrics in cases:
        check = sae_quality(topk_sae=_asset_output(metrics))
        promoted, _ = promote_if_better(client, name, register(), metrics)
        assert check.passed or not promoted
    assert float(champion_version(client, name).tags["metric.ce_recovered"]) == 0.6


def test_held_out_clips_are_spread_over_sources_and_limited_to_30_s():
    import pandas as pd

    from freud_pipeline.sae.run import held_out_clips

    manifest = pd.DataFrame({
        "clip_id": [f"c{i}" for i in range(8)],
        "path": [f"p{i}" for i in range(8)],
        "duration_s": [5.0, 40.0, 3.0, 2.0, 6.0, 1.0, 4.0, 9.0],
        "transcript": ["a", "b", "c", "", "e", "f", "g", "h"],
        "source": ["x", "x", "x", "x", "y", "y", "y", "x"],
        "split": ["dev", "dev", "test", "dev", "dev", "test", "dev", "train"],
    })
    chosen = held_out_clips(manifest, 4)
    assert list(chosen["clip_id"]) == ["c0", "c4", "c2", "c6"]  # longest first, sources in turn
    assert set(held_out_clips(manifest, 10)["clip_id"]) == {"c0", "c2", "c4", "c5", "c6"}
    # The WER is of English transcription: clips of other languages are never spliced into.
    languages = manifest.assign(language=["en", "fr", None, "en", "es", "en", "EN", "en"])
    assert set(held_out_clips(languages, 10)["clip_id"]) == {"c0", "c2", "c5", "c6"}


# --- configs/train ----------------------------------------------------------------------------------------------
def test_every_train_config_states_its_measured_transcript_cost_or_why_not():
    """A user who trains a shipped config knows what it does to the transcript: its comment gives the measured
    ΔWER and L0, or says plainly that it is a smoke test or was not measured here (and why)."""
    for path in TRAIN_CONFIGS:
        comment = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
        measured = "ΔWER" in comment and "L0" in comment
        assert measured or "smoke test" in comment or "not measured" in comment, path.name


def test_train_configs_exist():
    names = {p.stem for p in TRAIN_CONFIGS}
    assert {"tiny_l1", "tiny_topk", "tiny_batchtopk", "large_v3_l1", "large_v1_audioset_topk", "demo_topk"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_train_config_parses_into_asset_and_train_config(path):
    from freud_pipeline.validation import load_run_config
    from freud_pipeline.defs.sae import SaeAssetConfig, run_config

    from freud_pipeline.defs.sae import SaeSweepConfig

    from freud_pipeline.defs.multi_sae import MultiSaeConfig
    from freud_pipeline.defs.stability import SeedStabilityConfig

    run = load_run_config(path)
    assert run["asset"] in ("topk_sae", "sae_sweep", "all_blocks_sae", "sae_seed_stability") and "partition" not in run
    config_class = {"topk_sae": SaeAssetConfig, "sae_sweep": SaeSweepConfig, "all_blocks_sae": MultiSaeConfig,
                    "sae_seed_stability": SeedStabilityConfig}[
        run["asset"]]
    config = config_class(**run["config"])  # unknown keys would be rejected here
    assert set(run["config"]) <= set(config_class.model_fields)
    if run["asset"] == "all_blocks_sae":  # one SAE per hook, each this recipe
        config = SaeAssetConfig(**config.model_dump(), hook="encoder.blocks.0")
    cfg = run_config(config, config.model or "tiny.en").train_config()
    assert isinstance(cfg, TrainConfig) and cfg.architecture == run["config"]["architecture"]
    for key, value in run["config"].items():
        if key in TrainConfig.model_fields and key != "warmup_steps":
            assert getattr(cfg, key) == value, key
    d_in = {"tiny": 384, "tiny.en": 384, "large-v3": 1280, "large-v1": 1280}[config.model or "tiny.en"]
    assert cfg.architecture == "l1" or cfg.k <= cfg.latents_for(d_in)
    # And Dagster accepts it as the asset's run config.
    from freud_pipeline.defs.definitions import defs

    from freud_pipeline.defs.multi_sae import all_blocks_sae

    selection = list(all_blocks_sae.keys) if run["asset"] == "all_blocks_sae" else [run["asset"]]
    job = (defs.resolve_job_def("sae_retrain_job") if run["asset"] == "topk_sae" else
           dg.define_asset_job("config_check", selection=selection).resolve(
               asset_graph=defs.resolve_asset_graph(), resource_defs=defs.resources))
    assert dg.validate_run_config(job, {"ops": {run["asset"]: {"config": run["config"]}}})


def test_original_values_of_tiny_topk_and_tiny_l1():
    tiny_topk = yaml.safe_load((REPO / "configs/train/tiny_topk.yaml").read_text())["config"]
    assert (tiny_topk["expansion_factor"], tiny_topk["k"], tiny_topk["lr"], tiny_topk["warmup_steps"],
            tiny_topk["steps"], tiny_topk["dead_after_frames"]) == (16, 32, 1e-4, 1000, 100_000, 1_000_000)
    assert tiny_topk["auxk_alpha"] == 1 / 32 and tiny_topk["optimiser"] == "adam" and tiny_topk["model"] == "tiny"
    tiny_l1 = yaml.safe_load((REPO / "configs/train/tiny_l1.yaml").read_text())["config"]
    assert (tiny_l1["n_latents"], tiny_l1["lr"], tiny_l1["optimiser"], tiny_l1["schedule"]) == (
        200, 4e-4, "radam", "cosine")
    assert tiny_l1["recon_alpha"] == 1e4
    # The original L1 recipe's optimiser eps (PyTorch's default, and TrainConfig's, is 1e-8).
    large_v3_l1 = yaml.safe_load((REPO / "configs/train/large_v3_l1.yaml").read_text())["config"]
    assert tiny_l1["optimiser_eps"] == 1e-5 and large_v3_l1["optimiser_eps"] == 1e-5


def test_asset_config_derives_from_train_config_with_the_demo_defaults():
    from freud_pipeline.defs.sae import SaeAssetConfig, run_config
    from freud_pipeline.sae import demo_config
    from freud_pipeline.sae.run import SaeRunConfig

    assert set(TrainConfig.model_fields) <= set(SaeRunConfig.model_fields)
    assert set(SaeRunConfig.model_fields) - {"model_name"} <= set(SaeAssetConfig.model_fields)
    # One set of defaults: the asset trains demo_config() (what make demo trains) unless told otherwise.
    assert run_config(SaeAssetConfig(), "tiny.en").train_config() == demo_config()
    assert run_config(SaeAssetConfig(), "tiny.en").thresholds() == QualityThresholds()
    with pytest.raises(ValueError):  # validated through TrainConfig
        run_config(SaeAssetConfig(architecture="gated"), "tiny.en")


# --- checkpoint format vs SAELens conventions (docs/SAE_FORMAT.md) -----------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "l1"])
def test_checkpoint_follows_saelens_tensor_conventions(arch, tmp_path):
    """SAELens: sae_weights.safetensors with W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    (JumpReLU adds threshold [d_sae]); encode is act((x - b_dec) @ W_enc + b_enc) when apply_b_dec_to_input, decode
    is f @ W_dec + b_dec; cfg.json holds architecture (topk | standard | jumprelu), d_in, d_sae, dtype,
    normalize_activations ("none": weights take raw activations), hook_name, model_name, and k for topk.
    tests/test_sae_interop.py loads trained checkpoints with the real sae-lens; this test needs no sae-lens."""
    torch.manual_seed(0)
    kwargs = {"k": 4} if arch != "l1" else {}
    sae = ARCHITECTURES[arch](16, 64, **kwargs)
    with torch.no_grad():
        for p in sae.parameters():
            if p.dim() == 1:
                p.normal_()
    if arch == "batchtopk":
        sae.threshold.fill_(0.5)
    sae.after_optimizer_step()  # unit decoder rows (columns for the tied L1), as every trained checkpoint has
    sae.metadata = {"hook_name": "encoder.blocks.2", "model_name": "tiny.en"}
    directory = save_checkpoint(sae.eval(), tmp_path / arch)
    assert sorted(p.name for p in directory.iterdir()) == ["cfg.json", "sae_weights.safetensors"]

    cfg = json.loads((directory / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (16, 64, "float32", "none")
    assert cfg["hook_name"] == "encoder.blocks.2" and cfg["model_name"] == "tiny.en"
    assert cfg["apply_b_dec_to_input"] is True and cfg["reshape_activations"] == "none"
    assert cfg["architecture"] == {"topk": "topk", "l1": "standard", "batchtopk": "jumprelu"}[arch]
    assert cfg["freud_architecture"] == arch and (cfg["k"] == 4 if arch != "l1" else cfg["k"] is None)

    with safe_open(str(directory / "sae_weights.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    expected = {"W_enc": (16, 64), "b_enc": (64,), "W_dec": (64, 16), "b_dec": (16,)}
    if arch == "batchtopk":
        expected["threshold"] = (64,)  # JumpReLU's per-latent threshold, one value for all
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in tensors.values())

    # The SAELens forward, written from its documented equations, reproduces ours from the file alone.
    x = torch.randn(32, 16)
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    if arch == "topk":
        values, index = pre.topk(4, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, index, values)
    elif arch == "batchtopk":  # inference: JumpReLU with one threshold for every latent
        assert bool((tensors["threshold"] == 0.5).all())
        latents = pre * (pre > tensors["threshold"])
    else:  # tied L1: b_dec is stored as zeros, so it is SAELens' "standard" SAE
        assert torch.count_nonzero(tensors["b_dec"]) == 0
        latents = pre
    x_hat = latents @ tensors["W_dec"] + tensors["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(latents, sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_hat, sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    if arch != "l1":
        torch.testing.assert_close(tensors["W_dec"].norm(dim=1), torch.ones(64))  # unit decoder rows
