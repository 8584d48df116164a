"""Merging a batch of new clips into a feature index against rebuilding it, side by side in one run.

    .venv/bin/python benchmarks/incremental.py [--data-dir DIR] [--synthetic-clips 100000] [--share 0.01]
                                               [--repeat 3] [--skip-corpus] [--skip-synthetic] [--json FILE]

Two cases, each timed in its own fresh process (so peak RSS is the step's own):
1. the embedded corpus: the neuron set of tiny.en `encoder.blocks.2.mlp.1` (1,536 neurons) over the default
   corpus' activations under --data-dir (all splits; `make demo` collects them), with labels from its alignments;
2. a synthetic set: --synthetic-clips clips of 20-80 frames x 256 features (sparse, non-negative, with rare large
   peaks, like SAE latents) drawn per clip from a fixed seed, no labels.
Per case: `base` builds the set on the first (1 - share) of the clips (not timed against anything: the starting
point), `merge` merges the remaining share into it (`features.build.merge_into_feature_set`), `rebuild` builds the
set on all clips from scratch (`build_feature_set`). `merge` (each time into a fresh copy of the base) and `rebuild`
run --repeat times, alternating, since single timings on a shared machine vary by 10-20%. Printed: the median,
min and max seconds and the peak RSS of each, the ratio of the medians (goal: merge <= 5% of the rebuild's time),
and whether the merged and rebuilt sets agree (n_clips, and the top example of every feature).
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOOK = "encoder.blocks.2.mlp.1"


def _corpus_parts(data_dir: Path, share: float):
    import pandas as pd

    from freud_pipeline.activations import ActivationReader

    base = data_dir / "activations" / "tiny.en" / "default_corpus"
    readers = [ActivationReader(base / split) for split in ("train", "dev", "test") if (base / split).is_dir()]
    if not readers:
        raise SystemExit(f"no default corpus activations under {base}: run `make demo` (or pass --data-dir)")
    corpus = data_dir / "datasets" / "default_corpus"
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    alignments = pd.read_parquet(corpus / "alignments.parquet") if (corpus / "alignments.parquet").is_file() else None
    # Where each clip's activations lie, found before the clock (a batch arrives as shards of its own, so a merge
    # never searches the corpus' shards for its clips): zero-copy views of the mapped files, nothing read yet.
    views = [(clip_id, acts) for reader in readers for clip_id, acts in reader.iter_clips(HOOK)]
    ids = [clip_id for clip_id, _ in views]
    n_new = max(1, round(share * len(ids)))
    old, new = set(ids[:-n_new]), set(ids[-n_new:])

    def clips(which):
        for clip_id, acts in views:  # the clips wanted, read and converted as the pipeline does
            if clip_id in which:
                yield clip_id, np.asarray(acts, np.float32)

    return clips, old, new, manifest, alignments, data_dir


def _synthetic_parts(n_clips: int, share: float):
    n_new = max(1, round(share * n_clips))
    ids = [f"syn-{i:07d}" for i in range(n_clips)]
    old, new = set(ids[:-n_new]), set(ids[-n_new:])

    def clips(which):
        for clip_id in ids:
            if clip_id in which:
                rng = np.random.default_rng(int(clip_id[4:]))
                frames = int(rng.integers(20, 81))
                acts = rng.exponential(0.1, (frames, 256)).astype(np.float32)
                acts[acts < 0.15] = 0
                acts[rng.integers(frames), rng.integers(256)] += rng.exponential(5.0)
                yield clip_id, acts

    return clips, old, new, None, None, None


def _step(case: str, step: str, uri: str, args) -> dict:
    """One step in this process (run by the parent in a child process)."""
    # The labeller imports scipy.special on first use: 0.2 s once per process, not a step's work.
    importlib.import_module("scipy.special")

    from freud_pipeline.features import coverage as cov
    from freud_pipeline.features.build import build_feature_set, merge_into_feature_set

    clips, old, new, manifest, alignments, data_root = (
        _corpus_parts(Path(args.data_dir), args.share) if case == "corpus" else
        _synthetic_parts(args.synthetic_clips, args.share))
    which = {"base": old, "merge": new, "rebuild": old | new}[step]
    # Each step gets the manifest rows and alignments of the clips it mines (a batch brings its own, as in the pipeline).
    rows = manifest[manifest["clip_id"].isin(which)] if manifest is not None else None
    alignments = alignments[alignments["clip_id"].isin(which)] if alignments is not None else None
    started = time.perf_counter()
    if step == "merge":
        summary = merge_into_feature_set(clips(which), set_id="bench", manifest_df=rows, alignments_df=alignments,
                                         index_uri=uri, coverage_entries=[cov.partition_entry(case, step, 0, 0)],
                                         data_root=data_root)
    else:
        summary = build_feature_set(clips(which), set_id="bench", model="tiny.en", hook=HOOK,
                                    kind="neuron" if case == "corpus" else "sae", manifest_df=rows,
                                    alignments_df=alignments, index_uri=uri, top_k=32, data_root=data_root,
                                    coverage=cov.extended(None, [cov.partition_entry(case, step, 0, 0)]))
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "n_clips": summary.get("n_clips"), "n_new": len(which)}


def _child(case: str, step: str, uri: str, args) -> dict:
    command = [sys.executable, __file__, "--child", case, step, uri, "--data-dir", str(args.data_dir),
               "--synthetic-clips", str(args.synthetic_clips), "--share", str(args.share)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _agree(merged_uri: str, rebuilt_uri: str) -> dict:
    from freud_pipeline.features import FeatureIndex

    a, b = FeatureIndex(merged_uri), FeatureIndex(rebuilt_uri)
    sa, sb = (next(s for s in x.sets() if s["set_id"] == "bench") for x in (a, b))
    n = int(sa["n_features"])
    same = sum(a.top_examples("bench", i, n=1) == b.top_examples("bench", i, n=1) for i in range(n))
    return {"n_clips_equal": sa["n_clips"] == sb["n_clips"], "top_example_equal_share": round(same / n, 4)}


def run_case(case: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="freud-incremental-") as tmp:
        base_uri = f"{tmp}/base/lancedb"
        base = _child(case, "base", base_uri, args)
        merges, rebuilds = [], []
        for i in range(args.repeat):  # alternating, so a slow spell of the machine hits both
            shutil.copytree(f"{tmp}/base", f"{tmp}/merged{i}")
            merges.append(_child(case, "merge", f"{tmp}/merged{i}/lancedb", args))
            rebuilds.append(_child(case, "rebuild", f"{tmp}/rebuilt{i}/lancedb", args))
        agree = _agree(f"{tmp}/merged0/lancedb", f"{tmp}/rebuilt0/lancedb")
    summary = {step: {"seconds_median": round(float(np.median([r["seconds"] for r in runs])), 3),
                      "seconds": [r["seconds"] for r in runs],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "n_clips": runs[0]["n_clips"],
                      "n_new": runs[0]["n_new"]}
               for step, runs in (("merge", merges), ("rebuild", rebuilds))}
    merge, rebuild = summary["merge"], summary["rebuild"]
    result = {"case": case, "base": base, **summary, "time_ratio": round(merge["seconds_median"]
                                                                         / rebuild["seconds_median"], 4),
              "rss_ratio": round(merge["peak_rss_mb"] / rebuild["peak_rss_mb"], 3), **agree}
    print(f"{case}: {rebuild['n_clips']} clips, {merge['n_new']} new ({args.share:.0%}), {args.repeat} run(s) each | "
          f"rebuild {rebuild['seconds_median']} s (runs {rebuild['seconds']}), {rebuild['peak_rss_mb']} MB | merge "
          f"{merge['seconds_median']} s (runs {merge['seconds']}), {merge['peak_rss_mb']} MB | merge/rebuild time "
          f"{result['time_ratio']:.1%} of the medians (goal <= 5%), peak RSS {result['rss_ratio']:.2f}x | merged == "
          f"rebuilt: n_clips {result['n_clips_equal']}, top example of {result['top_example_equal_share']:.1%} of "
          "features", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--synthetic-clips", type=int, default=100_000)
    parser.add_argument("--share", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=3, help="merges and rebuilds timed, alternating (median)")
    parser.add_argument("--skip-corpus", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "STEP", "URI"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_step(*args.child, args)))
        return
    results = [run_case(case, args) for case, skip in (("corpus", args.skip_corpus),
                                                        ("synthetic", args.skip_synthetic)) if not skip]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
