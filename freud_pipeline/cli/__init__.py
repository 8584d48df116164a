"""The `freud` command: transcribe, list hooks, run the demo pipeline, serve the app, query the feature index,
import an SAE."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from freud_pipeline.errors import FreudError
from freud_pipeline.objectstore import configure_environment


def _transcribe(args) -> int:
    import whisper

    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.whisper.models import load_model

    audio = load_audio(args.audio)  # before the model: a bad file is reported at once
    model = load_model(args.model, device=args.device)
    result = whisper.transcribe(model, audio, fp16=model.device.type == "cuda", language="en" if not model.is_multilingual else None)
    print(result["text"].strip())
    return 0


def _hooks(args) -> int:
    from freud_pipeline.whisper.hooks import hook_points
    from freud_pipeline.whisper.models import load_model

    model = load_model(args.model)
    points = hook_points(model)
    if args.json:
        print(json.dumps({name: list(shape) for name, shape in points.items()}, indent=1))
    else:
        print(f"{model.freud_name}: {len(points)} hook points (shape per 30 s window: frames x width)")
        for name, shape in points.items():
            print(f"  {name:<28} {shape[0]} x {shape[1]}")
    return 0


def _demo(args) -> int:
    from freud_pipeline.cli.demo import run_demo

    return run_demo(args)


def _collect(args) -> int:
    import dagster as dg

    from freud_pipeline import validation
    from freud_pipeline.cli.legacy_config import read_run_config

    # Checked before Dagster starts a run: a bad file or hook name is one line, and no output is created.
    # An original FREUD JSON config is translated: its YAML equivalent printed, fields with no equivalent named.
    run, translation = read_run_config(args.config)
    if translation is not None:
        print(translation.yaml())
        for warning in translation.warnings:
            print(f"freud: warning: {args.config}: {warning}", file=sys.stderr)
    validation.check_run_config(run, args.config)

    from freud_pipeline.cli.services import dagster_home
    from freud_pipeline.defs.definitions import defs
    from freud_pipeline.defs.runner import check_asset_config, materialize_asset

    if args.dry_run:
        check_asset_config(defs, run["asset"], run.get("partition"), run.get("config"))
        if translation is None:
            import yaml

            print(yaml.safe_dump(run, sort_keys=False), end="")
        print(f"{args.config}: valid config of {run['asset']}"
              f"{'/' + run['partition'] if run.get('partition') else ''} (dry run: nothing materialised)")
        return 0
    dagster_home()
    with dg.DagsterInstance.get() as instance:
        result = materialize_asset(defs, run["asset"], run.get("partition"), run.get("config"), instance)
    print(f"{run['asset']}{'/' + run['partition'] if run.get('partition') else ''}: "
          f"{'materialised' if result.success else 'FAILED'} (run {result.run_id})")
    return 0 if result.success else 1


def _import_sae(args) -> int:
    import os
    from pathlib import Path

    from freud_pipeline.cli.features import print_json
    from freud_pipeline.features.runs import tracking_uri_for
    from freud_pipeline.sae.importing import (corpus_activations, import_sae, index_imported_sae,
                                              read_foreign_checkpoint)
    from freud_pipeline.settings import data_dir

    root = Path(args.data_dir).expanduser().resolve() if args.data_dir else data_dir()
    loaded = read_foreign_checkpoint(args.path, hook=args.hook, model=args.model)
    _, provenance = loaded
    if not args.no_index:  # before anything is written: missing activations are one line, and nothing is created
        corpus_activations(root, provenance["model"], provenance["hook"])
    result = import_sae(args.path, tracking_uri=args.tracking_uri or tracking_uri_for(root), runs_dir=root / "sae",
                        loaded=loaded)
    out = {**result.summary(), "set_id": None, "n_features": None, "n_clips": None}
    if not args.no_index:
        index_uri = args.index_uri or os.environ.get("FREUD_LANCEDB_URI") or str(root / "lancedb")
        summary = index_imported_sae(result, data_root=root, index_uri=index_uri, set_id=args.set_id)
        out |= {"set_id": summary["set_id"], "n_features": summary["n_features"], "n_clips": summary["n_clips"],
                "index_uri": index_uri}
    if args.json:
        print_json(out)
        return 0
    print(f"{provenance['source']}: {provenance['layout']} {provenance['source_architecture']} SAE, "
          f"{result.sae.n_latents} latents on {result.model} {result.hook}, imported as our {result.architecture}")
    print(f"  run {result.run_id} in {result.checkpoint_dir}")
    print(f"  registered as {out['registered_model']} version {out['model_version']}")
    if out["set_id"]:
        print(f"  feature set {out['set_id']}: {out['n_features']} features over {out['n_clips']} clips "
              f"(browse it: freud feature --set {out['set_id']} --index 0, or the app)")
    return 0


def _app(args) -> int:
    from dash_app import main as app_main

    return app_main(["--host", args.host, "--port", str(args.port)]
                    + (["--data-dir", args.data_dir] if args.data_dir else [])
                    + (["--allowed-hosts", args.allowed_hosts] if args.allowed_hosts else [])
                    + (["--workers", str(args.workers)] if args.workers else [])
                    + (["--threads", str(args.threads)] if args.threads else [])
                    + (["--background-threads", str(args.background_threads)] if args.background_threads else []))


def _stop(args) -> int:
    from freud_pipeline.cli.services import stop_services

    stop_services()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freud", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="print Whisper's transcript of an audio file")
    p.add_argument("audio")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_transcribe)

    p = sub.add_parser("hooks", help="list hook points and their shapes")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_hooks)

    p = sub.add_parser("demo", help="materialise the whole pipeline on the embedded data, then serve the UIs")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface of the three UIs (default 127.0.0.1; Dagster's UI checks no Host header, see "
                        "docs/OPERATING.md, Security)")
    p.add_argument("--dagster-port", type=int, default=3000)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--app-port", type=int, default=8050)
    p.add_argument("--no-serve", action="store_true", help="materialise only")
    p.add_argument("--small", action="store_true", help="a small subset of the data, for a quick look")
    p.set_defaults(func=_demo)

    p = sub.add_parser("collect", help="materialise an asset from a config file (configs/features/*.yaml; the "
                                       "original FREUD's JSON configs too)")
    p.add_argument("--config", required=True)
    p.add_argument("--dry-run", action="store_true", help="check the config and print it; materialise nothing")
    p.set_defaults(func=_collect)

    p = sub.add_parser("import-sae", help="import an SAE (SAELens or dictionary_learning layout, or the original "
                                          "FREUD's .pth): register it in MLflow and build its feature set")
    p.add_argument("path", help="a checkpoint directory (cfg.json + sae_weights.safetensors, or ae.pt + config.json) "
                                "or an original FREUD .pth")
    p.add_argument("--hook", default=None, help="the Whisper hook point it reads (default: from its config)")
    p.add_argument("--model", default=None, help="the Whisper model (default: from its config)")
    p.add_argument("--set-id", default=None, help="the feature set's id (default <model>/<hook>/sae-imported-...)")
    p.add_argument("--no-index", action="store_true", help="import and register only; build no feature set")
    p.add_argument("--data-dir", default=None, help="the data directory (default: settings.data_dir())")
    p.add_argument("--index-uri", default=None, metavar="URI", help="LanceDB feature index (default: the data "
                                                                    "directory's, or $FREUD_LANCEDB_URI)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else the "
                                                        "data directory's mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_import_sae)

    p = sub.add_parser("app", help="serve the Dash app in the foreground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="Host names answered besides loopback and --host (default env FREUD_APP_ALLOWED_HOSTS)")
    p.add_argument("--workers", type=int, default=None,
                   help="gunicorn worker processes (default 2, env FREUD_APP_WORKERS; 1: Flask's threaded server)")
    p.add_argument("--threads", type=int, default=None, help="request threads per worker (default 4)")
    p.add_argument("--background-threads", type=int, default=None,
                   help="threads per worker for uploads' inference and edits (default 2, env "
                        "FREUD_APP_BACKGROUND_THREADS)")
    p.set_defaults(func=_app)

    p = sub.add_parser("stop", help="stop the UIs started by `freud demo`")
    p.set_defaults(func=_stop)

    from freud_pipeline.cli.features import add_parsers as add_feature_parsers

    add_feature_parsers(sub)  # top-features, top-examples, feature, sets
    from freud_pipeline.cli.effects import add_parser as add_effects_parser

    add_effects_parser(sub)  # effects
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_environment()  # the S3 endpoint under every library's name, inherited by the services it starts
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FreudError as exc:
        print(f"freud: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"freud: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
