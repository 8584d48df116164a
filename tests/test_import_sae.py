"""`freud import-sae` and the original FREUD's JSON configs (freud_pipeline/sae/importing.py, cli/legacy_config.py).

(a) SAELens: checkpoints written by the real sae-lens (`SAE.save_model`, in a subprocess as in
tests/test_sae_interop.py) imported: the same latents and reconstructions as SAELens' own `encode`/`decode` on real
tiny.en activations; the CLI registers the import as an MLflow model version with its provenance (a real sqlite
store) and builds its feature set over those activations (collected with the pipeline's own collector from a few
Asterisk prompts laid out as the default corpus).
(b) dictionary_learning: its real classes need nnsight, which the venv lacks, so these checkpoints are built from its
documented layout: `ae.pt` (the state dict, tensor names and shapes of dictionary_learning 0.1.0's
AutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder) + `config.json` ({"trainer":
{dict_class, activation_dim, dict_size, k, layer, lm_name, submodule_name}}); the latents must equal the library's
equations, written out here. (The real classes, loaded from the 0.1.0 wheel by hand, were checked to agree.)
(c) bad inputs: specific errors, nothing created. (d) the original's JSON configs: translated, their warnings,
`freud collect --dry-run`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from freud_pipeline.cli import main

try:
    from test_app import _see, dash_duo  # the browser fixture (Debian chromium + chromedriver) and its checks
except ImportError:  # tests collected as a package
    from tests.test_app import _see, dash_duo

__all__ = ["dash_duo"]  # a fixture: used by name
from freud_pipeline.cli.legacy_config import read_run_config, translate
from freud_pipeline.errors import HookError
from freud_pipeline.sae import load_checkpoint
from freud_pipeline.sae.checkpoint import CFG_FILE, WEIGHTS_FILE, CheckpointError
from freud_pipeline.sae.importing import (
    CheckpointShapeError,
    UnknownLayoutError,
    read_foreign_checkpoint,
    whisper_hook,
)

try:
    from conftest import require_extra
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra

REPO = Path(__file__).resolve().parents[1]
SAE_LENS_DIR = REPO / ".venv" / "extras" / "sae_lens"
HOOK, MODEL, D_IN = "encoder.blocks.2", "tiny.en", 384
N_CLIPS = 5

# Runs in a subprocess with sae-lens on sys.path: writes SAEs as SAELens saves them, and their latents of the frames.
SAELENS_SCRIPT = """
import json, sys
sys.path.append(sys.argv[1])
import torch
torch.set_num_threads(1)
import sae_lens
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file

out, x = sys.argv[2], load_file(sys.argv[3])["x"]
torch.manual_seed(0)
meta = lambda: SAEMetadata(hook_name="encoder.blocks.2", model_name="tiny.en")
saes = {
    "topk": sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=384, d_sae=512, k=8, rescale_acts_by_decoder_norm=True,
                                                    metadata=meta())),
    "standard": sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=384, d_sae=512, apply_b_dec_to_input=False,
                                                                metadata=meta())),
    "tied": sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=384, d_sae=512, metadata=meta())),
    "jumprelu": sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=384, d_sae=512, metadata=meta())),
}
results = {}
with torch.no_grad():
    for name, sae in saes.items():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (0.01 if p.dim() == 1 else 0))
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1) + 0.5)  # decoder norms != 1
        if name == "tied":  # our L1 as SAELens sees it: one unit-norm matrix both ways, no decoder bias
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_dec.zero_()
        if name == "jumprelu":
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.3)
        sae.save_model(f"{out}/{name}")
        loaded = sae_lens.SAE.load_from_disk(f"{out}/{name}")
        latents = loaded.encode(x)
        results[name + ".latents"], results[name + ".x_hat"] = latents.contiguous(), loaded.decode(latents).contiguous()
save_file(results, f"{out}/outputs.safetensors")
print(json.dumps({"version": sae_lens.__version__}))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A data directory laid out as the pipeline's: a few Asterisk prompts as the default corpus, their tiny.en
    encoder.blocks.2 activations collected by the pipeline's collector into its `test` partition."""
    from freud_pipeline.activations.collect import collect_activations
    from freud_pipeline.activations.reader import ActivationReader
    from freud_pipeline.audio.datasets.asterisk import build_asterisk_prompts
    from freud_pipeline.audio.datasets.manifest import load_manifest

    root = tmp_path_factory.mktemp("import-data")
    build = build_asterisk_prompts(root / "datasets" / "default_corpus", limit=N_CLIPS, align=False, data_root=root)
    manifest = load_manifest(build.manifest_path)
    shards = root / "activations" / MODEL / "default_corpus" / "test"
    collect_activations(manifest, shards, model=MODEL, hooks=[HOOK], data_root=root, batch_size=2, device="cpu",
                        fidelity_sample=0)
    clips = dict(ActivationReader(shards).iter_clips(HOOK, dtype="float32"))
    frames = torch.from_numpy(np.concatenate(list(clips.values())))
    return {"root": root, "clips": clips, "frames": frames, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "index_uri": str(root / "lancedb")}


@pytest.fixture(scope="module")
def saelens(corpus, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(directory of SAELens-written checkpoints, SAELens' latents and reconstructions of the corpus frames)."""
    require_extra((SAE_LENS_DIR / "sae_lens").is_dir(), f"sae-lens in {SAE_LENS_DIR}")
    out = tmp_path_factory.mktemp("saelens-written")
    save_file({"x": corpus["frames"].contiguous()}, out / "x.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", SAELENS_SCRIPT, str(SAE_LENS_DIR), str(out), str(out / "x.safetensors")],
        capture_output=True, text=True, timeout=600, env=env, cwd=out)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, load_file(out / "outputs.safetensors")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _import_args(corpus) -> list[str]:
    return ["--data-dir", corpus["root"], "--tracking-uri", corpus["tracking_uri"], "--index-uri", corpus["index_uri"]]


# --- (a) SAELens -------------------------------------------------------------------------------------------------


def test_saelens_topk_imports_registers_and_is_indexed(corpus, saelens, capsys):
    from freud_pipeline.features import FeatureIndex
    from freud_pipeline.digests import file_sha256 as _sha256
    from freud_pipeline.validation import check_feature_set

    written, outputs = saelens
    source = written / "topk"
    code, out, err = _cli(capsys, "import-sae", source, *_import_args(corpus), "--json")
    assert code == 0, err
    got = json.loads(out)
    assert (got["layout"], got["source_architecture"], got["architecture"]) == ("saelens", "topk", "topk")
    assert (got["hook"], got["model"], got["d_sae"], got["n_features"], got["n_clips"]) == (HOOK, MODEL, 512, 512,
                                                                                           N_CLIPS)
    # Our run directory: complete (renamed from .partial), its weights those the feature set records.
    run_dir = Path(got["checkpoint_dir"])
    assert run_dir == corpus["root"] / "sae" / f"{MODEL}-{HOOK}-imported" / got["run_id"]
    assert run_dir.is_dir() and not any(p.name.endswith(".partial") for p in run_dir.parent.iterdir())
    ours = load_checkpoint(run_dir)
    with torch.no_grad():
        latents = ours.encode(corpus["frames"])
        x_hat = ours.decode(latents)
    assert ((latents != 0).sum(-1) == 8).all()
    torch.testing.assert_close(latents, outputs["topk.latents"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_hat, outputs["topk.x_hat"], rtol=1e-4, atol=1e-4)

    # MLflow: a model version of freud-sae.tiny_en.encoder_blocks_2.imported with the provenance.
    client = MlflowClient(corpus["tracking_uri"])
    assert got["registered_model"] == "freud-sae.tiny_en.encoder_blocks_2.imported"
    version = client.get_model_version(got["registered_model"], got["model_version"])
    tags = version.tags
    assert version.run_id == got["run_id"] and version.source == f"runs:/{got['run_id']}/checkpoint"
    assert tags["freud.import.layout"] == "saelens" and tags["freud.import.source"] == str(source.resolve())
    assert tags["freud.import.source_sha256"] == _sha256(source / WEIGHTS_FILE)
    assert json.loads(tags["freud.import.source_cfg"]) == json.loads((source / CFG_FILE).read_text())
    assert tags["checkpoint_sha256"] == got["sha256"] and tags["checkpoint_dir"] == str(run_dir)
    run = client.get_run(got["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["freud.import.source_architecture"] == "topk"
    assert sorted(a.path for a in client.list_artifacts(got["run_id"], "checkpoint")) == [
        f"checkpoint/{CFG_FILE}", f"checkpoint/{WEIGHTS_FILE}"]
    assert client.get_registered_model(got["registered_model"]).aliases == {}  # nothing measured: no champion

    # The feature set: complete, and its top clip of a latent is the clip where the SAE fires most.
    assert check_feature_set(corpus["index_uri"], got["set_id"], 512).passed
    index = FeatureIndex(corpus["index_uri"], read_consistency_interval=0)
    row = next(r for r in index.sets() if r["set_id"] == got["set_id"])
    assert (row["kind"], row["hook"], row["model"]) == ("sae", HOOK, MODEL)
    with torch.no_grad():
        peaks = {clip: ours.encode(torch.from_numpy(a)).max(0).values.numpy() for clip, a in corpus["clips"].items()}
    feature = int(np.stack(list(peaks.values())).max(0).argmax())
    best = max(peaks, key=lambda clip: peaks[clip][feature])
    assert index.top_examples(got["set_id"], feature, n=1)[0]["clip_id"] == best


@pytest.mark.parametrize("name, architecture", [("standard", "jumprelu"), ("tied", "l1"), ("jumprelu", "jumprelu")])
def test_saelens_architectures_map_onto_ours_exactly(name, architecture, corpus, saelens):
    written, outputs = saelens
    sae, provenance = read_foreign_checkpoint(written / name)
    assert (sae.architecture, provenance["hook"], provenance["model"]) == (architecture, HOOK, MODEL)
    with torch.no_grad():
        latents = sae.encode(corpus["frames"])
        x_hat = sae.decode(latents)
    assert latents.count_nonzero() > 0
    torch.testing.assert_close(latents, outputs[f"{name}.latents"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_hat, outputs[f"{name}.x_hat"], rtol=1e-4, atol=1e-4)


# --- (b) dictionary_learning --------------------------------------------------------------------------------------

D_SAE = 512


def _dictionary_learning(directory: Path, dict_class: str, state: dict, k: int | None = None) -> Path:
    directory.mkdir(parents=True)
    torch.save(state, directory / "ae.pt")
    trainer = {"dict_class": dict_class, "trainer_class": "Trainer", "activation_dim": D_IN, "dict_size": D_SAE,
               "k": k, "layer": 2, "lm_name": "openai/whisper-tiny.en", "submodule_name": "resid_post_layer_2"}
    (directory / "config.json").write_text(json.dumps({"trainer": trainer}, indent=4))
    return directory


def _states() -> dict[str, tuple[dict, int | None]]:
    g = torch.Generator().manual_seed(1)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    linear = {"encoder.weight": r(D_SAE, D_IN), "encoder.bias": r(D_SAE), "decoder.weight": r(D_IN, D_SAE, scale=0.1)}
    free = {"W_enc": r(D_IN, D_SAE), "b_enc": r(D_SAE), "W_dec": r(D_SAE, D_IN), "b_dec": r(D_IN)}
    return {
        "AutoEncoder": ({**linear, "bias": r(D_IN)}, None),
        "AutoEncoderTopK": ({**linear, "b_dec": r(D_IN), "k": torch.tensor(8, dtype=torch.int),
                             "threshold": torch.tensor(-1.0)}, 8),
        "BatchTopKSAE": ({**linear, "b_dec": r(D_IN), "k": torch.tensor(8, dtype=torch.int),
                          "threshold": torch.tensor(-1.0)}, 8),  # never estimated: every positive latent
        "MatryoshkaBatchTopKSAE": ({**free, "k": torch.tensor(8, dtype=torch.int), "threshold": torch.tensor(0.2),
                                    "group_sizes": torch.tensor([64, 192, 256])}, 8),
        "JumpReluAutoEncoder": ({**free, "threshold": torch.rand(D_SAE, generator=g) * 0.3}, None),
    }


def _library_equations(dict_class: str, s: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning 0.1.0's encode and decode of each class, as `utils.load_dictionary` loads it."""
    if dict_class == "AutoEncoder":  # from_pretrained(normalize_decoder=True): columns to unit norm, folded
        norms = s["decoder.weight"].norm(dim=0)
        f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"]) * norms
        return f, (f / norms) @ s["decoder.weight"].T + s["bias"]
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        if dict_class == "AutoEncoderTopK":
            top = post.topk(int(s["k"]), dim=-1)
            f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
        else:
            f = post * (post > s["threshold"])
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
    else:  # JumpReluAutoEncoder: apply_b_dec_to_input False
        pre = x @ s["W_enc"] + s["b_enc"]
        f = torch.relu(pre * (pre > s["threshold"]))
    return f, f @ s["W_dec"] + s["b_dec"]


@pytest.mark.parametrize("dict_class, architecture", [
    ("AutoEncoder", "jumprelu"), ("AutoEncoderTopK", "topk"), ("BatchTopKSAE", "batchtopk"),
    ("MatryoshkaBatchTopKSAE", "matryoshka_batchtopk"), ("JumpReluAutoEncoder", "jumprelu")])
def test_dictionary_learning_layout_maps_onto_ours_exactly(dict_class, architecture, corpus, tmp_path):
    state, k = _states()[dict_class]
    directory = _dictionary_learning(tmp_path / dict_class, dict_class, state, k)
    sae, provenance = read_foreign_checkpoint(directory / "ae.pt")  # the weights file or its directory
    assert (sae.architecture, provenance["layout"], provenance["source_architecture"]) == (
        architecture, "dictionary_learning", dict_class)
    assert (provenance["hook"], provenance["model"]) == (HOOK, MODEL)  # resid_post_layer_2, openai/whisper-tiny.en
    if architecture == "matryoshka_batchtopk":
        assert sae.matryoshka_prefixes == [64, 256, 512]
    x = corpus["frames"]
    want, want_x_hat = _library_equations(dict_class, state, x)
    with torch.no_grad():
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
    assert want.count_nonzero() > 0
    torch.testing.assert_close(latents, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_hat, want_x_hat, rtol=1e-4, atol=1e-4)


def test_dictionary_learning_import_is_registered_with_its_provenance(corpus, tmp_path, capsys):
    state, _ = _states()["JumpReluAutoEncoder"]
    directory = _dictionary_learning(tmp_path / "jr", "JumpReluAutoEncoder", state)
    code, out, err = _cli(capsys, "import-sae", directory, *_import_args(corpus), "--no-index", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["set_id"] is None and got["architecture"] == "jumprelu"
    tags = MlflowClient(corpus["tracking_uri"]).get_model_version(got["registered_model"], got["model_version"]).tags
    assert (tags["freud.import.layout"], tags["freud.import.source_architecture"]) == (
        "dictionary_learning", "JumpReluAutoEncoder")
    assert json.loads(tags["freud.import.source_cfg"])["submodule_name"] == "resid_post_layer_2"


def test_original_freud_pth_imports_with_its_placement(corpus, tmp_path):
    from freud_pipeline.sae import load_original_freud_checkpoint

    n, g = 256, torch.Generator().manual_seed(2)
    state = {"encoder.weight": torch.randn(n, D_IN, generator=g) * 0.05, "encoder.bias": torch.zeros(n),
             "W_dec": torch.randn(n, D_IN, generator=g) * 0.05, "b_dec": torch.zeros(D_IN)}
    torch.save({"model": state, "step": 7, "hparams": {
        "autoencoder_variant": "topk", "autoencoder_config": {"k": 6}, "activation_size": D_IN,
        "whisper_config": {"model": "tiny", "layer_name": HOOK}}}, tmp_path / "bestval.pth")
    # The original trained on multilingual tiny; here its activations are tiny.en's, hence --model.
    sae, provenance = read_foreign_checkpoint(tmp_path / "bestval.pth", model=MODEL)
    assert (provenance["layout"], provenance["source_model"], provenance["model"], provenance["hook"]) == (
        "original_freud", "tiny", MODEL, HOOK)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(corpus["frames"]),
                                   load_original_freud_checkpoint(tmp_path / "bestval.pth").encode(corpus["frames"]))


# --- (c) bad inputs ----------------------------------------------------------------------------------------------


def _saelens_layout(directory: Path, cfg: dict, tensors: dict) -> Path:
    """A checkpoint in SAELens' documented layout, written without SAELens."""
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / WEIGHTS_FILE)
    (directory / CFG_FILE).write_text(json.dumps(cfg))
    return directory


def _standard(d_in: int, d_sae: int, **cfg) -> tuple[dict, dict]:
    tensors = {"W_enc": torch.randn(d_in, d_sae), "b_enc": torch.zeros(d_sae), "W_dec": torch.randn(d_sae, d_in),
               "b_dec": torch.zeros(d_in)}
    metadata = {"hook_name": HOOK, "model_name": MODEL}
    return {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "metadata": metadata, **cfg}, tensors


def test_bad_checkpoints_are_specific_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_foreign_checkpoint(tmp_path / "nothing-here")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an SAE")
    with pytest.raises(UnknownLayoutError, match="SAELens .* dictionary_learning"):
        read_foreign_checkpoint(tmp_path / "notes")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / CFG_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE} is missing"):
        read_foreign_checkpoint(tmp_path / "half")

    cfg, tensors = _standard(D_IN, 64)
    tensors["W_dec"] = torch.randn(60, D_IN)
    with pytest.raises(CheckpointShapeError, match=r"W_dec is \(60, 384\), expected \(64, 384\)"):
        read_foreign_checkpoint(_saelens_layout(tmp_path / "shape", cfg, tensors))
    with pytest.raises(HookError, match="100-wide activations, but tiny.en encoder.blocks.2 is 384 wide"):
        read_foreign_checkpoint(_saelens_layout(tmp_path / "narrow", *_standard(100, 64)))
    cfg, tensors = _standard(D_IN, 64, architecture="gated")
    with pytest.raises(CheckpointError, match="'gated' has no equivalent"):
        read_foreign_checkpoint(_saelens_layout(tmp_path / "gated", cfg, tensors))
    cfg, tensors = _standard(D_IN, 64, normalize_activations="expected_average_only_in")
    with pytest.raises(CheckpointError, match="normalize_activations"):
        read_foreign_checkpoint(_saelens_layout(tmp_path / "scaled", cfg, tensors))

    # A hook name of another library: --hook says which of ours it is.
    cfg, tensors = _standard(D_IN, 64)
    cfg["metadata"]["hook_name"] = "blocks.2.hook_resid_post"
    directory = _saelens_layout(tmp_path / "lm-hook", cfg, tensors)
    with pytest.raises(HookError, match="pass --hook"):
        read_foreign_checkpoint(directory)
    assert read_foreign_checkpoint(directory, hook="encoder.blocks.1")[1]["hook"] == "encoder.blocks.1"
    assert (whisper_hook("model.encoder.layers.3"), whisper_hook("model.encoder.layers[3].fc1"),
            whisper_hook("encoder.layer_norm"), whisper_hook("resid_post_layer_5")) == (
        "encoder.blocks.3", "encoder.blocks.3.mlp.0", "encoder.ln_post", "encoder.blocks.5")


def test_cli_refuses_before_creating_anything(corpus, tmp_path, capsys):
    root = tmp_path / "data"
    args = ["--data-dir", root, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    code, out, err = _cli(capsys, "import-sae", tmp_path / "missing", *args)
    assert code == 2 and out == "" and err.startswith("freud: error:") and "no such file" in err
    # Activations of the hook were never collected: one line naming what collects them, and nothing written.
    source = _saelens_layout(tmp_path / "sae", *_standard(D_IN, 64))
    code, out, err = _cli(capsys, "import-sae", source, *args)
    assert code == 2 and "freud collect --config configs/features/default_block_2_" in err
    assert not (root / "sae").exists() and not (tmp_path / "mlflow.db").exists()


# --- (d) the original's JSON configs ------------------------------------------------------------------------------

EXPECTED_COLLECTION = {"asset": "activations", "partition": "train", "config": {
    # the default corpus' partition keeps the hooks the default pipeline reads from it (mlp.1: the neuron index)
    "model": "tiny.en", "hooks": ["encoder.blocks.2", "encoder.blocks.2.mlp.1"], "batch_size": 2, "device": "cpu"}}
EXPECTED_TRAIN = {"asset": "topk_sae", "config": {
    "architecture": "topk", "hook": "encoder.blocks.2", "model": "tiny.en", "train_split": "train",
    "eval_split": "dev", "expansion_factor": 16, "k": 64, "auxk_alpha": 0.03125, "dead_after_frames": 100000,
    "lr": 0.001, "optimiser": "adam", "schedule": "cosine", "warmup_steps": 0, "steps": 800, "weight_decay": 0.0,
    "grad_clip": 1.0, "seed": 0, "eval_every": 400, "log_every": 5, "checkpoint_every": 400, "batch_size": 3000,
    "device": "cpu"}}


def test_shipped_original_configs_translate_to_default_corpus_configs():
    run, translation = read_run_config(REPO / "configs" / "features" / "original_tiny_block_2.json")
    assert run == EXPECTED_COLLECTION and translation.kind == "collection"
    assert [w.split()[0] for w in translation.warnings] == ["'out_folder'", "'dl_max_workers'"]
    run, translation = read_run_config(REPO / "configs" / "train" / "original_tiny_topk.json")
    assert run == EXPECTED_TRAIN and translation.kind == "training"
    assert [w.split()[0] for w in translation.warnings] == ["'run_dir'", "'dl_max_workers'"]
    assert yaml.safe_load(translation.yaml()) == EXPECTED_TRAIN  # the printed YAML is the same run config
    # Our own YAML configs pass through untranslated.
    assert read_run_config(REPO / "configs" / "train" / "demo_topk.yaml")[1] is None


def test_original_configs_match_the_hand_ported_yaml_and_name_what_has_no_equivalent():
    original = {  # the original tool's tiny_topk training config (freud-behaviours.md, "Training configs")
        "seed": 0, "train_folder": "activations/tiny_block_2/LibriSpeech/train-other-500",
        "val_folder": "activations/tiny_block_2/LibriSpeech/dev-other", "device": "cuda", "run_dir": "runs/tiny_topk",
        "lr": 1e-4, "weight_decay": 0.0, "steps": 100000, "clip_thresh": 1.0, "batch_size": 50, "dl_max_workers": 8,
        "log_tb_every": 100, "save_every": 10000, "val_every": 5000, "start_checkpoint": None,
        "whisper_config": {"model": "tiny", "layer_name": "encoder.blocks.2"}, "optimizer": "adam",
        "scheduler": "linear", "scheduler_params": {"num_warmup_steps": 1000}, "from_disk": True,
        "autoencoder_variant": "topk", "autoencoder_config": {"expansion_factor": 16, "n_dict_components": 0,
                                                             "normalize_decoder": True, "k": 32, "multi_topk": True,
                                                             "auxk_alpha": 0.03125, "dead_feature_threshold": 1000000},
        "tensorboard": True,
    }
    translation = translate(original)
    ported = yaml.safe_load((REPO / "configs" / "train" / "tiny_topk.yaml").read_text())
    assert translation.run["config"] == {**ported["config"], "device": "cuda"}  # the port chose device auto
    named = " | ".join(translation.warnings)
    for field in ("run_dir", "dl_max_workers", "multi_topk", "scheduler 'linear'", "'tensorboard' is not a field"):
        assert field in named
    latents = translate({"whisper_model": "tiny", "sae_model": "runs/tiny_topk/checkpoints/bestval.pth",
                         "layer_name": "encoder.blocks.2", "batch_size": 160, "device": "cuda",
                         "data_path": "audio_data/librispeech/LibriSpeech/test-other", "out_folder": "x"})
    assert latents.run == {"asset": "sae_latents", "config": {"dataset": "librispeech", "split": "test-other",
                                                              "checkpoint": "runs/tiny_topk/checkpoints/bestval.pth"}}
    assert any("'batch_size' has no equivalent for SAE latents" in w for w in latents.warnings)


def test_collect_dry_run_prints_the_translation_and_checks_it(tmp_path, capsys):
    path = REPO / "configs" / "features" / "original_tiny_block_2.json"
    code, out, err = _cli(capsys, "collect", "--config", path, "--dry-run")
    assert code == 0, err
    *printed, last = out.strip().splitlines()
    assert yaml.safe_load("\n".join(printed)) == EXPECTED_COLLECTION and "dry run: nothing materialised" in last
    assert "freud: warning:" in err and "'out_folder' has no equivalent" in err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"whisper_model": "tiny.en", "layer_name": HOOK, "data_path": "somewhere/else"}))
    code, out, err = _cli(capsys, "collect", "--config", bad, "--dry-run")
    assert code == 2 and "data_path 'somewhere/else' names no dataset" in err
    gated = tmp_path / "gated.json"
    gated.write_text(json.dumps({**json.loads((REPO / "configs" / "train" / "original_tiny_topk.json").read_text()),
                                 "autoencoder_variant": "gated"}))
    code, out, err = _cli(capsys, "collect", "--config", gated, "--dry-run")
    assert code == 2 and "config not accepted" in err and "architecture" in err


def test_an_imported_jumprelu_sae_is_browsed_in_the_app(corpus, saelens, capsys, dash_duo):
    """A JumpReLU SAE written by the real SAELens, imported and indexed, is a feature set like any other in the
    app: the search page of its strongest latent shows its top clips, with its architecture on the set's label."""
    from dash_app import create_app
    from freud_pipeline.features import FeatureIndex

    written, _ = saelens
    code, out, err = _cli(capsys, "import-sae", written / "jumprelu", *_import_args(corpus), "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["architecture"] == "jumprelu" and got["set_id"]
    index = FeatureIndex(corpus["index_uri"], read_consistency_interval=0)
    ours = load_checkpoint(Path(got["checkpoint_dir"]))
    with torch.no_grad():
        peaks = np.stack([ours.encode(torch.from_numpy(a)).max(0).values.numpy() for a in corpus["clips"].values()])
    feature = int(peaks.max(0).argmax())
    dash_duo.start_server(create_app(index, data_dir=str(corpus["root"]), mlflow_uri=corpus["tracking_uri"]))
    dash_duo.driver.get(dash_duo.server_url + f"/search?set={got['set_id']}&index={feature}&n=3")
    dash_duo.wait_for_element("#result-0 .clip-graph .js-plotly-plot", timeout=60)
    assert dash_duo.find_element("#feature-card .card-title").text.startswith(f"Feature {feature}")
    assert dash_duo.find_element("#result-0 .clip-id").text == index.top_examples(got["set_id"], feature, n=1)[0][
        "clip_id"]
    _see(dash_duo, "search-imported-jumprelu", "#clip-graph-0")
