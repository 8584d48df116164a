"""How much the labels of a feature index can be trusted, against the chance level; and the SAE's recorded quality.

    .venv/bin/python benchmarks/understanding.py [--data-dir DIR] [--set SET_ID ...] [--corpus DIR]
                                                 [--seeds 5] [--json FILE]

For each set (default: the index's neuron set and its SAE set, the newest of each kind) it prints:
- features: the set's number of features;
- significant: share of features with a significant label (labels.py's rule), and split by kind (phone, phone
  class, artefact);
- validated: share with a held-out-validated label (a phone or class label whose held-out precision is
  >= labels.VALIDATED_PRECISION over >= labels.MIN_SUPPORT held-out peaks);
- median held-out P: median held-out precision among the features carrying a phone or class label;
and each of these on three rows:

1. "index": the numbers as stored in the index (`label_kind`, `label_heldout_precision`, `label_heldout_n` of
   every feature row), i.e. what the labelling pass (`labels.LabelCollector`) decided.
2. "recomputed": the same labels scored again from what the index stores, so that they can be compared with (3)
   by one method. The index keeps no per-feature held-out peaks (the labelling pass keeps its own top-K of the
   training and of the held-out clips and stores only the scores), so the peaks used here are the set's stored
   top examples (sign "+": clip ids and peak frames; a peak counts only when its value exceeds the set's fire
   threshold), split into training and held-out clips by the same rule the labelling pass used
   (`labels.heldout_split` on the aligned clips of the corpus manifest), each peak frame looked up in the corpus
   alignments (the phone whose interval holds the frame's centre; none: silence). These are the strongest peaks
   over all clips, so a feature has fewer held-out peaks here than in the labelling pass (and the numbers of (1)
   and (2) differ for that reason). Scoring: a phone/class label is significant when its training precision P,
   lift P / q (q = the label's stored base rate) and Bonferroni-adjusted one-sided binomial p pass labels.py's
   thresholds (m = the phone and class candidates of the training alignments + 4); an artefact label when >= half
   of the training peaks show it and its p passes (clip onset / end: first / last 100 ms, the last frame from the
   manifest's duration; fixed frame N: the peak at frame N, p also multiplied by the longest clip's frame count;
   silence: no phone under the peak). Validated: significant, and held-out precision (share of held-out peaks on
   the label) >= VALIDATED_PRECISION over >= MIN_SUPPORT held-out peaks.
3. "shuffled": the chance level. The set's label assignments (label, kind, base rate; unlabelled included) are
   permuted across its features (--seeds permutations, mean and standard deviation), and each feature is scored,
   as in (2) and from the same peaks, with the label it received. Here "validated" does NOT require the label to be
   significant on the training peaks (a shuffled label almost never is, which would make the chance level ~0):
   it is the share of features whose received phone/class label reaches held-out precision >= VALIDATED_PRECISION
   over >= MIN_SUPPORT held-out peaks, a conservative (higher) chance level. "median held-out P" is over the
   features that received a phone/class label.
The "ratio" row is recomputed / shuffled mean. Sets built since the labelling pass computes its own chance level
also get a line comparing the "index" row's validated share with the labels permuted across features and scored
on the very held-out peaks the labelling pass used (`label_summary.share_validated_chance`, 10 permutations). A second chance level for the held-out precision is printed below
the table: the median base rate of the phone/class labels, the precision a label would have if the feature's
peaks fell on random speech frames.

For SAE sets it also prints what was recorded with the set's SAE run (MLflow run `sae_run_id` in the data dir's
store, read through `features.runs`): FVU, L0, dead %, delta CE (splice ce_spliced - ce_original, nats/token)
and delta WER (wer_spliced - wer_original), each with the confidence interval logged with the run when there is
one (a metric named like the quantity with ci_low / ci_high, lo / hi or lower / upper), else "no CI recorded".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LANCEDB_LOG", "error")

from freud_pipeline.audio.datasets.manifest import load_alignments, load_manifest  # noqa: E402
from freud_pipeline.audio.phones import PHONE_CLASSES  # noqa: E402
from freud_pipeline.features import labels as L  # noqa: E402
from freud_pipeline.features import runs, store  # noqa: E402
from freud_pipeline.features.labels import p_values  # noqa: E402
from freud_pipeline.frames import FRAME_SECONDS  # noqa: E402

COLUMNS = ("significant", "phone", "class", "artefact", "validated", "median_heldout_precision")


# ---------------------------------------------------------------- reading the index and the corpus


def set_rows(db, wanted: list[str] | None) -> list[dict]:
    rows = db.open_table(store.FEATURE_SETS).search().limit(None).to_list()
    if wanted:
        known = {r["set_id"]: r for r in rows}
        missing = [s for s in wanted if s not in known]
        if missing:
            sys.exit(f"unknown set(s) {missing}; known: {sorted(known)}")
        return [known[s] for s in wanted]
    newest = {}
    for row in sorted(rows, key=lambda r: r["created_at"]):
        newest[row["kind"]] = row
    return [newest[k] for k in ("neuron", "sae") if k in newest]


def feature_table(db, build_id: str) -> pd.DataFrame:
    where = f"build_id = {store.sql_str(build_id)}"
    columns = ["index", "label", *store.LABEL_QUALITY]
    table = db.open_table(store.FEATURES).search().where(where).select(columns).limit(None).to_pandas()
    return table.sort_values("index").reset_index(drop=True)


def top_peaks(db, set_row: dict, fire_threshold: float) -> dict[int, list[tuple[str, int]]]:
    """feature -> [(clip_id, peak frame)] of its stored top examples whose value exceeds the fire threshold (the
    rows the set's build reads: a merged set's unchanged features keep rows of earlier builds)."""
    table = store.example_rows(set_row, "sign = '+'", ["feature", "clip_ids", "values", "peak_frames"], db=db)
    out = {}
    for f, clips, values, frames in zip(*(table.column(c).to_pylist()
                                          for c in ("feature", "clip_ids", "values", "peak_frames"))):
        out[f] = [(c, int(t)) for c, v, t in zip(clips, values, frames) if v > fire_threshold]
    return out


class Corpus:
    """Per aligned clip: the phone under each frame, its frame count, and whether it is held out."""

    def __init__(self, corpus_dir: Path):
        alignments = load_alignments(corpus_dir)
        manifest = load_manifest(corpus_dir / "manifest.parquet")
        self.heldout, self.split = L.heldout_split(alignments["clip_id"].astype(str), manifest)
        duration = dict(zip(manifest["clip_id"].astype(str), manifest["duration_s"]))
        table = alignments.assign(label=alignments["label"].astype(str).str.lower())
        phones = table[table["tier"].eq("phone") & ~table["label"].isin(L.SILENCE)]
        self.phones = sorted(phones["label"].unique())
        code = {p: i for i, p in enumerate(self.phones)}
        self.frames: dict[str, np.ndarray] = {}
        for clip_id, rows in phones.groupby(phones["clip_id"].astype(str)):
            first, stop = L.interval_frames(rows["start_s"].to_numpy(), rows["end_s"].to_numpy())
            n = int(np.ceil(duration.get(clip_id, rows["end_s"].max()) / FRAME_SECONDS))
            out = np.full(max(n, int(stop.max(initial=0))), -1, np.int32)
            for label, a, b in zip(rows["label"], first, stop):
                out[a:b] = code[label]
            self.frames[clip_id] = out
        for clip_id in set(table["clip_id"].astype(str)) - set(self.frames):  # aligned, but no phone: silence
            self.frames[clip_id] = np.full(int(np.ceil(duration.get(clip_id, 0) / FRAME_SECONDS)), -1, np.int32)
        train_phones = {self.phones[i] for c, f in self.frames.items() if c not in self.heldout for i in set(f) - {-1}}
        classes = [n for n, members in PHONE_CLASSES.items() if len(members & train_phones) >= 2]
        self.m = len(train_phones) + len(classes) + 4
        self.longest = max((len(f) for f in self.frames.values()), default=1)

    def peaks(self, peaks: list[tuple[str, int]]) -> tuple[np.ndarray, ...]:
        """(phone, frame, frames from the end, held out) of the aligned clips' peaks."""
        rows = [(f[t] if t < len(f) else -1, t, len(f) - 1 - t, c in self.heldout)
                for c, t in peaks if (f := self.frames.get(c)) is not None]
        if not rows:
            return tuple(np.zeros(0, dtype) for dtype in (np.int32, np.int32, np.int32, bool))
        return tuple(np.array(col) for col in zip(*rows))


# ---------------------------------------------------------------- scoring a label on a feature's peaks


def on_label(label: str, kind: str, phone, frame, from_end, phones: list[str]) -> np.ndarray:
    if kind == "artefact":
        if label == L.ONSET:
            return frame < L.ONSET_FRAMES
        if label == L.END:
            return from_end < L.ONSET_FRAMES
        if label == L.SILENT:
            return phone < 0
        fixed = re.fullmatch(re.escape(L.FIXED) + r" (\d+)", label)
        return frame == int(fixed.group(1)) if fixed else np.zeros(len(frame), bool)
    return np.isin(phone, _phone_ids(label, kind, tuple(phones)))


@functools.lru_cache(maxsize=None)
def _phone_ids(label: str, kind: str, phones: tuple[str, ...]) -> np.ndarray:
    members = PHONE_CLASSES[label] if kind == "class" else {label}
    return np.array([i for i, p in enumerate(phones) if p in members], np.int32)


def score(label, kind, base, peaks, corpus: Corpus) -> dict:
    """significant, held-out precision and validated (held-out only) of `label` on one feature's peaks."""
    out = {"significant": False, "heldout": np.nan, "validated_heldout": False}
    if label is None or kind not in L.KINDS:
        return out
    phone, frame, from_end, held = peaks
    hit = on_label(label, kind, phone, frame, from_end, corpus.phones)
    n, k = int((~held).sum()), int(hit[~held].sum())
    n_held, k_held = int(held.sum()), int(hit[held].sum())
    if n >= L.MIN_SUPPORT and base and np.isfinite(base) and base > 0:
        tested = corpus.m * (corpus.longest if kind == "artefact" and label.startswith(L.FIXED) else 1)
        p = float(p_values(np.array(k), np.array(n), np.array(base), tested))
        precision = k / n
        if kind == "artefact":
            out["significant"] = p < L.ALPHA and precision >= L.ARTEFACT_SHARE
        else:
            out["significant"] = (p < L.ALPHA and precision / base >= L.MIN_LIFT and precision >= L.MIN_PRECISION)
    if n_held:
        out["heldout"] = k_held / n_held
        out["validated_heldout"] = n_held >= L.MIN_SUPPORT and k_held / n_held >= L.VALIDATED_PRECISION
    return out


def summarise(kinds: list, significant: np.ndarray, validated: np.ndarray, heldout: np.ndarray) -> dict:
    kinds = np.array([k if k in L.KINDS else "" for k in kinds])
    n = max(len(kinds), 1)
    labelled = np.isin(kinds, ("phone", "class"))
    held = heldout[labelled & np.isfinite(heldout)]
    return {"significant": float(significant.sum() / n),
            **{k: float((significant & (kinds == k)).sum() / n) for k in L.KINDS},
            "validated": float(validated.sum() / n),
            "median_heldout_precision": float(np.median(held)) if held.size else None}


def assess(rows: pd.DataFrame, peaks: dict, corpus: Corpus, seeds: int) -> dict:
    labels, kinds = rows["label"].tolist(), rows["label_kind"].tolist()
    base = rows["label_base_rate"].to_numpy(np.float64)
    stored_held = rows["label_heldout_precision"].to_numpy(np.float64)
    stored_sig = np.array([k in L.KINDS for k in kinds])
    stored_valid = (np.isin(kinds, ("phone", "class")) & (rows["label_heldout_n"].fillna(0).to_numpy() >= L.MIN_SUPPORT)
                    & (np.nan_to_num(stored_held) >= L.VALIDATED_PRECISION))
    feature_peaks = [corpus.peaks(peaks.get(int(i), [])) for i in rows["index"]]

    def scored(order: np.ndarray) -> tuple[dict, list]:
        results = [score(labels[j], kinds[j], base[j], feature_peaks[f], corpus) for f, j in enumerate(order)]
        sig = np.array([r["significant"] for r in results])
        held = np.array([r["heldout"] for r in results], np.float64)
        return {"sig": sig, "held": held, "held_ok": np.array([r["validated_heldout"] for r in results])}, \
            [kinds[j] for j in order]

    own, _ = scored(np.arange(len(rows)))
    recomputed = summarise(kinds, own["sig"], own["sig"] & own["held_ok"] & np.isin(kinds, ("phone", "class")),
                           own["held"])
    shuffles = []
    for seed in range(seeds):
        got, got_kinds = scored(np.random.default_rng(seed).permutation(len(rows)))
        shuffles.append(summarise(got_kinds, got["sig"], got["held_ok"] & np.isin(got_kinds, ("phone", "class")),
                                  got["held"]))
    chance = {c: _mean_sd([s[c] for s in shuffles]) for c in COLUMNS}
    n_held = np.array([int(p[3].sum()) for p in feature_peaks])
    n_all = np.array([len(p[3]) for p in feature_peaks])
    labelled = np.isin(kinds, ("phone", "class")) & np.isfinite(base)
    return {
        "n_features": len(rows),
        "index": summarise(kinds, stored_sig, stored_valid, stored_held),
        "recomputed": recomputed,
        "shuffled": chance,
        "ratio": {c: (recomputed[c] / chance[c]["mean"] if recomputed[c] is not None and chance[c]["mean"]
                      else None) for c in COLUMNS},
        "median_base_rate": float(np.median(base[labelled])) if labelled.any() else None,
        "peaks_per_feature": {"median_train": float(np.median(n_all - n_held)) if len(n_all) else 0.0,
                              "median_heldout": float(np.median(n_held)) if len(n_held) else 0.0},
    }


def _mean_sd(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


# ---------------------------------------------------------------- the SAE run


def _ci(metrics: dict, name: str) -> tuple[float, float] | None:
    """(low, high) of a metric logged as <...name...>(ci_)low/lo/lower and (ci_)high/hi/upper, if any."""
    bounds = {}
    for key, value in metrics.items():
        base = key.rsplit("/", 1)[-1]
        if name not in base:
            continue
        rest = base.replace(name, "").strip("_")
        for side, words in (("low", ("ci_low", "ci_lo", "low", "lo", "lower", "ci_lower")),
                            ("high", ("ci_high", "ci_hi", "high", "hi", "upper", "ci_upper"))):
            if rest in words:
                bounds[side] = float(value)
    return (bounds["low"], bounds["high"]) if len(bounds) == 2 else None


def sae_quality(run_id: str | None, tracking_uri: str) -> dict:
    if not run_id:
        return {"error": "the set records no sae_run_id"}
    found = [r for r in runs.list_runs(tracking_uri) if r["run_id"] == run_id]
    if not found:
        return {"error": f"run {run_id} is not in the MLflow store {tracking_uri}"}
    run = found[0]
    m = run["metrics"]

    def get(*names):
        return next((float(m[n]) for n in names if n in m), None)

    wer0, wer1 = get("splice/wer_original", "wer_original"), get("splice/wer_spliced", "wer_spliced")
    ce0, ce1 = get("splice/ce_original", "ce_original"), get("splice/ce_spliced", "ce_spliced")
    out = {"run_id": run_id, "run_name": run["run_name"], "splice_n_clips": get("splice/n_clips")}
    values = {"fvu": run["fvu"], "l0": run["l0"], "dead_pct": run["dead_pct"],
              "delta_ce": get("splice/delta_ce", "delta_ce") if ce0 is None or ce1 is None else ce1 - ce0,
              "delta_wer": get("splice/delta_wer", "delta_wer") if wer0 is None or wer1 is None else wer1 - wer0,
              "wer_original": wer0, "wer_spliced": wer1, "ce_recovered": run["ce_recovered"]}
    for name, value in values.items():
        out[name] = {"value": value, "ci": _ci(m, name)}
    return out


# ---------------------------------------------------------------- output


def _fmt(value, pct=True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def print_set(set_row: dict, result: dict, seeds: int) -> None:
    print(f"\n{set_row['set_id']}  ({set_row['kind']}, {result['n_features']} features; stored top examples per "
          f"feature used for (2)/(3): median {result['peaks_per_feature']['median_train']:.0f} training, "
          f"{result['peaks_per_feature']['median_heldout']:.0f} held-out peaks)")
    header = f"  {'':<26}" + "".join(f"{h:>13}" for h in ("significant", "phone", "class", "artefact", "validated",
                                                            "median h-o P"))
    print(header)
    for name in ("index", "recomputed"):
        r = result[name]
        print(f"  {name:<26}" + "".join(f"{_fmt(r[c], c != 'median_heldout_precision'):>13}" for c in COLUMNS))
    s = result["shuffled"]
    cells = []
    for c in COLUMNS:
        pct = c != "median_heldout_precision"
        cells.append("-" if s[c]["mean"] is None else
                     (f"{100 * s[c]['mean']:.1f}±{100 * s[c]['sd']:.1f}%" if pct
                      else f"{s[c]['mean']:.3f}±{s[c]['sd']:.3f}"))
    print(f"  {f'shuffled ({seeds} seeds)':<26}" + "".join(f"{c:>13}" for c in cells))
    ratio = result["ratio"]
    print(f"  {'ratio recomputed/shuffled':<26}" + "".join(
        f"{'-' if ratio[c] is None else format(ratio[c], '.1f') + 'x':>13}" for c in COLUMNS))
    if result["median_base_rate"] is not None:
        print(f"  median base rate of the phone/class labels (their precision if peaks fell on random frames): "
              f"{result['median_base_rate']:.3f}")


def print_sae(quality: dict) -> None:
    if "error" in quality:
        print(f"  SAE run: {quality['error']}")
        return
    n = quality.get("splice_n_clips")
    print(f"  SAE run {quality['run_id'][:8]} ({quality['run_name']}), splice evaluation on "
          f"{'?' if n is None else int(n)} clips:")
    for name, label in (("fvu", "FVU"), ("l0", "L0"), ("dead_pct", "dead %"), ("delta_ce", "delta CE (nats/tok)"),
                        ("delta_wer", "delta WER"), ("ce_recovered", "CE recovered")):
        item = quality[name]
        value = "-" if item["value"] is None else f"{item['value']:.4g}"
        ci = f"[{item['ci'][0]:.4g}, {item['ci'][1]:.4g}]" if item["ci"] else "no CI recorded"
        print(f"    {label:<22}{value:>10}   {ci}")
    if quality["wer_original"]["value"] is not None:
        print(f"    (WER {quality['wer_original']['value']:.4g} -> {quality['wer_spliced']['value']:.4g})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FREUD_DATA_DIR") or
                                                             Path(__file__).resolve().parents[1] / "data"))
    parser.add_argument("--set", dest="sets", action="append", help="set id (repeatable); default: the newest "
                        "neuron set and the newest SAE set")
    parser.add_argument("--corpus", type=Path, help="dataset dir with manifest.parquet and alignments.parquet "
                        "(default: DATA_DIR/datasets/default_corpus)")
    parser.add_argument("--seeds", type=int, default=5, help="label permutations for the chance level")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    data = args.data_dir.expanduser().resolve()
    corpus_dir = args.corpus or data / "datasets" / "default_corpus"
    uri = os.environ.get("FREUD_LANCEDB_URI", str(data / "lancedb"))
    if not Path(uri).exists() and "://" not in uri:
        sys.exit(f"{uri}: no feature index here; build one (freud demo) or pass --data-dir")
    if not (corpus_dir / "alignments.parquet").is_file():
        sys.exit(f"{corpus_dir}: no alignments.parquet; pass --corpus DIR (the corpus the sets were labelled on)")
    db = store.connect(uri)
    corpus = Corpus(corpus_dir)
    tracking_uri = runs.tracking_uri_for(data)
    print(f"index {uri}; corpus {corpus_dir} ({len(corpus.frames)} aligned clips, held out by "
          f"{corpus.split['heldout_by']}: {corpus.split['n_heldout_clips']} of "
          f"{corpus.split['n_train_clips'] + corpus.split['n_heldout_clips']})")
    report = {"index_uri": uri, "corpus": str(corpus_dir), "split": corpus.split, "seeds": args.seeds, "sets": []}
    for set_row in set_rows(db, args.sets):
        rows = feature_table(db, set_row["build_id"])
        result = assess(rows, top_peaks(db, set_row, float(set_row["fire_threshold"] or 0.0)), corpus,
                        args.seeds)
        result.update(set_id=set_row["set_id"], kind=set_row["kind"],
                      label_summary=json.loads(set_row["label_summary"] or "{}"))
        print_set(set_row, result, args.seeds)
        summary = result["label_summary"]
        if summary.get("share_validated_chance") is not None:  # the labelling pass' own, same-peaks chance level
            print(f"  index, same held-out peaks as the labelling pass: validated {_fmt(summary['share_validated'])}"
                  f", labels permuted across features {_fmt(summary['share_validated_chance'])} ± "
                  f"{_fmt(summary['share_validated_chance_sd'])} -> "
                  f"{summary['validated_over_chance'] or float('nan'):.1f}x chance")
        if set_row["kind"] == "sae":
            result["sae"] = sae_quality(set_row["sae_run_id"], tracking_uri)
            print_sae(result["sae"])
        report["sets"].append(result)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
