"""`freud top-features | top-examples | typical-examples | feature | sets | stability | counterparts`: the feature index from the shell.

Pure wrappers over `freud_pipeline.features.FeatureIndex`. With `--json` each command prints exactly what the
query API returns (a list, or a dict for `feature`), made strict JSON: NaN/inf become null, timestamps ISO 8601
strings. Per-frame traces are left out unless `--traces` is given (a 30 s clip is 1,500 values per row).
Bad input (unknown set, index out of range, unreadable audio) is a FreudError: one line on stderr, exit code 2.
`top-features` leaves artefact features (clip onset, silence, ...) out unless `--artefacts` is given: such a
feature tops almost every clip and tells nothing about this one. Every row carries its label's quality fields.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import date, datetime
from pathlib import Path
from typing import Any

from freud_pipeline.errors import FreudError

TRACE_KEYS = ("trace",)


# ---------------------------------------------------------------- output helpers


def jsonable(value: Any) -> Any:
    """Strict-JSON form of a query result: NaN/inf -> None, numpy -> Python, datetimes -> ISO strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
    if np is not None:
        if isinstance(value, np.ndarray):
            return jsonable(value.tolist())
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return jsonable(float(value))
    return str(value)


def _drop_traces(rows: list[dict], keep: bool) -> list[dict]:
    if keep:
        return rows
    return [{k: v for k, v in row.items() if k not in TRACE_KEYS} for row in rows]


def print_json(data: Any) -> None:
    print(json.dumps(jsonable(data), indent=1, allow_nan=False))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _shorten(text: Any, width: int) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ---------------------------------------------------------------- the index


def open_index(uri: str | None):
    """A FeatureIndex at `uri` (default settings.lancedb_uri()); a missing local directory is a clear error
    instead of an empty index created on the fly."""
    from freud_pipeline.features import FeatureIndex
    from freud_pipeline.settings import lancedb_uri

    uri = uri or lancedb_uri()
    if "://" not in uri and not Path(uri).is_dir():
        raise FreudError(f"no feature index at {uri}: build feature sets first (`freud demo` or `freud collect`) "
                         f"or pass --index-uri DIR")
    return FeatureIndex(uri)


# ---------------------------------------------------------------- commands


def top_features(args) -> int:
    from freud_pipeline.audio.decode import load_audio

    index = open_index(args.index_uri)
    audio = load_audio(args.audio)
    # checks the set before loading Whisper
    rows = index.clip_features(audio, args.set, n=args.n, include_artefacts=args.artefacts)
    if args.json:
        print_json(_drop_traces(rows, args.traces))
        return 0
    left_out = "" if args.artefacts else "; artefact features left out (--artefacts shows them)"
    print(f"{args.audio}: top {len(rows)} features of set {args.set} (by maximum over the clip{left_out})")
    body = [[str(r + 1), str(row["index"]), _fmt(row["value"]), f"{row['peak_time_s']:.2f}", *label_cells(row)]
            for r, row in enumerate(rows)]
    print(_table(["rank", "index", "value", "peak_s", "label", "kind", "lift", "held-out"], body,
                 right={0, 1, 2, 3, 6, 7}))
    return 0


def label_cells(row: dict) -> list[str]:
    """label, kind, lift, held-out precision (of n peaks) of a feature row; "unlabelled" when nothing passed."""
    if not row.get("label"):
        return ["unlabelled" if row.get("label_reason") else "-", "-", "-", "-"]
    held = row.get("label_heldout_precision")
    return [str(row["label"]), _fmt(row.get("label_kind")), _fmt(row.get("label_lift"), 3),
            "-" if held is None else f"{_fmt(held, 2)} of {_fmt(row.get('label_heldout_n'))}"]


def top_examples(args) -> int:
    index = open_index(args.index_uri)
    rows = index.top_examples(args.set, args.index, n=args.n, min_value=args.min_value, max_value=args.max_value,
                              absolute=args.absolute)
    if args.json:
        print_json(_drop_traces(rows, args.traces))
        return 0
    what = "|peak|" if args.absolute else "peak"
    bounds = "".join(f", {name} {value:g}" for name, value in (("min", args.min_value), ("max", args.max_value))
                     if value is not None)
    print(f"set {args.set}, feature {args.index}: {len(rows)} clip(s) ranked by {what}{bounds}")
    if not rows:
        return 0
    body = [[str(row["rank"]), row["clip_id"], _fmt(row["value"]), row["sign"], f"{row['peak_time_s']:.2f}",
             _fmt(row["duration_s"], 3), _shorten(row["transcript"], 48)] for row in rows]
    print(_table(["rank", "clip_id", "value", "sign", "peak_s", "dur_s", "transcript"], body, right={0, 2, 4, 5}))
    return 0


def typical_examples(args) -> int:
    index = open_index(args.index_uri)
    rows = index.typical_examples(args.set, args.index, per_level=args.per_level)
    if args.json:
        print_json(rows)
        return 0
    print(f"set {args.set}, feature {args.index}: {len(rows)} clip(s) drawn across {len({r['level'] for r in rows})} "
          "level(s) of its peak (octaves), strongest level first")
    if not rows:
        print("none stored: no clip fired, or the set was built before examples across levels were sampled")
        return 0
    body = [[f"{_fmt(row['low'])}-{_fmt(row['high'])}", row["clip_id"], _fmt(row["value"]),
             f"{row['peak_time_s']:.2f}", _fmt(row["duration_s"], 3), _shorten(row["transcript"], 48)] for row in rows]
    print(_table(["level", "clip_id", "value", "peak_s", "dur_s", "transcript"], body, right={2, 3, 4}))
    return 0


def feature(args) -> int:
    index = open_index(args.index_uri)
    info = index.feature(args.set, args.index)
    if args.json:
        print_json(info)
        return 0
    stats = info["stats"]
    print(f"set {info['set_id']} ({info['kind']}), feature {info['index']}")
    label, kind, lift, held = label_cells(info)
    lines = [
        ("label", f"{label} ({kind})" if info.get("label") else label),
        ("evidence", _fmt(info.get("label_reason"))),
        ("lift / p (Bonferroni)", f"{lift} / {_fmt(info.get('label_p_value'), 2)}"),
        ("held-out precision", held + (" (validated)" if info.get("label_validated") else "")),
        ("label precision/recall/F1", " / ".join(_fmt(info.get(k), 3) for k in
                                                ("label_precision", "label_recall", "label_f1"))),
        ("word label", f"{_fmt(info.get('word_label'))} (precision {_fmt(info.get('word_precision'), 3)})"),
        ("density", f"{_fmt(stats.get('density'))} (frames > {_fmt(stats.get('fire_threshold'))})"),
        ("mean", _fmt(stats.get("mean"))),
        ("min / max", f"{_fmt(stats.get('min'))} / {_fmt(stats.get('max'))}"),
        ("quantiles", ", ".join(f"q{k}={_fmt(v)}" for k, v in (stats.get("quantiles") or {}).items()) or "-"),
        ("examples (top / bottom)", f"{_fmt(stats.get('n_top'))} / {_fmt(stats.get('n_bottom'))}"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"  {key:<{width}}  {value}")
    return 0


def sets(args) -> int:
    index = open_index(args.index_uri)
    rows = index.sets()
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no feature sets in {index.uri}")
        return 0
    def validated(row: dict) -> str:  # share of features with a held-out-validated phone or class label
        summary = row.get("label_summary") or {}
        share, chance = summary.get("share_validated"), summary.get("share_validated_chance")
        if share is None:
            return "-"
        return f"{share:.1%}" + (f" (chance {chance:.1%})" if chance is not None else "")

    def covered(row: dict) -> str:  # datasets and hours the set covers
        coverage = row.get("coverage")
        if not coverage:
            return "-"
        return f"{', '.join(coverage['datasets'])} ({coverage['hours']:.2f} h, {len(coverage['partitions'])} parts)"

    body = [[row["set_id"], _fmt(row["model"]), _fmt(row["hook"]), row["kind"], str(row["n_features"]),
             _fmt(row.get("n_clips")), validated(row), covered(row),
             row["created_at"].strftime("%Y-%m-%d %H:%M") if row.get("created_at") else "-"]
            for row in rows]
    print(_table(["set_id", "model", "hook", "kind", "features", "clips", "validated labels", "covers",
                  "updated (UTC)"], body, right={4, 5, 6}))
    return 0


def stability(args) -> int:
    """The recorded seed-stability studies (`features.matches.seed_stability`): one row per pair of seeds."""
    from freud_pipeline.features.matches import seed_stability

    index = open_index(args.index_uri)
    rows = seed_stability(index.uri)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no seed-stability study in {index.uri}: run `freud collect --config "
              "configs/train/demo_seed_stability.yaml` (needs the demo's activations)")
        return 0
    for row in rows:
        print(f"study {row['study_id'][:8]} ({row['created_at']:%Y-%m-%d %H:%M} UTC): {row['model']} {row['hook']} "
              f"{row['architecture']}, {row['n_latents']} latents, {row['steps']} steps; seed {row['seed_a']} "
              f"(run {row['run_a'][:8]}) vs seed {row['seed_b']} (run {row['run_b'][:8]})")
        body = [[f"{c['threshold']:g}", f"{c['share_matched']:.1%}", f"{c['chance']:.1%}"] for c in row["curve"]]
        body.append(["mean cosine", _fmt(row["mean_cosine"], 3), _fmt(row["chance_mean_cosine"], 3)])
        print(_table(["cosine >=", "share matched", "chance (random)"], body, right={1, 2}))
    return 0


def counterparts(args) -> int:
    """A feature's closest counterparts in the other indexed SAE sets (`features.matches.counterparts`)."""
    from freud_pipeline.features.matches import counterparts as find

    index = open_index(args.index_uri)
    rows = find(args.set_id, args.feature, uri=index.uri)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"set {args.set_id}, feature {args.feature}: no counterparts stored (they need another indexed SAE "
              "set of the same model and width, and the sae_counterparts asset)")
        return 0
    print(f"set {args.set_id}, feature {args.feature}: closest features in other SAE sets (decoder cosine)")
    print(_table(["set", "index", "cosine", "rank"],
                 [[r["set_id"], str(r["index"]), f"{r['cosine']:.3f}", str(r["rank"])] for r in rows],
                 right={1, 2, 3}))
    return 0


# ---------------------------------------------------------------- argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, traces: bool = False) -> None:
    p.add_argument("--index-uri", default=None, metavar="URI",
                   help="LanceDB feature index (default: settings.lancedb_uri(), i.e. $FREUD_LANCEDB_URI or "
                        "<data dir>/lancedb)")
    p.add_argument("--json", action="store_true", help="print the query result as JSON (NaN as null)")
    if traces:
        p.add_argument("--traces", action="store_true",
                       help="include per-frame traces (one value per 20 ms frame) in the JSON")


def add_parsers(sub) -> None:
    """Register the feature-index subcommands on the `freud` subparsers."""
    p = sub.add_parser("top-features", help="features most active on an audio file (runs Whisper)")
    p.add_argument("audio", help="an audio file (anything ffmpeg decodes; .g722 is raw G.722)")
    p.add_argument("--set", required=True, help="feature set id (see `freud sets`)")
    p.add_argument("--n", type=_positive_int, default=32, help="how many features (default 32)")
    p.add_argument("--artefacts", action="store_true",
                   help="include artefact features (labelled e.g. 'clip onset'; left out by default: they top "
                        "almost every clip and say nothing about it)")
    _common(p, traces=True)
    p.set_defaults(func=top_features)

    p = sub.add_parser("top-examples", help="clips ranked by a feature's peak")
    p.add_argument("--set", required=True, help="feature set id (see `freud sets`)")
    p.add_argument("--index", type=int, required=True, help="feature index within the set")
    p.add_argument("--n", type=_positive_int, default=20, help="how many clips (default 20)")
    p.add_argument("--min", dest="min_value", type=_finite_float, default=None, metavar="V",
                   help="keep clips whose signed peak is >= this")
    p.add_argument("--max", dest="max_value", type=_finite_float, default=None, metavar="V",
                   help="keep clips whose signed peak is <= this")
    p.add_argument("--absolute", action="store_true",
                   help="rank by |peak| over the top and bottom lists (with --max 0: most negative clips)")
    _common(p, traces=True)
    p.set_defaults(func=top_examples)

    p = sub.add_parser("typical-examples", help="clips drawn across a feature's activation levels (per octave of "
                                                "its peak), not only the strongest")
    p.add_argument("--set", required=True, help="feature set id (see `freud sets`)")
    p.add_argument("--index", type=int, required=True, help="feature index within the set")
    p.add_argument("--per-level", type=_positive_int, default=2, help="clips per level (default 2, as stored)")
    _common(p)
    p.set_defaults(func=typical_examples)

    p = sub.add_parser("feature", help="a feature's statistics, label and its quality (lift, significance, "
                                       "held-out precision)")
    p.add_argument("--set", required=True, help="feature set id (see `freud sets`)")
    p.add_argument("--index", type=int, required=True, help="feature index within the set")
    _common(p)
    p.set_defaults(func=feature)

    p = sub.add_parser("sets", help="list the feature sets in the index")
    _common(p)
    p.set_defaults(func=sets)

    p = sub.add_parser("stability", help="seed stability of the SAE recipe: share of features matched across seeds "
                                         "against two random dictionaries (chance)")
    _common(p)
    p.set_defaults(func=stability)

    p = sub.add_parser("counterparts", help="a feature's closest features (decoder cosine) in the other SAE sets")
    p.add_argument("set_id", metavar="SET_ID", help="feature set id (see `freud sets`)")
    p.add_argument("feature", metavar="FEATURE", type=int, help="feature index within the set")
    _common(p)
    p.set_defaults(func=counterparts)
