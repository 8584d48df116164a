"""The demo SAE's quality on held-out speech: train `demo_config()` (optionally with another width, k or number of
steps) on a built demo's train activations and splice it into Whisper on every held-out clip of its corpus
(dev and test: 116 in the full demo).

    .venv/bin/python benchmarks/demo_sae.py --data-dir data [--expansion 16 --k 64 --steps 800]

Prints training time, FVU / L0 / dead % on the dev frames, CE recovered, WER original -> spliced, and ΔWER and
ΔCE with their 95% bootstrap intervals over the clips.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from freud_pipeline.activations import ActivationReader
from freud_pipeline.audio.datasets import load_manifest
from freud_pipeline.audio.decode import load_audio
from freud_pipeline.sae.config import demo_config
from freud_pipeline.sae.run import held_out_clips
from freud_pipeline.sae.splice import splice_eval
from freud_pipeline.sae.train import train_sae
from freud_pipeline.whisper.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FREUD_DATA_DIR", "data")))
    parser.add_argument("--expansion", type=int, default=demo_config().expansion_factor)
    parser.add_argument("--k", type=int, default=demo_config().k)
    parser.add_argument("--steps", type=int, default=demo_config().steps)
    parser.add_argument("--clips", type=int, default=128)
    args = parser.parse_args()
    data = args.data_dir
    acts = data / "activations" / "tiny.en" / "default_corpus"
    chosen = held_out_clips(load_manifest(data / "datasets" / "default_corpus" / "manifest.parquet"), args.clips)
    clips = [(load_audio(data / path), text) for path, text in zip(chosen["path"], chosen["transcript"])]
    cfg = demo_config(expansion_factor=args.expansion, k=args.k, steps=args.steps, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        run = train_sae(ActivationReader(acts / "train"), cfg, out_dir=Path(tmp) / "sae",
                        mlflow_tracking_uri=f"sqlite:///{tmp}/mlflow.db", eval_source=ActivationReader(acts / "dev"))
        trained = time.time() - started
        result = splice_eval(load_model("tiny.en", device="cpu"), run.sae.eval(), cfg.hook, clips)
    m = run.metrics
    print(f"{args.expansion}x k {args.k}, {args.steps} steps of {cfg.batch_size} frames: trained in {trained:.0f} s")
    print(f"dev FVU {m['eval/fvu']:.3f}, L0 {m['eval/l0']:.0f}, dead {100 * m['eval/dead_fraction']:.1f}%")
    print(f"{len(clips)} held-out clips: CE recovered {result['ce_recovered']:.3f}, "
          f"WER {result['wer_original']:.3f} -> {result['wer_spliced']:.3f}")
    for name, unit in (("delta_wer", ""), ("delta_ce", " nats/token")):
        print(f"  {name} {result[name]:+.4f}{unit}, 95% CI [{result[name + '_ci_low']:+.4f}, "
              f"{result[name + '_ci_high']:+.4f}]")


if __name__ == "__main__":
    main()
