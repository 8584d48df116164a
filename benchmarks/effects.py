"""Cost of feature effects (`features.effects`) on a built demo's SAE set, per 1,000 features, and how the effects
compare with the chance level. Measures the `--features` most frequently firing features (each also ablated along
a random direction, so every one has its own chance control) and scales to 1,000 features at the asset's defaults.
Nothing is written to the index.

    .venv/bin/python benchmarks/effects.py --data-dir data [--features 32 --clips-per-feature 4 --device cpu]

Per-1,000 estimate, from the measured costs: the 1,000 most frequently firing features' ablations on their top
clips (the rest of the encoder after the hook and a teacher-forced decoder pass each, `--batch-size` per batch) +
the blocks up to the hook once per distinct clip of those features (counted from the index) + the asset's fixed
parts at their defaults: 32 chance features' ablations and greedy decoding of 8 features' clips (ΔWER).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from freud_pipeline.features.effects import compute_feature_effects, frequent_features, sae_set_row, top_clips
from freud_pipeline.features.matches import sae_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FREUD_DATA_DIR", "data")))
    parser.add_argument("--set", default=None, help="SAE set id (default: the newest SAE set of the index)")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--clips-per-feature", type=int, default=4)
    parser.add_argument("--wer-features", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    uri = str(args.data_dir / "lancedb")
    set_id = args.set or max(sae_sets(uri), key=lambda r: str(r["created_at"]))["set_id"]
    started = time.perf_counter()
    r = compute_feature_effects(set_id, uri=uri, data_root=args.data_dir, device=args.device,
                                max_features=args.features, clips_per_feature=args.clips_per_feature,
                                wer_features=args.wer_features, chance_features=args.features,
                                batch_size=args.batch_size, write=False)
    wall = time.perf_counter() - started
    rows = r["features"]
    n_rows = r["n_ablations"] + r["n_controls"]
    per_row = (r["ce_seconds"] - r["prefix_seconds"]) / n_rows
    per_clip = r["prefix_seconds"] / r["n_clips"]
    wer_part = 8 * r["wer_seconds"] / max(1, args.wer_features)
    set_row = sae_set_row(set_id, uri)

    def estimate(n_features: int) -> tuple[float, int, int]:
        chosen, _ = top_clips(set_row, frequent_features(set_row, n_features, uri), args.clips_per_feature, uri,
                              args.data_dir)
        ablations = sum(map(len, chosen.values())) + 32 * args.clips_per_feature
        clips = len({c for ids in chosen.values() for c in ids})
        return ablations * per_row + clips * per_clip + wer_part, ablations, clips

    per_1000, ablations_1000, clips_1000 = estimate(1000)
    demo_default = estimate(256)[0]
    ablated = np.array([x["delta_ce"] for x in rows])
    chance = np.array([x["chance_delta_ce"] for x in rows])
    print(f"set {set_id}, device {r['device']} ({torch.get_num_threads()} CPU threads), {len(rows)} features x "
          f"{args.clips_per_feature} clips ({r['n_clips']} distinct clips), batch {args.batch_size}")
    print(f"  loading SAE, Whisper and {r['n_clips']} clips: {r['load_seconds']:.1f} s; wall {wall:.1f} s")
    print(f"  cross-entropy: {r['ce_seconds']:.1f} s for {n_rows} ablations ({r['n_controls']} of them random "
          f"directions): {per_row:.3f} s per ablation + {per_clip:.2f} s per clip for the blocks up to the hook")
    print(f"  ΔWER: {r['wer_seconds']:.1f} s for {args.wer_features} features' clips ({wer_part / 8:.2f} s per "
          "feature)")
    print(f"  estimate at the asset's defaults (32 chance features, 8 ΔWER features): {per_1000:.0f} s per 1,000 "
          f"features ({per_1000 / 60:.1f} min: {ablations_1000} ablations on {clips_1000} clips); the asset's default "
          f"256 features: {demo_default:.0f} s")
    print(f"  effects: mean ΔCE {ablated.mean():+.4f} nats/token, mean |ΔCE| {np.abs(ablated).mean():.4f}; "
          f"random directions of the same norm: mean {chance.mean():+.4f}, mean |ΔCE| {np.abs(chance).mean():.4f}, "
          f"95th percentile |ΔCE| {r['chance']['abs_p95']:.4f}")
    print(f"  features whose |ΔCE| exceeds their own random control's: {(np.abs(ablated) > np.abs(chance)).mean():.0%}; "
          f"whose ΔCE exceeds the chance 95th percentile: {r['share_above_chance']:.0%}; largest ΔCE: "
          + ", ".join(f"{x['feature']} {x['delta_ce']:+.4f}" for x in sorted(rows, key=lambda x: -x["delta_ce"])[:5]))
    measured = [x for x in rows if x["delta_wer"] is not None]
    print("  ΔWER of the largest ΔCE: " + ", ".join(f"{x['feature']} {100 * x['delta_wer']:+.1f} points"
                                                     for x in measured))


if __name__ == "__main__":
    main()
