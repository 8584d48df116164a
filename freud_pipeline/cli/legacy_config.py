"""The original FREUD's JSON configs, accepted as they are by `freud collect --config` (e.g. its collection configs).

The original tool (ksadov/freud) read `configs/features/*.json` (`python -m src.scripts.collect_activations`) and
`configs/train/*.json` (`python -m src.scripts.train_sae`, whose keyword arguments they are). `translate` maps one
onto our run config ({asset, partition, config}: what configs/**/*.yaml hold) through the tables below, field by
field; a field with no equivalent here, or one the original's configs never had, is named in a warning and left
out (never an error). `read_run_config` reads either kind of file, so every command that takes a config file takes
both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from freud_pipeline.errors import FreudError

FRAMES_PER_FILE = 1500  # the original batched whole files, each one padded 30 s window of 1500 encoder frames

# Original field -> (what it becomes, how). None: no equivalent here (the note says why; a warning names it).
COLLECTION_FIELDS: dict[str, tuple[str | None, str]] = {
    "whisper_model": ("config.model", "the Whisper model (with sae_model: the checkpoint's own)"),
    "layer_name": ("config.hooks", "the one hook point, as a list (with sae_model: the checkpoint's own)"),
    "data_path": ("asset, partition", "the dataset and split the path names: .../<dataset>/<split> (a dataset of "
                                      "DATASET_ASSETS) or a LibriSpeech split directory"),
    "sae_model": ("asset sae_latents, config.checkpoint", "a checkpoint: collect its latents; empty: activations"),
    "batch_size": ("config.batch_size", "files, i.e. 30 s windows, per encoder pass"),
    "device": ("config.device", "cpu, cuda (cuda:N -> cuda) or auto"),
    "collect_max": ("config.collect_max", "the first N clips only"),
    "out_folder": (None, "activations always go to <data dir>/activations/<model>/<dataset>/<split>/"),
    "dl_max_workers": (None, "audio is decoded by a fixed pool of decoding threads"),
}
TRAIN_FIELDS: dict[str, tuple[str | None, str]] = {
    "seed": ("config.seed", ""),
    "train_folder": ("config.dataset, config.train_split", "parsed as data_path; the default corpus is the "
                                                           "`activations` asset (no dataset)"),
    "val_folder": ("config.eval_split", "a split of the same dataset"),
    "device": ("config.device", "cpu, cuda (cuda:N -> cuda) or auto"),
    "lr": ("config.lr", ""),
    "weight_decay": ("config.weight_decay", ""),
    "steps": ("config.steps", ""),
    "clip_thresh": ("config.grad_clip", ""),
    "batch_size": ("config.batch_size", f"files x {FRAMES_PER_FILE} frames (ours counts frames)"),
    "log_tb_every": ("config.log_every", "MLflow instead of TensorBoard"),
    "save_every": ("config.checkpoint_every", ""),
    "val_every": ("config.eval_every", ""),
    "whisper_config": ("config.model, config.hook", "{model, layer_name}"),
    "optimizer": ("config.optimiser", "adam | radam (radam with eps 1e-5, as the original's)"),
    "scheduler": ("config.schedule", "cosine (no warm-up) | linear -> linear-warmup"),
    "scheduler_params": ("config.warmup_steps", "num_warmup_steps"),
    "from_disk": ("(always)", "training always reads stored activations; false has no equivalent"),
    "autoencoder_variant": ("config.architecture", "l1 | topk (l1: l1_alpha 1, the original's L1 weight)"),
    "autoencoder_config": ("config.*", "see AUTOENCODER_FIELDS"),
    "start_checkpoint": (None, "a run resumes from its own checkpoints/step_* (config.resume_from), not a .pth"),
    "run_dir": (None, "runs go to <data dir>/sae/<model>-<hook>-<architecture>/<run id>/ and MLflow"),
    "dl_max_workers": (None, "frames are read from memory-mapped shards"),
}
AUTOENCODER_FIELDS: dict[str, tuple[str | None, str]] = {
    "expansion_factor": ("config.expansion_factor", ""),
    "n_dict_components": ("config.n_latents", "0: expansion_factor x d_in"),
    "k": ("config.k", ""),
    "auxk_alpha": ("config.auxk_alpha", ""),
    "dead_feature_threshold": ("config.dead_after_frames", ""),
    "recon_alpha": ("config.recon_alpha", ""),
    "normalize_decoder": ("(always)", "our TopK keeps unit-norm decoder rows; false has no equivalent"),
    "multi_topk": (None, "no Multi-TopK loss here; true has no equivalent"),
}
# A dataset named in a path -> its activations asset (the dataset's split is the asset's partition).
DATASET_ASSETS = {"default_corpus": "activations", "librispeech": "librispeech_activations",
                  "audioset": "audioset_activations", "esc50": "esc50_activations", "esc-50": "esc50_activations",
                  "audio_folder": "audio_folder_activations", "large_corpus": "large_corpus_activations"}
_SPLIT_ALIASES = {"val": "dev", "valid": "dev", "validation": "dev", "bal_train": "balanced_train"}


@dataclass
class Translation:
    """An original config as ours: the run config, what was left out (warnings), and where it came from."""

    kind: str  # "collection" | "training"
    run: dict
    warnings: list[str] = field(default_factory=list)
    source: str = ""

    def yaml(self) -> str:
        """The equivalent YAML config file, with a header naming the source and what was left out."""
        import yaml

        what = f"{self.kind} config {self.source}" if self.source else f"{self.kind} config"
        header = [f"# The original FREUD's {what}, as a FREUD run config"]
        header += [f"# warning: {w}" for w in self.warnings]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.run, sort_keys=False)


def is_original(data: Any) -> bool:
    """A mapping in the original's form: no `asset`, and fields of the original's configs."""
    return (isinstance(data, dict) and "asset" not in data
            and bool(set(data) & (set(COLLECTION_FIELDS) | set(TRAIN_FIELDS))))


def translate(data: dict, source: str = "") -> Translation:
    """Our run config for an original collection or training config (see the module doc)."""
    training = bool({"autoencoder_variant", "train_folder", "whisper_config"} & set(data))
    kind, fields = ("training", TRAIN_FIELDS) if training else ("collection", COLLECTION_FIELDS)
    warnings: list[str] = []
    for name, value in data.items():
        if name not in fields:
            warnings.append(f"{name!r} is not a field of the original's {kind} configs: ignored")
        elif fields[name][0] is None and value not in (None, "", False):
            warnings.append(f"{name!r} has no equivalent ({fields[name][1]}): ignored")
    run = _training(data, warnings) if training else _collection(data, warnings)
    return Translation(kind, run, warnings, source)


def dataset_split(path: Any, field_name: str = "data_path") -> tuple[str, str]:
    """(dataset, split) a data path names: the first part that is a dataset of DATASET_ASSETS (a LibriSpeech split
    directory alone means LibriSpeech) and the last part that is one of that dataset's splits."""
    from freud_pipeline.audio.datasets.librispeech import SPLITS as LIBRISPEECH_SPLITS
    from freud_pipeline.audio.datasets.manifest import SPLITS

    parts = [_SPLIT_ALIASES.get(p.lower(), p.lower()) for p in PurePosixPath(str(path or "").replace("\\", "/")).parts]
    dataset = next((p for p in parts if p in DATASET_ASSETS), None)
    if dataset is None and any(p in LIBRISPEECH_SPLITS for p in parts):
        dataset = "librispeech"
    dataset = "esc50" if dataset == "esc-50" else dataset
    splits = {"librispeech": LIBRISPEECH_SPLITS, "audioset": ("balanced_train", "eval")}.get(dataset, SPLITS)
    split = next((p for p in reversed(parts) if p in splits), None)
    if dataset is None or split is None:
        known = ", ".join(sorted(set(DATASET_ASSETS) - {"esc-50"}))
        raise FreudError(f"{field_name} {path!r} names no dataset and split FREUD collects: expected "
                         f".../<dataset>/<split> with a dataset of {known} (e.g. datasets/default_corpus/train) "
                         f"or a LibriSpeech split directory "
                         f"(e.g. LibriSpeech/test-other)")
    return dataset, split


def _device(value: Any, warnings: list[str]) -> str:
    text = str(value or "auto")
    if text.startswith("cuda"):
        return "cuda"
    if text not in ("cpu", "auto"):
        warnings.append(f"device {text!r} has no equivalent (cpu, cuda or auto): auto")
        return "auto"
    return text


def _collection(data: dict, warnings: list[str]) -> dict:
    dataset, split = dataset_split(data.get("data_path"))
    if data.get("sae_model"):
        for name in ("batch_size", "device", "collect_max"):
            if data.get(name) is not None:
                warnings.append(f"{name!r} has no equivalent for SAE latents (they are computed from the stored "
                                f"activations of the whole split): ignored")
        return {"asset": "sae_latents", "config": {"dataset": dataset, "split": split,
                                                   "checkpoint": str(data["sae_model"])}}
    config = {"model": str(data.get("whisper_model") or "tiny.en")}
    if data.get("layer_name"):
        config["hooks"] = [str(data["layer_name"])]
        if dataset == "default_corpus" and config["model"] == "tiny.en":
            # The partition is shared: keep the hooks the default pipeline reads from it (a re-collection with one
            # layer would leave the demo's neuron index without its hook).
            from freud_pipeline.defs.activations import ActivationsConfig

            defaults = list(ActivationsConfig.model_fields["hooks"].default)
            config["hooks"] = list(dict.fromkeys([*defaults, *config["hooks"]]))
    if data.get("batch_size") is not None:
        config["batch_size"] = int(data["batch_size"])
    config["device"] = _device(data.get("device"), warnings)
    if data.get("collect_max") is not None:
        config["collect_max"] = int(data["collect_max"])
    return {"asset": DATASET_ASSETS[dataset], "partition": split, "config": config}


def _training(data: dict, warnings: list[str]) -> dict:
    dataset, train_split = dataset_split(data.get("train_folder"), "train_folder")
    config: dict[str, Any] = {"architecture": str(data.get("autoencoder_variant") or "topk")}
    whisper = data.get("whisper_config") or {}
    if whisper.get("layer_name"):
        config["hook"] = str(whisper["layer_name"])
    if whisper.get("model"):
        config["model"] = str(whisper["model"])
    if dataset != "default_corpus":
        config["dataset"] = dataset
    config["train_split"] = train_split
    if data.get("val_folder"):
        eval_dataset, config["eval_split"] = dataset_split(data["val_folder"], "val_folder")
        if eval_dataset != dataset:
            warnings.append(f"val_folder is of {eval_dataset}, train_folder of {dataset}: evaluating on "
                            f"{dataset}'s {config['eval_split']} split")
    auto = data.get("autoencoder_config") or {}
    for name, value in auto.items():
        if name not in AUTOENCODER_FIELDS:
            warnings.append(f"autoencoder_config {name!r} is not a field of the original's: ignored")
    if auto.get("n_dict_components"):
        config["n_latents"] = int(auto["n_dict_components"])
    elif auto.get("expansion_factor") is not None:
        config["expansion_factor"] = int(auto["expansion_factor"])
    for name, ours, cast in (("k", "k", int), ("auxk_alpha", "auxk_alpha", float),
                             ("dead_feature_threshold", "dead_after_frames", int),
                             ("recon_alpha", "recon_alpha", float)):
        if auto.get(name) is not None:
            config[ours] = cast(auto[name])
    if auto.get("multi_topk"):
        warnings.append("autoencoder_config 'multi_topk' has no equivalent (no Multi-TopK loss here): ignored")
    if auto.get("normalize_decoder") is False:
        warnings.append("autoencoder_config 'normalize_decoder' false has no equivalent (our TopK keeps unit-norm "
                        "decoder rows): ignored")
    if config["architecture"] == "l1":
        config["l1_alpha"] = 1.0  # the original's loss: recon_alpha * MSE + 1 * mean L1
    for name, ours, cast in (("lr", "lr", float), ("optimizer", "optimiser", str)):
        if data.get(name) is not None:
            config[ours] = cast(data[name])
    if config.get("optimiser") == "radam":
        config["optimiser_eps"] = 1e-5  # the original's RAdam(eps=1e-5); its Adam kept PyTorch's default
    scheduler = data.get("scheduler")
    if scheduler == "cosine":
        config["schedule"], config["warmup_steps"] = "cosine", 0
    elif scheduler == "linear":
        config["schedule"] = "linear-warmup"
        config["warmup_steps"] = int((data.get("scheduler_params") or {}).get("num_warmup_steps", 0))
        warnings.append("scheduler 'linear' decayed to 0 after its warm-up in the original; linear-warmup keeps the "
                        "rate constant after it (no linear decay here)")
    elif scheduler is not None:
        warnings.append(f"scheduler {scheduler!r} has no equivalent (cosine or linear): the default schedule")
    for name, ours in (("steps", "steps"), ("weight_decay", "weight_decay"), ("clip_thresh", "grad_clip"),
                       ("seed", "seed"), ("val_every", "eval_every"), ("log_tb_every", "log_every"),
                       ("save_every", "checkpoint_every")):
        if data.get(name) is not None:
            config[ours] = float(data[name]) if name in ("weight_decay", "clip_thresh") else int(data[name])
    if data.get("batch_size") is not None:
        config["batch_size"] = int(data["batch_size"]) * FRAMES_PER_FILE
    config["device"] = _device(data.get("device"), warnings)
    if data.get("from_disk") is False:
        warnings.append("'from_disk' false has no equivalent (training always reads stored activations): ignored")
    return {"asset": "topk_sae", "config": config}


def read_run_config(path: str | Path) -> tuple[dict, Translation | None]:
    """A run config file of either form: (ours, None) for a YAML/JSON run config, (translated, its Translation)
    for an original FREUD config. Errors as `validation.load_run_config`'s."""
    import yaml

    from freud_pipeline import validation

    try:
        data = yaml.safe_load(Path(path).read_text())  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        data = None  # load_run_config names the problem
    if is_original(data):
        translation = translate(data, str(path))
        return translation.run, translation
    return validation.load_run_config(path), None
