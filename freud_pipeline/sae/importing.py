"""Someone else's SAE as one of ours: `freud import-sae PATH` (read, map exactly, register, index).

`read_foreign_checkpoint` reads one of three layouts (`detect_layout`) and maps it onto one of our architectures:

- **saelens**: a directory with `cfg.json` + `sae_weights.safetensors` as SAELens' `save_model` writes them (SAELens
  6's `metadata` block, or the flat pre-6 cfg). `topk` -> TopK (`rescale_acts_by_decoder_norm`: the decoder norms
  are folded into the encoder, the latents stay SAELens'); `jumprelu` (and `batchtopk` / `matryoshka_batchtopk`
  saved with their threshold) -> JumpReLU; `standard` (ReLU) -> our tied L1 when it is one (W_enc = W_decᵀ with
  unit-norm columns, b_dec = 0: how we export L1), else JumpReLU with zero thresholds, which is ReLU exactly.
  `apply_b_dec_to_input: false` is folded into b_enc. A cfg.json with `freud_architecture` is ours: loaded as is.
- **dictionary_learning** (saprmarks/dictionary_learning, read from its source, version 0.1.0): a directory with
  `ae.pt` (the state dict) + `config.json`, whose "trainer" names `dict_class`:
  AutoEncoder (ReLU: `encoder.weight` [dict, act], `encoder.bias`, `decoder.weight` [act, dict], `bias` = b_dec;
  decoder columns normalised as the library's `load_dictionary` does), AutoEncoderTopK (`encoder.*`,
  `decoder.weight`, `b_dec`, buffer `k`), BatchTopKSAE (the same + scalar `threshold`, < 0 when never set: ReLU),
  MatryoshkaBatchTopKSAE (`W_enc` [act, dict], `b_enc`, `W_dec` [dict, act], `b_dec`, `k`, `threshold`,
  `group_sizes` -> our prefixes), JumpReluAutoEncoder (`W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold` [dict]; it
  does not subtract b_dec from the input: folded into b_enc).
- **original_freud**: the original FREUD's `.pth` (`checkpoint.load_original_freud_checkpoint`).

Every mapping is checked on random probe inputs against the source's own equations (`reference_encode`): an SAE
our classes cannot represent exactly is refused, never approximated.

Placement: the Whisper hook comes from the cfg (SAELens `hook_name`; dictionary_learning `submodule_name`; our
names, HF's `model.encoder.layers.N` (= `encoder.blocks.N`, also `.fc1`/`.fc2` = `.mlp.0`/`.mlp.2`) and
`resid_post_layer_N`), the model from `model_name` / `lm_name` (`openai/whisper-tiny.en` = `tiny.en`); `hook` /
`model` override them, and an unknown one is a HookError / ModelError naming the option. d_in must equal the hook's
width.

`import_sae` writes the SAE as our own immutable run directory `<runs_dir>/<model>-<hook>-imported/<run id>/`
(written as `<run id>.partial/`, renamed when complete, as `sae.run` does; retention never prunes it), logs an
MLflow run in "freud-sae" and registers its checkpoint as a version of `freud-sae.<model>.<hook>.imported`, both
tagged with the provenance (`freud.import.*`: source path, layout, sha256 of the source's weights file, its
architecture and cfg); nothing measured its quality, so it is never promoted. `index_imported_sae` builds its
feature set over the default corpus' activations of the hook.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from freud_pipeline.digests import file_sha256
from freud_pipeline.errors import DatasetUnavailableError, HookError, ModelError
from freud_pipeline.sae.base import SparseAutoencoder
from freud_pipeline.sae.checkpoint import (
    CFG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    load_original_freud_checkpoint,
    save_checkpoint,
)

LAYOUTS = ("saelens", "dictionary_learning", "original_freud")
DL_WEIGHTS, DL_CONFIG = "ae.pt", "config.json"  # dictionary_learning's file names
REGISTERED_SUFFIX = "imported"  # freud-sae.<model>.<hook>.imported
TAG = "freud.import."  # provenance tags of the MLflow run and the model version
_TAG_MAX = 4000  # MLflow keeps 5000 characters of a model version tag; the full cfg is an artifact too
_SAELENS_KINDS = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu",
                  "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
_DL_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder")


class UnknownLayoutError(CheckpointError):
    """A path that holds no SAE checkpoint of a layout `freud import-sae` reads."""


class CheckpointShapeError(CheckpointError):
    """A tensor's shape disagrees with the checkpoint's config or with the other tensors."""


@dataclass
class Equations:
    """A foreign SAE as its own equations: pre = (x - b_dec if subtract_b_dec else x) @ W_enc + b_enc (times the
    decoder row norms if rescale); topk: k largest of ReLU(pre); relu: ReLU(pre); jumprelu / batchtopk /
    matryoshka: ReLU(pre) · (pre > threshold); x_hat = f @ W_dec (f / norms if rescale) + b_dec."""

    kind: str
    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    threshold: Tensor | None = None  # [d_sae] or [] (one for all)
    k: int | None = None
    prefixes: list[int] | None = None  # matryoshka
    subtract_b_dec: bool = True
    rescale: bool = False  # SAELens' rescale_acts_by_decoder_norm

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])


# ---------------------------------------------------------------------------------------------- reading


def detect_layout(path: str | Path) -> str:
    """The layout of `path` (one of LAYOUTS); a specific CheckpointError when it is none or lacks a file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name == DL_WEIGHTS:
            return _need(path.parent, "dictionary_learning", DL_WEIGHTS, DL_CONFIG)
        if path.suffix in (".pth", ".pt"):
            return "original_freud"
        path = path.parent if path.name in (CFG_FILE, WEIGHTS_FILE, DL_CONFIG) else path
    if path.is_dir():
        if (path / CFG_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
            return _need(path, "saelens", CFG_FILE, WEIGHTS_FILE)
        if (path / DL_WEIGHTS).is_file() or (path / DL_CONFIG).is_file():
            return _need(path, "dictionary_learning", DL_WEIGHTS, DL_CONFIG)
    raise UnknownLayoutError(
        f"{path} is not an SAE checkpoint of a known layout: SAELens (a directory with {CFG_FILE} + {WEIGHTS_FILE}), "
        f"dictionary_learning (a directory with {DL_WEIGHTS} + {DL_CONFIG}) or the original FREUD (a .pth file)")


def _need(directory: Path, layout: str, *names: str) -> str:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: a {layout} checkpoint needs {' and '.join(names)}; "
                              f"{', '.join(missing)} is missing")
    return layout


def read_foreign_checkpoint(path: str | Path, *, hook: str | None = None,
                            model: str | None = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """(our SAE in eval mode, its provenance) for the checkpoint at `path` (see the module doc). The SAE's metadata
    names its Whisper hook and model: `hook` / `model`, else the checkpoint's own, mapped to ours. The provenance:
    source path, layout, source_architecture, source_sha256 (of the weights file), source_cfg, source_hook /
    source_model (as the checkpoint names them), hook, model, architecture (ours), d_in, d_sae."""
    layout = detect_layout(path)
    path = Path(path).expanduser().resolve()
    directory = path if path.is_dir() else path.parent
    if layout == "saelens":
        weights, cfg = directory / WEIGHTS_FILE, json.loads((directory / CFG_FILE).read_text())
        if "freud_architecture" in cfg:  # one of ours, e.g. exported from another FREUD
            sae, source_arch = load_checkpoint(directory), f"freud:{cfg['freud_architecture']}"
        else:
            equations, source_arch = _saelens_equations(directory, cfg), str(cfg.get("architecture", "standard"))
            sae = _ours(equations, weights)
        meta = cfg.get("metadata") or {}
        source_hook = meta.get("hook_name", cfg.get("hook_name"))
        source_model = meta.get("model_name", cfg.get("model_name"))
    elif layout == "dictionary_learning":
        weights, config = directory / DL_WEIGHTS, json.loads((directory / DL_CONFIG).read_text())
        cfg = config.get("trainer") or {}
        source_arch = str(cfg.get("dict_class"))
        sae = _ours(_dictionary_learning_equations(weights, cfg), weights)
        source_hook, source_model = cfg.get("submodule_name"), cfg.get("lm_name")
    else:
        weights, sae = path, load_original_freud_checkpoint(path)
        source_arch, cfg = f"original-freud:{sae.architecture}", {}
        source_hook, source_model = sae.metadata.get("hook_name"), sae.metadata.get("model_name")
    hook, model = _placement(path, sae.d_in, hook, model, source_hook, source_model)
    sae.metadata = {**sae.metadata, "hook_name": hook, "model_name": model}
    provenance = {
        "source": str(path), "layout": layout, "source_architecture": source_arch,
        "source_sha256": file_sha256(weights), "source_cfg": cfg, "source_hook": source_hook,
        "source_model": source_model, "hook": hook, "model": model, "architecture": sae.architecture,
        "d_in": sae.d_in, "d_sae": sae.n_latents,
    }  # fmt: skip
    return sae, provenance




def _saelens_equations(directory: Path, cfg: dict) -> Equations:
    from safetensors.torch import load_file

    where = directory / CFG_FILE
    architecture = str(cfg.get("architecture", "standard"))  # SAELens' default before 6.0
    if architecture not in _SAELENS_KINDS:
        raise CheckpointError(f"{where}: SAELens architecture {architecture!r} has no equivalent here; importable: "
                              f"{', '.join(_SAELENS_KINDS)}")
    meta = cfg.get("metadata") or {}
    for key, fine in (("normalize_activations", ("none", None)), ("reshape_activations", ("none", None)),
                      ("hook_head_index", (None,)), ("finetuning_scaling_factor", (None, False))):
        value = cfg[key] if key in cfg else meta.get(key)
        if value not in fine:
            raise CheckpointError(f"{where}: {key}={value!r} is not supported (only {fine[0]!r})")
    t = {k: v.float() for k, v in load_file(str(directory / WEIGHTS_FILE)).items()}
    if "threshold" not in t and "log_threshold" in t:
        t["threshold"] = t["log_threshold"].exp()
    kind = _SAELENS_KINDS[architecture]
    _require(t, ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if kind == "jumprelu" else ()),
             directory / WEIGHTS_FILE)
    equations = Equations(kind, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], threshold=t.get("threshold"),
                          k=int(cfg["k"]) if kind == "topk" and cfg.get("k") is not None else None,
                          subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
                          rescale=kind == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False)))
    _check_shapes(equations, directory / WEIGHTS_FILE, cfg.get("d_in"), cfg.get("d_sae"))
    return equations


def _dictionary_learning_equations(weights: Path, trainer: dict) -> Equations:
    dict_class = trainer.get("dict_class")
    if dict_class not in _DL_CLASSES:
        raise CheckpointError(f"{weights.parent / DL_CONFIG}: dictionary_learning dict_class {dict_class!r} has no "
                              f"equivalent here; importable: {', '.join(_DL_CLASSES)}")
    try:
        s = {k: v.float() for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()}
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(f"{weights} is not a readable state dict ({exc})") from exc
    s = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in s.items()}
    k = int(s["k"]) if "k" in s else trainer.get("k")
    if dict_class == "AutoEncoder":
        _require(s, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), weights)
        W_enc, b_enc, W_dec = s["encoder.weight"].T.clone(), s["encoder.bias"].clone(), s["decoder.weight"].T.clone()
        norms = W_dec.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms)):  # AutoEncoder.from_pretrained(normalize_decoder=True)
            W_dec, W_enc, b_enc = W_dec / norms[:, None], W_enc * norms, b_enc * norms
        equations = Equations("relu", W_enc, b_enc, W_dec, s["bias"])
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        _require(s, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), weights)
        batch = dict_class == "BatchTopKSAE"
        equations = Equations("batchtopk" if batch else "topk", s["encoder.weight"].T, s["encoder.bias"],
                              s["decoder.weight"].T, s["b_dec"], threshold=s.get("threshold") if batch else None,
                              k=int(k) if k is not None else None)
    else:
        matryoshka = dict_class == "MatryoshkaBatchTopKSAE"
        _require(s, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") + (("group_sizes",) if matryoshka else ()),
                 weights)
        equations = Equations(
            "matryoshka" if matryoshka else "jumprelu", s["W_enc"], s["b_enc"], s["W_dec"], s["b_dec"],
            threshold=s["threshold"], k=int(k) if k is not None else None,
            prefixes=torch.cumsum(s["group_sizes"].long(), 0).tolist() if matryoshka else None,
            subtract_b_dec=matryoshka or bool(trainer.get("apply_b_dec_to_input", False)))
    _check_shapes(equations, weights, trainer.get("activation_dim"), trainer.get("dict_size"))
    return equations


def _require(tensors: dict, names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{where}: lacks {', '.join(missing)} (has {', '.join(sorted(tensors))})")


def _check_shapes(eq: Equations, where: Path, d_in: Any = None, d_sae: Any = None) -> None:
    d_in, d_sae = int(d_in or eq.W_enc.shape[0]), int(d_sae or eq.W_enc.shape[-1])
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if eq.threshold is not None:
        expected["threshold"] = (d_sae,) if eq.threshold.dim() else ()
    wrong = [f"{n} is {tuple(getattr(eq, n).shape)}, expected {s}" for n, s in expected.items()
             if tuple(getattr(eq, n).shape) != s]
    if wrong:
        raise CheckpointShapeError(f"{where}: shapes disagree with d_in={d_in}, d_sae={d_sae}: {'; '.join(wrong)}")
    if eq.kind in ("topk", "batchtopk", "matryoshka") and not (eq.k and 0 < eq.k <= d_sae):
        if eq.kind == "topk":
            raise CheckpointError(f"{where}: a TopK SAE needs k in 1..{d_sae}; the checkpoint gives {eq.k!r}")
        eq.k = min(32, d_sae)  # a BatchTopK's k only matters in training
    if eq.prefixes is not None and eq.prefixes[-1] != d_sae:
        raise CheckpointShapeError(f"{where}: group sizes add up to {eq.prefixes[-1]}, not d_sae={d_sae}")


# ---------------------------------------------------------------------------------------------- mapping


def reference_encode(eq: Equations, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """The source's latents of x, computed from its own equations; with the value at which a latent switches on
    (per frame or latent; None: nowhere, ReLU is continuous) and the pre-activations, for `_verify`."""
    pre = (x - eq.b_dec if eq.subtract_b_dec else x) @ eq.W_enc + eq.b_enc
    if eq.rescale:
        pre = pre * eq.W_dec.norm(dim=-1)
    if eq.kind == "topk":
        values, indices = pre.topk(eq.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu()), values[:, -1:].clamp_min(0), pre
    if eq.kind == "relu":
        return pre.relu(), None, pre
    return pre.relu() * (pre > eq.threshold), eq.threshold.clamp_min(0), pre


def reference_decode(eq: Equations, latents: Tensor) -> Tensor:
    norms = eq.W_dec.norm(dim=-1) if eq.rescale else 1.0
    return (latents / norms) @ eq.W_dec + eq.b_dec


def _ours(eq: Equations, where: Path) -> SparseAutoencoder:
    """Our SAE with exactly `eq`'s latents and reconstructions (checked by `_verify`)."""
    from freud_pipeline.sae.architectures import architecture_class

    W_enc, b_enc, W_dec, b_dec = eq.W_enc, eq.b_enc, eq.W_dec, eq.b_dec
    if not eq.subtract_b_dec:  # x @ W + b = (x - b_dec) @ W + (b + b_dec @ W)
        b_enc = b_enc + b_dec @ W_enc
    if eq.rescale:  # topk of pre·n decoded with W_dec / n: the same as pre' = pre·n, W_dec' = W_dec / n
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    threshold = eq.threshold if eq.threshold is not None else torch.zeros(())
    threshold = threshold.clamp_min(0).expand(eq.d_sae).contiguous()  # θ < 0 gates like 0 after the ReLU
    if eq.kind == "topk":
        sae = architecture_class("topk")(eq.d_in, eq.d_sae, k=eq.k)
    elif eq.kind == "relu" and _tied_unit(W_enc, W_dec, b_dec):
        sae = architecture_class("l1")(eq.d_in, eq.d_sae)
    elif eq.kind in ("relu", "jumprelu"):
        sae = architecture_class("jumprelu")(eq.d_in, eq.d_sae, l0_target=None)
        tensors["threshold"] = threshold
    elif eq.kind == "batchtopk":
        sae, tensors["threshold"] = architecture_class("batchtopk")(eq.d_in, eq.d_sae, k=eq.k), threshold
    else:
        sae = architecture_class("matryoshka_batchtopk")(eq.d_in, eq.d_sae, k=eq.k, matryoshka_prefixes=eq.prefixes)
        tensors["threshold"] = threshold
    try:
        sae.load_exported({name: t.contiguous() for name, t in tensors.items()})
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    sae.eval()
    _verify(sae, eq, where)
    return sae


def _tied_unit(W_enc: Tensor, W_dec: Tensor, b_dec: Tensor) -> bool:
    """Our tied L1 SAE: one matrix both ways with unit-norm latent directions and no decoder bias."""
    norms = W_dec.norm(dim=-1)
    return (torch.equal(W_enc, W_dec.T) and not bool(b_dec.any())
            and torch.allclose(norms, torch.ones_like(norms), atol=1e-6))


@torch.no_grad()
def _verify(sae: SparseAutoencoder, eq: Equations, where: Path, n: int = 256) -> None:
    """Refuse a mapping whose latents or reconstructions differ from the source's on random probe frames, beyond
    float rounding (a latent may flip where its pre-activation lies within rounding of where it switches on)."""
    generator = torch.Generator().manual_seed(0)
    scale = 1 / float(eq.W_enc.norm(dim=0).median().clamp_min(1e-12))  # pre-activations of order 1
    x = eq.b_dec + scale * torch.randn(n, eq.d_in, generator=generator)
    want, switch, pre = reference_encode(eq, x)
    got = sae.encode(x).float()
    tol = 1e-4 * (1 + float(want.abs().max()))
    bad = (got - want).abs() > tol
    if switch is not None:
        bad &= (pre - switch).abs() > tol
    recon_bad = (sae.decode(want).float() - reference_decode(eq, want)).abs().max()
    if bool(bad.any()) or float(recon_bad) > tol * (1 + float(eq.W_dec.abs().max())):
        raise CheckpointError(
            f"{where}: as our {sae.architecture} SAE its latents differ from the source's equations on "
            f"{int(bad.sum())} of {bad.numel()} probe values (reconstructions by up to {float(recon_bad):.3g}): "
            f"not imported, since it would not be the same SAE")


# ---------------------------------------------------------------------------------------------- placement

_OURS = re.compile(r"^encoder\.(blocks\.\d+(\.attn|\.mlp\.[012])?|ln_post)$")
_HF_LAYER = re.compile(r"^(?:model\.)?encoder\.layers[.\[](\d+)\]?(?:\.(fc1|fc2))?$")
_RESID = re.compile(r"^resid_post_layer_(\d+)$")


def whisper_hook(name: Any) -> str | None:
    """Our hook point for a hook name of another library, or None when it does not say one."""
    name = str(name or "").strip()
    if _OURS.match(name):
        return name
    if match := _HF_LAYER.match(name):
        return f"encoder.blocks.{match.group(1)}" + {"fc1": ".mlp.0", "fc2": ".mlp.2"}.get(match.group(2), "")
    if re.fullmatch(r"(?:model\.)?encoder\.layer_norm", name):
        return "encoder.ln_post"
    if match := _RESID.match(name):
        return f"encoder.blocks.{match.group(1)}"
    return None


def whisper_model(name: Any) -> str | None:
    """Our model name for `openai/whisper-tiny.en`, `whisper-tiny.en` or `tiny.en`; None when there is none."""
    name = str(name or "").strip()
    return re.sub(r"^(?:openai/)?whisper-", "", name) or None


def hook_width(model: str, hook: str) -> int:
    """The width of `hook` in Whisper `model`, from the checkpoint's dimensions (weights not loaded); HookError
    for a hook point the model lacks."""
    from types import SimpleNamespace

    import whisper

    from freud_pipeline.whisper import hooks
    from freud_pipeline.whisper.models import resolve_model

    checkpoint = resolve_model(model).checkpoint
    try:
        dims = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["dims"]
    except RuntimeError:  # an old (non-zip) checkpoint cannot be memory-mapped
        dims = torch.load(checkpoint, map_location="cpu", weights_only=True)["dims"]
    return hooks.hook_width(SimpleNamespace(dims=whisper.model.ModelDimensions(**dims)), hook)


def _placement(path: Path, d_in: int, hook: str | None, model: str | None, source_hook: Any,
               source_model: Any) -> tuple[str, str]:
    hook = hook or whisper_hook(source_hook)
    if not hook:
        raise HookError(f"{path}: cannot tell which Whisper hook point this SAE reads (its config names "
                        f"{source_hook!r}): pass --hook, e.g. encoder.blocks.2 (`freud hooks` lists them)")
    given, model = model, model or whisper_model(source_model)
    if not model:
        raise ModelError(f"{path}: its config names no Whisper model: pass --model, e.g. tiny.en")
    try:
        width = hook_width(model, hook)
    except ModelError as exc:
        raise type(exc)(f"{path}: Whisper model {model!r} ({'--model' if given else 'from its config'}): {exc}; "
                        f"pass --model") from None
    except HookError as exc:
        raise HookError(f"{path}: {exc}; pass --hook") from None
    if width != d_in:
        raise HookError(f"{path}: the SAE reads {d_in}-wide activations, but {model} {hook} is {width} wide: pass "
                        f"the --hook and --model it was trained on")
    return hook, model


# ---------------------------------------------------------------------------------------------- importing


@dataclass
class ImportResult:
    run_id: str
    checkpoint_dir: Path  # <runs_dir>/<model>-<hook>-imported/<run id>, complete and immutable
    sha256: str  # of our weights file (what a feature set records)
    model: str
    hook: str
    architecture: str  # ours
    registry: dict  # {name, version}
    provenance: dict
    sae: Any = field(default=None, repr=False)

    def summary(self) -> dict:
        return {"run_id": self.run_id, "checkpoint_dir": str(self.checkpoint_dir), "sha256": self.sha256,
                "model": self.model, "hook": self.hook, "architecture": self.architecture,
                "d_sae": self.provenance["d_sae"], "registered_model": self.registry["name"],
                "model_version": self.registry["version"], "layout": self.provenance["layout"],
                "source": self.provenance["source"], "source_architecture": self.provenance["source_architecture"]}


def provenance_tags(provenance: dict) -> dict[str, str]:
    """The `freud.import.*` tags of an imported SAE's run and model version."""
    cfg = json.dumps(provenance["source_cfg"], sort_keys=True, default=str)
    tags = {"source": provenance["source"], "layout": provenance["layout"],
            "source_sha256": provenance["source_sha256"], "source_architecture": provenance["source_architecture"],
            "source_hook": str(provenance["source_hook"]), "source_model": str(provenance["source_model"]),
            "source_cfg": cfg if len(cfg) <= _TAG_MAX else cfg[: _TAG_MAX - 1] + "…"}
    return {TAG + k: v for k, v in tags.items()}


def import_sae(path: str | Path, *, hook: str | None = None, model: str | None = None, tracking_uri: str,
               runs_dir: str | Path, experiment: str | None = None,
               loaded: tuple[SparseAutoencoder, dict] | None = None) -> ImportResult:
    """Read the checkpoint at `path` (or take `loaded`, what `read_foreign_checkpoint` returned), write it as our
    run directory under `runs_dir` (the data directory's `sae/`), log and register it in MLflow (module doc)."""
    from mlflow.entities import RunStatus

    from freud_pipeline.features.runs import EXPERIMENT
    from freud_pipeline.sae.checkpoint import checkpoint_sha256
    from freud_pipeline.sae.registry import CHECKPOINT_ARTIFACT, register_checkpoint, registered_model_name
    from freud_pipeline.sae.retention import PARTIAL_SUFFIX, REPORT_FILE
    from freud_pipeline.sae.run import complete_partial
    from freud_pipeline.sae.tracking import TrainingRun

    sae, provenance = loaded or read_foreign_checkpoint(path, hook=hook, model=model)
    model, hook, architecture = provenance["model"], provenance["hook"], provenance["architecture"]
    family = Path(runs_dir) / f"{model.replace('/', '_')}-{hook}-{REGISTERED_SUFFIX}"
    tags = {"model": model, "hook": hook, "architecture": architecture, "freud.imported": "true",
            **provenance_tags(provenance)}
    run = TrainingRun(tracking_uri, experiment or EXPERIMENT, f"imported-{architecture}-{hook}-{sae.n_latents}", tags)
    client, partial, final = run.client, family / f"{run.run_id}{PARTIAL_SUFFIX}", family / run.run_id
    try:
        save_checkpoint(sae, partial)
        sha256 = checkpoint_sha256(partial)
        report = {"run_id": run.run_id, "imported": {k: v for k, v in provenance.items() if k != "source_cfg"},
                  "sha256": sha256, "completed_at": time.time()}
        (partial / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        run.log_params({"architecture": architecture, "hook": hook, "model_name": model, "d_in": sae.d_in,
                        "n_latents_resolved": sae.n_latents, **({"k": sae.k} if hasattr(sae, "k") else {}),
                        "source_layout": provenance["layout"]})
        for name in (WEIGHTS_FILE, CFG_FILE):
            client.log_artifact(run.run_id, str(partial / name), CHECKPOINT_ARTIFACT)
        client.log_dict(run.run_id, provenance["source_cfg"], "import/source_cfg.json")
        name = registered_model_name(model, hook, REGISTERED_SUFFIX)
        version = register_checkpoint(client, name, run.run_id, tags={
            **tags, "checkpoint_dir": str(final), "checkpoint_sha256": sha256,
            "quality_check": "not measured (imported)"}, description=f"imported from {provenance['source']}")
        client.set_tag(run.run_id, "registered_model", name)
        client.set_tag(run.run_id, "registered_version", version)
        complete_partial(partial, final)
        client.log_artifact(run.run_id, str(final / REPORT_FILE), "import")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        client.set_terminated(run.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return ImportResult(run.run_id, final, sha256, model, hook, architecture, {"name": name, "version": version},
                        provenance, sae)


# ---------------------------------------------------------------------------------------------- indexing

CORPUS = "default_corpus"


def corpus_activations(data_root: str | Path, model: str, hook: str) -> dict[str, Path]:
    """{split: shard directory} of the default corpus' collected activations that hold `hook`; a
    DatasetUnavailableError naming the `freud collect` configs that collect them when there are none."""
    from freud_pipeline.activations.reader import ActivationReader
    from freud_pipeline.activations.writer import MANIFEST

    base = Path(data_root) / "activations" / model.replace("/", "_") / CORPUS
    found = {d.name: d for d in sorted(base.glob("*")) if (d / MANIFEST).is_file()
             and hook in ActivationReader(d).hooks}
    if not found:
        raise DatasetUnavailableError(f"no activations of {hook} for {model} in {base}: collect them first with "
                                      f"{_collect_hint(model, hook)}")
    return found


def _collect_hint(model: str, hook: str) -> str:
    """The shipped configs that collect the default corpus' `hook` for `model`, as commands."""
    import yaml

    from freud_pipeline.settings import checkout_root

    shipped = []
    for path in sorted(((checkout_root() or Path(".")) / "configs" / "features").glob("*.yaml")):
        run = yaml.safe_load(path.read_text()) or {}
        config = run.get("config") or {}
        if run.get("asset") == "activations" and config.get("model", "tiny.en") == model \
                and hook in config.get("hooks", []):
            shipped.append(f"`freud collect --config configs/features/{path.name}`")
    if shipped:
        return ", ".join(shipped)
    return (f"`freud collect --config configs/features/default_block_2_<split>.yaml` for each split, its config "
            f"changed to model: {model} and hooks: [{hook}]")


def index_imported_sae(result: ImportResult, *, data_root: str | Path, index_uri: str | None = None,
                       set_id: str | None = None, top_k: int = 32) -> dict:
    """Build the imported SAE's feature set over the default corpus' activations of its hook (every split
    collected), as `sae_feature_index` builds a trained one's; returns `build_feature_set`'s summary."""
    import pandas as pd

    from freud_pipeline.activations.reader import ActivationReader
    from freud_pipeline.audio.datasets import load_manifest
    from freud_pipeline.features import coverage as cov
    from freud_pipeline.features.build import build_feature_set, decoder_directions
    from freud_pipeline.features.mining import encoded_clips
    from freud_pipeline.sae.checkpoint import load_verified

    readers = {split: ActivationReader(d) for split, d in corpus_activations(data_root, result.model,
                                                                             result.hook).items()}
    sae = load_verified(result.checkpoint_dir, result.sha256)
    for split, reader in readers.items():
        if reader.width(result.hook) != sae.d_in:
            raise HookError(f"the {split} activations of {result.hook} are {reader.width(result.hook)} wide, the "
                            f"SAE reads {sae.d_in}")
    corpus = Path(data_root) / "datasets" / CORPUS
    manifest = load_manifest(corpus / "manifest.parquet") if (corpus / "manifest.parquet").is_file() else None
    alignments = pd.read_parquet(corpus / "alignments.parquet") if (corpus / "alignments.parquet").is_file() else None
    clips = chain.from_iterable(r.iter_clips(result.hook, dtype="float32") for r in readers.values())

    def encode(acts):
        with torch.inference_mode():
            return sae.encode(torch.from_numpy(acts)).numpy()

    return build_feature_set(
        encoded_clips(clips, encode), set_id=set_id or f"{result.model}/{result.hook}/sae-imported-"
        f"{result.architecture}-{result.run_id[:8]}", model=result.model, hook=result.hook, kind="sae",
        manifest_df=manifest, alignments_df=alignments, index_uri=index_uri, top_k=top_k,
        sae_run_id=result.run_id, sae_checkpoint=str(result.checkpoint_dir), sae_sha256=result.sha256,
        decoder=decoder_directions(sae), data_root=data_root,
        coverage=cov.extended(None, [cov.partition_entry(CORPUS, split, len(r.clip_ids()), r.n_frames)
                                     for split, r in readers.items()]))
