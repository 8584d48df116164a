"""`freud effects SET_ID [--sort effect|feature] [--ascending] [--limit N] [--feature F] [--json]`: which features
matter for the transcript.

Reads the stored feature effects (`features.effect_store`, computed by the `sae_feature_effects` asset): each
measured feature's ΔCE when it alone is ablated (nats per transcript token, mean over its top clips, with its
interval), ΔWER where measured, and the set's chance level (ablating random directions of the same norm). With
`--json`: {"summary": the set's computation and chance level, "effects": the rows}, strict JSON (NaN as null).
Errors (exit 2, one line): an unknown set, a feature out of range, no effects computed yet.
"""

from __future__ import annotations

import json

from freud_pipeline.cli.features import jsonable, open_index
from freud_pipeline.errors import FreudError

COMPUTE_HINT = ("materialise the sae_feature_effects asset (Dagster UI, or `dagster asset materialize -m "
                "freud_pipeline.defs.definitions --select sae_feature_effects`; config set_id, features, max_features)")


def _signed(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def effects(args) -> int:
    from freud_pipeline.features import effect_store

    if args.limit < 1:
        raise FreudError(f"--limit must be a positive number of rows, not {args.limit}")
    index = open_index(args.index_uri)
    features = [args.feature] if args.feature is not None else None
    if features:
        effect_store.effects(args.set_id, features, uri=index.uri)  # an unknown set or a bad feature: said first
    summary = effect_store.effect_summary(args.set_id, uri=index.uri)
    if summary is None:
        raise FreudError(f"no feature effects computed for set {args.set_id!r} yet: {COMPUTE_HINT}")
    if features:
        rows = effect_store.effects(args.set_id, features, uri=index.uri)
    elif args.sort == "effect":
        rows = effect_store.features_by_effect(args.set_id, args.limit, descending=not args.ascending, uri=index.uri)
    else:
        rows = effect_store.effects(args.set_id, uri=index.uri)[: args.limit]
    if args.json:
        print(json.dumps(jsonable({"summary": summary, "effects": rows}), indent=1, allow_nan=False))
        return 0
    stale = "" if summary["current"] else " (computed on an earlier build of the set)"
    print(f"set {args.set_id}: {summary['n_features']} feature(s) measured on up to {summary['clips_per_feature']} top "
          f"clips each, {summary['computed_at']:%Y-%m-%d %H:%M} UTC{stale}")
    print(f"  ΔCE: nats per transcript token when the feature alone is ablated (baseline the original model); "
          f"chance (random directions, {summary['chance_n'] or 0} features): {_signed(summary['chance_delta_ce'])} "
          f"[{_signed(summary['chance_ci_low'])}, {_signed(summary['chance_ci_high'])}], 95% of |ΔCE| below "
          f"{_signed(summary['chance_abs_p95']).lstrip('+')}")
    if not rows:
        print(f"  feature {args.feature}: not measured (rerun sae_feature_effects with features: [{args.feature}])"
              if features else "  no feature measured")
        return 0
    threshold = summary["chance_abs_p95"]
    print(f"{'feature':>8}  {'ΔCE':>8}  {'95% CI':<20}  {'clips':>5}  {'ΔWER':>6}  above chance")
    for r in rows:
        above = threshold is not None and r["delta_ce"] is not None and r["delta_ce"] > threshold
        interval = f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]"
        print(f"{r['feature']:>8}  {_signed(r['delta_ce']):>8}  {interval:<20}  {r['n_clips']:>5}  "
              f"{_signed(r['delta_wer'], 3):>6}  {'yes' if above else 'no'}")
    return 0


def add_parser(sub) -> None:
    """Register `freud effects` on the `freud` subparsers."""
    p = sub.add_parser("effects", help="each SAE feature's effect on the transcript when ablated (ΔCE, ΔWER), "
                                       "largest first, against chance")
    p.add_argument("set_id", metavar="SET_ID", help="SAE feature set id (see `freud sets`)")
    p.add_argument("--sort", nargs="?", const="effect", default="effect", choices=("effect", "feature"),
                   help="order: by ΔCE, largest first (default), or by feature index")
    p.add_argument("--ascending", action="store_true", help="with --sort effect: smallest ΔCE first")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rows (default 50)")
    p.add_argument("--feature", type=int, default=None, metavar="F", help="only this feature")
    p.add_argument("--index-uri", default=None, metavar="URI",
                   help="LanceDB feature index (default: $FREUD_LANCEDB_URI or <data dir>/lancedb)")
    p.add_argument("--json", action="store_true", help="print the summary and the rows as JSON (NaN as null)")
    p.set_defaults(func=effects)
