"""GPU check (issue 16, item 5): FREUD's CUDA paths measured against this project's CPU results, in one run.

    .venv/bin/python benchmarks/gpu_bundle.py              # on the CPU machine: writes gpu_bundle/ (< 60 MiB)
    python3 benchmarks/gpu_check.py --data gpu_bundle      # on the CUDA machine, with gpu_bundle/ carried along

From the bundle (clips of the embedded corpus, tiny.en, the CPU's fp32 results for them; benchmarks/gpu_bundle.py)
it, on the GPU:
1. collects `encoder.blocks.2` activations of the clips in fp32 (`iter_clip_activations` on an fp32 model) and as
   the pipeline does on CUDA (`collect_activations`: fp16 model, float16 shards), and times the library path
   (log-mel on the CPU included; real audio seconds per second, per batch size) and the bare encoder forward;
2. compares each with the CPU fp32 reference (of the clips it holds): per-frame cosine (`fidelity.compare_modes`,
   which also gives each neuron's top-20 clips by peak), each neuron's top-20 frames, the largest error relative to
   the reference RMS;
3. trains the demo SAE (`demo_config()`, the bundle's step count) on the training clips' GPU frames: with bf16
   autocast on the fp16 frames (the pipeline on CUDA) and in fp32 on the fp32 frames; frames/s, and FVU on the
   held-out clips (their GPU frames and their CPU frames) against the SAE the CPU trained on its frames;
4. splices each SAE into the fp32 model on the GPU (`splice_eval`: CE, greedy-decoding WER) over the held-out
   clips, against the CPU's splice of its SAE: ΔWER, CE recovered, transcripts that agree.
One JSON summary goes to stdout, and to $OUT/gpu_check.json when OUT is set (or to --json).

Without CUDA it prints "no CUDA device: gpu_check needs one (...); nothing measured" and exits 0 (2 with
--require-cuda). `--cpu-smoke` runs the same code on the CPU with a few clips and steps to prove the plumbing
(tests/test_gpu_check.py); every number it prints is marked as CPU smoke, not a GPU result.

What the CUDA machine needs: Python 3 with torch (CUDA), numpy, pandas, pyarrow, tqdm, tiktoken, scipy and
safetensors (the device image has them all; numba too, else whisper's word timing, unused here, gets a placeholder)
and this checkout. openai-whisper, jiwer and rapidfuzz (its pure-Python implementation) travel in the bundle's site/
folder, used only where the machine lacks them. pydantic and MLflow are not needed: the SAE trains here as
`sae.train.SaeTrainer` trains it (same seed, init, input scale, batches, optimiser, schedule and `training_step`)
without its MLflow run and checkpoint files; where they are missing, the two library modules that import them
(`sae.config`, `sae.tracking`) are replaced by placeholders whose names raise when used, so that `sae.train`
imports. Anything else missing is named with what to pip install.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import types
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOOK = "encoder.blocks.2"
BUNDLE_FORMAT = 1
META_FILE, MODEL_FILE, REFERENCE_FILE, SITE_DIR = "meta.json", "model.zpt", "reference.npz", "site"
NO_CUDA = "no CUDA device: gpu_check needs one ({why}); nothing measured"
SPLICE_KEYS = ("n_clips", "n_words", "n_tokens", "wer_original", "wer_spliced", "delta_wer", "delta_wer_ci_low",
               "delta_wer_ci_high", "ce_original", "ce_spliced", "ce_recovered", "delta_ce")
SMOKE_CLIPS, SMOKE_STEPS = 6, 5
# Placeholders where the machine lacks a package that these library modules import at module level but that
# nothing this check runs uses: {missing package: (module, names it must provide)}.
PLACEHOLDERS = {"pydantic": ("freud_pipeline.sae.config", ("TrainConfig", "demo_config")),
                "mlflow": ("freud_pipeline.sae.tracking", ("TrainingRun",))}


def cuda_missing() -> str | None:
    """None when a CUDA device is there, else why not (the one device rule: `devices.resolve_device`)."""
    try:
        from freud_pipeline.devices import resolve_device
    except ImportError as exc:
        return f"torch is not importable here: {exc}"
    return None if resolve_device("auto").type == "cuda" else "torch.cuda.is_available() is False"


def _placeholder(module: str, package: str, names: tuple[str, ...]) -> None:
    class Unavailable:
        def __init__(self, *_args, **_kwargs):
            raise RuntimeError(f"{module} needs {package}, which is not installed on this machine")

    stand_in = types.ModuleType(module, f"placeholder for {module}: {package} is not installed here")
    for name in names:
        setattr(stand_in, name, Unavailable)
    sys.modules[module] = stand_in


def import_origins(bundle: Path) -> dict:
    """Which packages came from the bundle's site/, and which library modules are placeholders."""
    site = (Path(bundle) / SITE_DIR).resolve()
    loaded = {name: sys.modules[name] for name in ("whisper", "jiwer", "rapidfuzz") if name in sys.modules}
    docs = {module: getattr(sys.modules.get(module), "__doc__", None) or "" for module, _ in PLACEHOLDERS.values()}
    docs["numba"] = getattr(sys.modules.get("numba"), "__doc__", None) or ""
    return {"from_bundle_site": sorted(n for n, m in loaded.items() if site in Path(m.__file__).resolve().parents),
            "placeholders": sorted(module for module, doc in docs.items() if doc.startswith("placeholder"))}


def prepare_imports(bundle: Path) -> None:
    """Make the library importable from what the machine has plus the bundle's site/ (appended: the machine's own
    packages win), with placeholders for the modules needing packages nothing here uses (PLACEHOLDERS)."""
    site = bundle / SITE_DIR
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
    for package, (module, names) in PLACEHOLDERS.items():
        try:
            importlib.import_module(package)
        except ImportError:
            if module not in sys.modules:
                _placeholder(module, package, names)
    wanted = {"whisper": "openai-whisper", "jiwer": "jiwer", "rapidfuzz": "rapidfuzz", "pandas": "pandas",
              "pyarrow": "pyarrow", "tqdm": "tqdm", "tiktoken": "tiktoken", "scipy": "scipy",
              "safetensors": "safetensors"}
    missing = [pip for module, pip in wanted.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"gpu_check needs these packages, missing here and not in {site}: "
                         f"pip install {' '.join(missing)}")
    try:
        importlib.import_module("numba")
    except Exception:  # absent, or built for another numpy: whisper needs it only to time words
        numba = types.ModuleType("numba", "placeholder for numba: whisper's word timing (unused here) is not compiled")
        numba.jit = lambda *_args, **_kwargs: (lambda function: function)
        sys.modules["numba"] = numba
    importlib.import_module("whisper")  # fails here, with its own reason, if one of whisper's needs is broken


# --- the bundle ------------------------------------------------------------------------------------------------
def unpack_model(path: Path) -> dict:
    """The bundle's tiny.en as an openai-whisper checkpoint {dims, model_state_dict} (fp16). The encoder is stored as
    the checkpoint has it; the decoder's matrices as int8 in groups of `group` weights with one fp16 scale each
    (what fits the device's 64 MiB transfer); the CPU references were computed with exactly this unpacked model."""
    import torch

    packed = torch.load(io.BytesIO(zlib.decompress(Path(path).read_bytes())), map_location="cpu", weights_only=True)
    if packed.get("format") != BUNDLE_FORMAT:
        raise SystemExit(f"{path}: bundle model format {packed.get('format')!r}, this script reads {BUNDLE_FORMAT}; "
                         f"rebuild the bundle with benchmarks/gpu_bundle.py")
    state = dict(packed["plain"])
    for name, q in packed["int8"].items():
        rows, cols = packed["shapes"][name]
        state[name] = (q.float() * packed["scales"][name].float().unsqueeze(-1)).half().reshape(rows, cols)
    return {"dims": packed["dims"], "model_state_dict": state}


def materialise_model(bundle: Path, directory: Path) -> Path:
    """Write the bundle's model as a checkpoint file that `whisper.models.load_model(path)` loads."""
    import torch

    path = Path(directory) / "tiny.en-bundle.pt"
    torch.save(unpack_model(bundle / MODEL_FILE), path)
    return path


def load_meta(bundle: Path) -> dict:
    path = Path(bundle) / META_FILE
    if not path.is_file():
        raise SystemExit(f"no GPU bundle at {bundle} ({path} is missing): build it on the CPU machine with "
                         f"`.venv/bin/python benchmarks/gpu_bundle.py` and carry it along")
    meta = json.loads(path.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise SystemExit(f"{bundle}: bundle format {meta.get('format')!r}, this script reads {BUNDLE_FORMAT}")
    return meta


def clip_rows(meta: dict, limit: int | None = None):
    """The bundle's clips as a manifest (paths relative to the bundle); `limit` keeps the first of the training and
    of the held-out clips in their proportion, at least one of each."""
    import pandas as pd

    rows = pd.DataFrame(meta["clips"])
    if limit is not None and limit < len(rows):
        n_held = min(max(1, round(limit * rows["heldout"].mean())), limit - 1)
        rows = pd.concat([rows[~rows["heldout"]].head(limit - n_held), rows[rows["heldout"]].head(n_held)])
    return rows.reset_index(drop=True)


def load_reference(bundle: Path, meta: dict) -> dict:
    """The CPU's fp32 activations of the reference clips {clip_id: float32 [frames, width]}."""
    import numpy as np

    with np.load(Path(bundle) / REFERENCE_FILE) as data:
        acts, lengths = data["acts"], data["lengths"]
    ends = np.cumsum(lengths)
    clips = [clip for clip in meta["clips"] if clip["reference"]]
    return {clip["clip_id"]: acts[end - n : end] for clip, n, end in zip(clips, lengths, ends)}


# --- measurements ------------------------------------------------------------------------------------------------
def clip_activations(rows, capture, bundle: Path, batch_size: int = 8) -> dict:
    """{clip_id: float32 [frames, width]} of the capture's first hook, through the library's collection path."""
    from freud_pipeline.activations.collect import iter_clip_activations

    hook = capture.hooks[0]
    return {clip_id: acts[hook] for clip_id, _, acts in
            iter_clip_activations(rows, capture, batch_size=batch_size, data_root=bundle)}


def collection_speed(rows, capture, bundle: Path, batch_size: int, repeats: int, sync, warm_up: bool = True) -> dict:
    """Real audio seconds per second of `iter_clip_activations` over the clips `repeats` times (after a warm-up
    batch: kernels, allocator)."""
    import pandas as pd

    from freud_pipeline.activations.collect import iter_clip_activations
    from freud_pipeline.frames import FRAME_SECONDS

    if warm_up:
        clip_activations(rows.head(batch_size), capture, bundle, batch_size)
    repeated = pd.concat([rows.assign(clip_id=rows["clip_id"] + f"#{r}") for r in range(repeats)], ignore_index=True)
    sync()
    started, n_frames = time.perf_counter(), 0
    for _, frames, _ in iter_clip_activations(repeated, capture, batch_size=batch_size, data_root=bundle):
        n_frames += len(frames)
    sync()
    elapsed = time.perf_counter() - started
    return {"audio_s_per_s": round(n_frames * FRAME_SECONDS / elapsed, 1),
            "windows_per_s": round(len(repeated) / elapsed, 1), "windows": len(repeated),
            "elapsed_s": round(elapsed, 3)}


def encoder_speed(capture, audios: list, batch_size: int, sync, warm_up: bool = True, min_seconds: float = 1.0) -> dict:
    """Windows per second of the bare capture (encoder up to the hook) on a batch of log-mels already on the device,
    repeated for at least `min_seconds` (once at least) after a warm-up pass."""
    import torch

    from freud_pipeline.whisper.hooks import log_mel

    param = next(capture.model.parameters())
    batch = [audios[i % len(audios)] for i in range(batch_size)]
    mels = torch.stack([log_mel(a, capture.model.dims.n_mels) for a in batch]).to(param.device, param.dtype)
    if warm_up:
        capture.capture(mels)
    sync()
    started, passes = time.perf_counter(), 0
    while passes == 0 or time.perf_counter() - started < min_seconds:
        capture.capture(mels)
        sync()
        passes += 1
    elapsed = time.perf_counter() - started
    return {"windows_per_s": round(passes * batch_size / elapsed, 1), "passes": passes}


def fidelity(reference: dict, candidate: dict, top_n: int = 20) -> dict:
    """`compare_modes` (frame cosine, top-n clips per neuron by peak), each neuron's top-n frames' overlap, and the
    largest absolute error relative to the reference's RMS."""
    import numpy as np

    from freud_pipeline.activations.fidelity import compare_modes

    result = compare_modes(reference, candidate, top_n)
    ids = sorted(set(reference) & set(candidate))
    ref = np.concatenate([reference[c] for c in ids]).astype(np.float64)
    cand = np.concatenate([candidate[c] for c in ids]).astype(np.float64)
    n = min(top_n, len(ref))
    ref_top = np.argpartition(-ref, n - 1, axis=0)[:n]
    cand_top = np.argpartition(-cand, n - 1, axis=0)[:n]
    overlap = np.mean([len(set(ref_top[:, f]) & set(cand_top[:, f])) / n for f in range(ref.shape[1])])
    result[f"top{top_n}_frame_overlap"] = round(float(overlap), 6)
    result["max_abs_error_over_rms"] = float(np.abs(ref - cand).max() / np.sqrt((ref**2).mean()))
    result["n_frames"] = len(ref)
    return result


def frames_of(acts: dict, clip_ids):
    """The clips' frames, in that order, as one float32 array."""
    import numpy as np

    return np.concatenate([np.asarray(acts[c], dtype=np.float32) for c in clip_ids])


def train_sae_on_frames(frames, cfg: dict, device: str, *, bf16: bool):
    """(the folded SAE, stats): `cfg` (a `TrainConfig` dumped to a dict) trained on in-memory frames as
    `sae.train.SaeTrainer` trains it (tests/test_gpu_check.py checks the weights are train_sae's on the CPU),
    without its MLflow run and checkpoint files; `bf16` autocasts on CUDA as the pipeline does there."""
    from itertools import islice
    from types import SimpleNamespace

    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from freud_pipeline.sae.architectures import architecture_class
    from freud_pipeline.sae.firing import FiringTracker
    from freud_pipeline.sae.metrics import fvu
    from freud_pipeline.sae.scaling import estimate_input_scale, folded_copy
    from freud_pipeline.sae.sources import FrameStream, TensorFrameSource
    from freud_pipeline.sae.train import lr_factor, make_optimizer, training_step

    c, dev = SimpleNamespace(**cfg), torch.device(device)
    source = TensorFrameSource(torch.as_tensor(frames), c.hook)
    d_in = source.width(c.hook)
    n_latents = c.n_latents or c.expansion_factor * d_in
    torch.manual_seed(c.seed)
    sae = architecture_class(c.architecture).from_cfg({"d_in": d_in, "d_sae": n_latents, **cfg})
    sae.metadata = {"hook_name": c.hook, "model_name": c.model_name}
    sae.to(dev)
    optimizer = make_optimizer(c, sae)
    scheduler = LambdaLR(optimizer, lr_factor(c))
    tracker = FiringTracker(n_latents, c.dead_after_frames, dev)
    first = [torch.as_tensor(b).float() for b in islice(source.random_frames(c.hook, c.batch_size, c.seed),
                                                        c.scale_batches)]
    scale = estimate_input_scale(first, d_in) if c.normalize_inputs else 1.0
    sae.init_from_data(torch.cat(first).to(dev) * scale)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and bf16
                else contextlib.nullcontext())
    stream = FrameStream(source, c.hook, c.batch_size, c.seed)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(c.steps):
        x = next(stream).to(dev, torch.float32) * scale
        out, _, _ = training_step(sae, x, optimizer, scheduler, tracker, c.grad_clip, autocast)
    sync()
    elapsed = time.perf_counter() - started
    stats = {"steps": c.steps, "batch_size": c.batch_size, "train_s": round(elapsed, 3),
             "frames_per_s": round(c.steps * c.batch_size / elapsed, 1),
             "last_batch_fvu": round(fvu(x, out.x_hat.detach().float()), 6),
             "dead_pct": round(100 * tracker.dead_fraction(), 3),
             "autocast": "bf16" if dev.type == "cuda" and bf16 else "none"}
    return folded_copy(sae, scale), stats


def heldout_fvu(sae, frames) -> float:
    """FVU of the (folded) SAE on raw frames, all of them."""
    import torch

    from freud_pipeline.sae.metrics import fvu

    x = torch.as_tensor(frames, dtype=torch.float32, device=sae.device)
    with torch.no_grad():
        x_hat = torch.cat([sae(chunk).x_hat.float() for chunk in x.split(4096)])
    return round(fvu(x, x_hat), 6)


def splice_summary(model, sae, clips: list, n_resamples: int, max_new_tokens: int | None) -> dict:
    """`splice_eval` of the SAE at HOOK on (audio, transcript) clips: its corpus numbers and transcripts."""
    import torch

    from freud_pipeline.sae.splice import splice_eval

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    result = splice_eval(model, sae.to(device), HOOK, clips, n_resamples=n_resamples, max_new_tokens=max_new_tokens)
    sync()
    return {**{k: result[k] for k in SPLICE_KEYS}, "elapsed_s": round(time.perf_counter() - started, 2),
            "transcripts": result["transcripts"]}


def _agreement(gpu: dict, cpu: dict, field: str) -> str:
    """How many clips' transcripts equal the CPU's (the held-out clips come in the bundle's order in both)."""
    pairs = list(zip(gpu["transcripts"], cpu["transcripts"]))
    return f"{sum(g[field] == c[field] for g, c in pairs)}/{len(pairs)}"


# --- the check -----------------------------------------------------------------------------------------------------
class Sections:
    """Runs the check's measurements one by one: a failing one (a CUDA path that never ran before) records its error
    and the rest still run, so that one device run brings back every number it can."""

    def __init__(self, log):
        self.errors: dict[str, str] = {}
        self.log = log

    def run(self, name: str, measure, *args, **kwargs):
        try:
            return measure(*args, **kwargs)
        except Exception as exc:  # recorded in the summary; the exit status says so
            self.errors[name] = "".join(traceback.format_exception_only(exc)).strip()
            self.log(f"[gpu_check] {name} FAILED:\n{traceback.format_exc()}")
            return None


def run_check(bundle: Path, *, device: str, smoke: bool, clips: int | None = None, steps: int | None = None,
              repeats: int = 4, batch_sizes: tuple[int, ...] = (8, 32), log=print) -> dict:
    """Everything the module docstring lists, on `device`; returns the summary (`errors`: the measurements that
    failed, with their exception)."""
    import numpy as np
    import torch

    from freud_pipeline.activations.collect import collect_activations, prepare_capture
    from freud_pipeline.activations.reader import ActivationReader
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.whisper.hooks import EncoderCapture
    from freud_pipeline.whisper.models import load_model

    t_start = time.perf_counter()
    bundle = Path(bundle)
    meta = load_meta(bundle)
    rows = clip_rows(meta, clips if clips is not None else (SMOKE_CLIPS if smoke else None))
    cfg = dict(meta["sae_config"])
    cfg["steps"] = steps if steps is not None else (min(cfg["steps"], SMOKE_STEPS) if smoke else cfg["steps"])
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    train_ids = list(rows.loc[~rows["heldout"], "clip_id"])
    held_ids = list(rows.loc[rows["heldout"], "clip_id"])
    reference = load_reference(bundle, meta)
    sections = Sections(log)
    summary: dict = {
        "what": "gpu_check", "mode": "cpu-smoke" if smoke else "gpu",
        "note": ("CPU SMOKE: proves the plumbing on the CPU; no number here is a GPU result" if smoke else
                 "GPU results against the CPU reference of the bundle"),
        "device": {"type": dev.type, "torch": torch.__version__, "python": platform.python_version()},
        "bundle": {"path": str(bundle), "clips": len(rows), "reference_clips": int(rows["reference"].sum()),
                   "train_clips": len(train_ids), "heldout_clips": len(held_ids),
                   "audio_s": round(float(rows["duration_s"].sum()), 2), "model": meta["model"]["name"],
                   "hook": meta["hook"], "built": meta["built"]},
        "errors": sections.errors,
    }
    if dev.type == "cuda":
        summary["device"] |= {"name": torch.cuda.get_device_name(dev), "cuda": torch.version.cuda,
                              "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
                              "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                              "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        scratch = Path(scratch)
        checkpoint = str(materialise_model(bundle, scratch))

        log(f"[gpu_check] collecting {len(rows)} clips on {dev} (fp32, then the pipeline's collect_activations)")
        fp32 = sections.run("load_fp32", lambda: EncoderCapture(load_model(checkpoint, device=dev), [HOOK]))
        acts32 = fp32 and sections.run("collect_fp32", clip_activations, rows, fp32, bundle)

        def pipeline_collection():
            manifest = collect_activations(rows, scratch / "shards", model=checkpoint, hooks=[HOOK], dtype="float16",
                                           device=device, data_root=bundle, fidelity_sample=0)
            acts = dict(ActivationReader(scratch / "shards").iter_clips(HOOK, dtype=np.float32))
            return acts, {"audio_s_per_s": manifest["audio_seconds_per_s"], "elapsed_s": manifest["elapsed_s"],
                          "clips": len(acts), "shard_dtype": "float16"}

        acts16, pipeline_speed = sections.run("collect_pipeline", pipeline_collection) or (None, None)
        half = sections.run("load_pipeline", prepare_capture, checkpoint, [HOOK], device)  # fp16 on CUDA
        captures = {name: c for name, c in (("fp32", fp32), ("pipeline", half)) if c is not None}
        speed: dict = {"precision": {name: str(next(c.model.parameters()).dtype) for name, c in captures.items()},
                       "pipeline_collect_activations": pipeline_speed}
        audios = [load_audio(bundle / p) for p in rows["path"].head(max(batch_sizes))]
        warm_up = dev.type == "cuda"  # first kernels, cuBLAS/cuDNN choices, the caching allocator
        for name, capture in captures.items():
            for b in batch_sizes:
                speed[f"{name}_batch{b}"] = sections.run(f"speed_{name}_batch{b}", collection_speed, rows, capture,
                                                         bundle, b, repeats, sync, warm_up)
                speed[f"{name}_batch{b}_encoder_only"] = sections.run(f"speed_{name}_batch{b}_encoder_only",
                                                                      encoder_speed, capture, audios, b, sync, warm_up)
        speed["cpu_reference_fp32_batch8"] = meta["reference"]["collect"]
        summary["collect"] = speed
        summary["fidelity_vs_cpu"] = {name: sections.run(f"fidelity_{name}", fidelity, reference, acts)
                                      for name, acts in (("fp32", acts32), ("pipeline", acts16)) if acts is not None}
        del half, captures

        log(f"[gpu_check] training the demo SAE ({cfg['steps']} steps of {cfg['batch_size']} frames) twice")
        sae_results: dict = {"config": {k: cfg[k] for k in ("architecture", "expansion_factor", "k", "lr", "steps",
                                                             "batch_size", "seed")}}
        saes = {}

        def train(acts, bf16: bool):
            sae, stats = train_sae_on_frames(frames_of(acts, train_ids), cfg, device, bf16=bf16)
            stats["fvu_heldout"] = heldout_fvu(sae, frames_of(acts, held_ids))
            stats["fvu_heldout_cpu_frames"] = heldout_fvu(sae, frames_of(reference, held_ids))
            stats["train_frames"] = int(sum(len(acts[c]) for c in train_ids))
            return sae, stats

        for name, acts, bf16 in (("bf16_on_pipeline_frames", acts16, True), ("fp32_on_fp32_frames", acts32, False)):
            if acts is not None and (trained := sections.run(f"sae_{name}", train, acts, bf16)) is not None:
                saes[name], sae_results[name] = trained
        sae_results["cpu_reference"] = meta["reference"]["sae"]
        summary["sae"] = sae_results

        log(f"[gpu_check] splicing each SAE into the fp32 model on {dev} over {len(held_ids)} held-out clips")
        by_id = rows.set_index("clip_id")
        clips_held = [(load_audio(bundle / by_id.loc[c, "path"]), by_id.loc[c, "transcript"]) for c in held_ids]
        cpu_splice = meta["reference"]["splice"]

        def spliced(sae):
            result = splice_summary(fp32.model, sae, clips_held, cpu_splice["n_resamples"],
                                    cpu_splice["max_new_tokens"])
            result["original_transcripts_as_cpu"] = _agreement(result, cpu_splice, "original")
            result["spliced_transcripts_as_cpu"] = _agreement(result, cpu_splice, "spliced")
            result.pop("transcripts")
            return result

        summary["splice"] = {name: sections.run(f"splice_{name}", spliced, sae) for name, sae in saes.items()
                             if fp32 is not None}
        summary["splice"]["cpu_reference"] = {k: cpu_splice[k] for k in (*SPLICE_KEYS, "elapsed_s", "max_new_tokens")}
    if dev.type == "cuda":
        summary["device"]["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    summary["imports"] = import_origins(bundle)
    summary["headline"] = headline(summary, batch_sizes)
    summary["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return summary


def _pick(section: dict | None, *keys):
    for key in keys:
        section = section.get(key) if isinstance(section, dict) else None
    return section


def headline(summary: dict, batch_sizes: tuple[int, ...]) -> dict:
    """The numbers to read first (and to record in benchmarks/RESULTS.md), from the summary's sections (None where
    a measurement failed)."""
    collect, fid, sae, splice = (summary.get(k) for k in ("collect", "fidelity_vs_cpu", "sae", "splice"))
    runs = ("bf16_on_pipeline_frames", "fp32_on_fp32_frames", "cpu_reference")
    return {
        "mode": summary["mode"],
        "failed": sorted(summary["errors"]),
        "collect_audio_s_per_s": {**{f"{name}_batch{b}": _pick(collect, f"{name}_batch{b}", "audio_s_per_s")
                                     for name in ("fp32", "pipeline") for b in batch_sizes},
                                  "cpu_reference": _pick(collect, "cpu_reference_fp32_batch8", "audio_s_per_s")},
        **{key: {name: _pick(fid, name, field) for name in ("fp32", "pipeline")}
           for key, field in (("frame_cosine_mean", "frame_cosine_mean"), ("top20_clip_overlap", "top20_overlap"),
                              ("top20_frame_overlap", "top20_frame_overlap"))},
        "sae_frames_per_s": {run: _pick(sae, run, "frames_per_s") for run in runs},
        "sae_fvu_heldout": {run: _pick(sae, run, "fvu_heldout") for run in runs},
        "delta_wer": {run: _pick(splice, run, "delta_wer") for run in runs},
        "wer_original": {run: _pick(splice, run, "wer_original") for run in runs},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "gpu_bundle", help="the bundle (benchmarks/gpu_bundle.py)")
    parser.add_argument("--require-cuda", action="store_true", help="exit 2 (not 0) without a CUDA device")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help=f"run on the CPU with {SMOKE_CLIPS} clips and {SMOKE_STEPS} SAE steps: plumbing only")
    parser.add_argument("--clips", type=int, help="use only this many of the bundle's clips")
    parser.add_argument("--steps", type=int, help="SAE steps (default: the bundle's, as its CPU reference trained)")
    parser.add_argument("--repeats", type=int, help="passes over the clips per speed measurement (default 4; smoke 1)")
    parser.add_argument("--batch-sizes", default=None, help="collection batch sizes, comma-separated (default 8,32)")
    parser.add_argument("--json", type=Path,
                        help="also write the summary here (default: $OUT/gpu_check.json when OUT is set)")
    args = parser.parse_args(argv)

    why = None if args.cpu_smoke else cuda_missing()
    if why is not None:
        print(NO_CUDA.format(why=why), flush=True)
        return 2 if args.require_cuda else 0
    load_meta(args.data)  # a missing bundle says so before the imports
    prepare_imports(args.data)
    batch_sizes = tuple(int(b) for b in (args.batch_sizes or ("8" if args.cpu_smoke else "8,32")).split(","))
    repeats = args.repeats or (1 if args.cpu_smoke else 4)
    summary = run_check(args.data, device="cpu" if args.cpu_smoke else "cuda", smoke=args.cpu_smoke,
                        clips=args.clips, steps=args.steps, repeats=repeats, batch_sizes=batch_sizes,
                        log=lambda message: print(message, file=sys.stderr, flush=True))
    text = json.dumps(summary, indent=1)
    print(text, flush=True)
    target = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
