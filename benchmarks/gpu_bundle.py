"""Build the GPU check's bundle on the CPU machine: one folder (under 60 MiB: the device tool carries at most 64 MiB,
the checkout included) holding everything benchmarks/gpu_check.py needs on a CUDA machine besides torch and the
checkout, the CPU's results included.

    .venv/bin/python benchmarks/gpu_bundle.py [--data-dir data] [--out gpu_bundle] [--clips 40] [--heldout 10] \
        [--extra-train 60]

About 4 minutes on 2 quiet cores, most of it the CPU reference SAE's 800 steps (11.5 min measured with the cores
shared); 56 MiB with the defaults. What it writes:
- clips/NNN.wav: clips of the embedded default corpus (built by `make demo`; `--manifest` for another), 16-bit
  16 kHz mono, at most 30 s each, in the order of the sha1 of their ids: `--clips` reference clips, `--heldout` of
  them from the corpus' dev/test splits (never trained on; the splice clips) and the others from train, then
  `--extra-train` more training clips whose CPU activations do not travel (audio is 3x smaller than fp32
  activations): the demo SAE's 6,144 latents need all the frames the bundle can hold;
- model.zpt: tiny.en, its encoder as the checkpoint stores it (fp16), its decoder's matrices int8 in groups of
  `GROUP` weights with one fp16 scale each, zlib-compressed: 41 MiB where the fp16 checkpoint takes 72 MiB. Every
  reference below was computed with this model as `gpu_check.unpack_model` unpacks it, so the GPU and the CPU run
  the same weights (on 24 corpus clips its greedy transcripts equal tiny.en's on 23);
- reference.npz: the CPU's fp32 encoder.blocks.2 activations of the reference clips (the library's collection
  path);
- meta.json: the clips (id, path, duration, transcript, held out, reference), the demo SAE's config (`demo_config()`, with
  `--steps`) and the CPU's results: collection speed; the demo SAE trained on all training clips' CPU frames by
  `gpu_check.train_sae_on_frames` (fp32), its frames/s and held-out FVU; its `splice_eval` over the held-out clips;
- site/: openai-whisper, jiwer and rapidfuzz's pure-Python files copied from this environment, for a machine that
  lacks them (gpu_check appends the folder to sys.path: a machine's own packages win).
Written to <out>.partial, renamed when complete; over `--max-mib` it is removed and the build fails.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import platform
import shutil
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (beside this file; it puts the checkout on sys.path)

REPO = gpu_check.REPO
GROUP = 32  # decoder weights per int8 scale
SITE_PACKAGES = {"whisper": "openai-whisper", "jiwer": "jiwer", "rapidfuzz": "rapidfuzz"}  # module: distribution
SITE_SKIPPED = {"multilingual.tiktoken"}  # tiny.en's tokenizer is gpt2's


def select_clips(manifest, n_clips: int, n_heldout: int, n_extra: int = 0):
    """Usable clips (one Whisper window, a transcript with words) in the order of the sha1 of their ids: the
    reference clips (`n_clips`, of which `n_heldout` from splits other than train where the manifest has them, the
    rest from train), then `n_extra` more training clips; training clips first, then the held-out ones."""
    import pandas as pd
    from whisper.audio import CHUNK_LENGTH

    from freud_pipeline.audio.text import normalise_transcript

    usable = manifest[(manifest["duration_s"] <= CHUNK_LENGTH)
                      & manifest["transcript"].map(lambda t: bool(normalise_transcript(str(t or ""))))]
    is_train = usable["split"] == "train" if "split" in usable else pd.Series(False, index=usable.index)
    usable = usable.assign(order=usable["clip_id"].map(lambda c: hashlib.sha1(str(c).encode()).hexdigest()),
                           is_train=is_train)
    usable = usable.sort_values(["is_train", "order"])  # held out from other splits first, train where short
    held = usable.head(n_heldout)
    train = usable[~usable["clip_id"].isin(held["clip_id"])].sort_values(["is_train", "order"], ascending=[False, True])
    n_train = n_clips - n_heldout
    if len(held) < n_heldout or len(train) < n_train + n_extra or not 0 < n_heldout < n_clips:
        raise SystemExit(f"cannot pick {n_clips} reference clips with {n_heldout} held out (0 < held out < clips) "
                         f"and {n_extra} more training clips from {len(usable)} usable ones")
    return pd.concat([train.head(n_train).assign(heldout=False, reference=True),
                      train.iloc[n_train : n_train + n_extra].assign(heldout=False, reference=False),
                      held.assign(heldout=True, reference=True)], ignore_index=True)


def pack_model(checkpoint: Path, out: Path) -> dict:
    """Write tiny.en as `gpu_check.unpack_model` reads it (see the module docstring)."""
    import torch

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    plain, int8, scales, shapes = {}, {}, {}, {}
    for name, weight in saved["model_state_dict"].items():
        if not (name.startswith("decoder.") and weight.dim() == 2 and weight.shape[1] % GROUP == 0):
            plain[name] = weight
            continue
        groups = weight.float().reshape(weight.shape[0], -1, GROUP)
        scale = (groups.abs().amax(-1) / 127).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group
        int8[name] = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        scales[name], shapes[name] = scale, list(weight.shape)
    buffer = io.BytesIO()
    torch.save({"format": gpu_check.BUNDLE_FORMAT, "dims": saved["dims"], "plain": plain, "int8": int8,
                "scales": scales, "shapes": shapes, "group": GROUP}, buffer)
    out.write_bytes(zlib.compress(buffer.getvalue(), 6))
    return {"int8_matrices": len(int8), "group": GROUP, "mib": round(out.stat().st_size / 2**20, 2)}


def copy_site(dest: Path) -> dict:
    """The pure-Python files of SITE_PACKAGES (no compiled extensions: rapidfuzz then uses its Python
    implementation) into `dest`; returns their versions."""
    versions = {}
    for module, distribution in SITE_PACKAGES.items():
        source = Path(importlib.util.find_spec(module).origin).parent
        for path in source.rglob("*"):
            skipped = {"__pycache__", "__pyinstaller"} & set(path.relative_to(source).parts)
            if path.is_file() and not skipped and path.suffix not in (".so", ".pyd") and path.name not in SITE_SKIPPED:
                target = dest / module / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        versions[distribution] = importlib.metadata.version(distribution)
    return versions


def folder_mib(path: Path) -> float:
    """Size of the files under `path`, in MiB."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def build_bundle(out: Path, manifest, data_root: Path, *, n_clips: int = 40, n_heldout: int = 10,
                 n_extra: int = 60, steps: int | None = None, model: str = "tiny.en", n_resamples: int = 1000,
                 max_new_tokens: int | None = None, max_mib: float = 60.0, log=print) -> dict:
    """Write the bundle to `out` (replacing one there) from the manifest's clips (paths relative to `data_root`);
    returns its meta.json. `max_new_tokens` caps the splice's greedy decoding (default: the pipeline's,
    `SaeRunConfig.splice_max_new_tokens`)."""
    import numpy as np
    import torch

    from freud_pipeline import __version__
    from freud_pipeline.audio.decode import load_audio, write_wav
    from freud_pipeline.frames import FRAME_SECONDS
    from freud_pipeline.sae.config import demo_config
    from freud_pipeline.sae.run import SaeRunConfig
    from freud_pipeline.whisper.hooks import EncoderCapture
    from freud_pipeline.whisper.models import load_model, resolve_model

    max_new_tokens = max_new_tokens or SaeRunConfig.model_fields["splice_max_new_tokens"].default
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "clips").mkdir(parents=True)
    rows = select_clips(manifest, n_clips, n_heldout, n_extra)
    clips = []
    for i, row in enumerate(rows.itertuples(index=False)):
        path = Path("clips") / f"{i:03d}.wav"
        write_wav(partial / path, load_audio(Path(data_root) / row.path))
        clips.append({"clip_id": str(row.clip_id), "path": str(path), "duration_s": float(row.duration_s),
                      "transcript": str(row.transcript), "heldout": bool(row.heldout),
                      "reference": bool(row.reference)})
    resolved = resolve_model(model)
    log(f"[gpu_bundle] {len(clips)} clips; packing {resolved.checkpoint}")
    model_info = {"name": model, "source": resolved.source, "source_sha256": resolved.sha256,
                  **pack_model(resolved.checkpoint, partial / gpu_check.MODEL_FILE)}
    meta = {"format": gpu_check.BUNDLE_FORMAT, "hook": gpu_check.HOOK, "clips": clips, "model": model_info,
            "sae_config": demo_config(**({"steps": steps} if steps else {})).model_dump()}
    rows = gpu_check.clip_rows(meta)
    scratch = partial / "scratch"
    scratch.mkdir()
    whisper_model = load_model(str(gpu_check.materialise_model(partial, scratch)), device="cpu")
    shutil.rmtree(scratch)

    log("[gpu_bundle] CPU reference: fp32 activations")
    capture = EncoderCapture(whisper_model, [gpu_check.HOOK])
    started = time.perf_counter()
    acts = gpu_check.clip_activations(rows, capture, partial)
    elapsed = time.perf_counter() - started
    ordered = [acts[c["clip_id"]] for c in clips if c["reference"]]
    np.savez_compressed(partial / gpu_check.REFERENCE_FILE, acts=np.concatenate(ordered).astype(np.float32),
                        lengths=np.array([len(a) for a in ordered]))
    n_frames = sum(len(a) for a in acts.values())
    speed = {"audio_s_per_s": round(n_frames * FRAME_SECONDS / elapsed, 1),
             "windows_per_s": round(len(acts) / elapsed, 1), "windows": len(acts), "batch_size": 8}
    train_ids = [c["clip_id"] for c in clips if not c["heldout"]]
    held = [c for c in clips if c["heldout"]]

    cfg = meta["sae_config"]
    log(f"[gpu_bundle] CPU reference: the demo SAE, {cfg['steps']} steps of {cfg['batch_size']} frames (fp32)")
    sae, stats = gpu_check.train_sae_on_frames(gpu_check.frames_of(acts, train_ids), cfg, "cpu", bf16=False)
    stats["fvu_heldout"] = gpu_check.heldout_fvu(sae, gpu_check.frames_of(acts, [c["clip_id"] for c in held]))
    log(f"[gpu_bundle] CPU reference: splice_eval over {len(held)} held-out clips")
    clips_held = [(load_audio(partial / c["path"]), c["transcript"]) for c in held]
    splice = gpu_check.splice_summary(whisper_model, sae, clips_held, n_resamples, max_new_tokens)
    meta["reference"] = {"collect": speed | {"precision": "float32"}, "sae": stats,
                         "splice": splice | {"n_resamples": n_resamples, "max_new_tokens": max_new_tokens}}
    meta["site"] = copy_site(partial / gpu_check.SITE_DIR)
    meta["built"] = {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "freud": __version__,
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "python": platform.python_version()}
    (partial / gpu_check.META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    size = folder_mib(partial)
    if size > max_mib:
        shutil.rmtree(partial)
        raise SystemExit(f"the bundle would take {size:.1f} MiB, over --max-mib {max_mib:g}: use fewer --clips")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    log(f"[gpu_bundle] {out}: {size:.1f} MiB")
    return meta


def main(argv: list[str] | None = None) -> int:
    from freud_pipeline import settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="FREUD data dir holding the corpus (default: FREUD_DATA_DIR)")
    parser.add_argument("--manifest", type=Path,
                        help="default: <data dir>/datasets/default_corpus/manifest.parquet (paths relative to the "
                             "data dir)")
    parser.add_argument("--out", type=Path, default=REPO / "gpu_bundle")
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--heldout", type=int, default=10)
    parser.add_argument("--extra-train", type=int, default=60, help="training clips without CPU activations")
    parser.add_argument("--steps", type=int, help="SAE steps (default: demo_config()'s)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of splice_eval")
    parser.add_argument("--max-new-tokens", type=int, help="cap of the splice's greedy decoding (default: the "
                                                                 "pipeline's splice_max_new_tokens)")
    parser.add_argument("--max-mib", type=float, default=60.0)
    args = parser.parse_args(argv)

    import pandas as pd

    data_dir = (args.data_dir or settings.data_dir()).resolve()
    manifest = args.manifest or data_dir / "datasets" / "default_corpus" / "manifest.parquet"
    if not manifest.is_file():
        raise SystemExit(f"no corpus manifest at {manifest}: run `make demo` (or pass --data-dir / --manifest)")
    started = time.perf_counter()
    build_bundle(args.out, pd.read_parquet(manifest), data_dir, n_clips=args.clips, n_heldout=args.heldout,
                 n_extra=args.extra_train,
                 steps=args.steps, n_resamples=args.resamples, max_new_tokens=args.max_new_tokens, max_mib=args.max_mib,
                 log=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"built {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
