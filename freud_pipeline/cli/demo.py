"""`freud demo`: materialise the default asset graph into the persistent Dagster instance, then serve the UIs."""

from __future__ import annotations

import time


def demo_run_config(small: bool) -> dict:
    """Run config for the demo job; `small` is a quick look at a subset (also used by the end-to-end test).
    The SAE is `freud_pipeline.sae.demo_config()` either way (topk_sae's defaults); `small` splices it into fewer
    held-out clips."""
    if not small:
        return {}
    return {
        "ops": {
            "asterisk_prompts": {"config": {"limit": 40}},
            "festival_speech": {"config": {"n_sentences": 12}},
            "topk_sae": {"config": {"splice_clips": 4}},
        }
    }


def run_demo(args) -> int:
    import dagster as dg

    from freud_pipeline.cli.services import dagster_home, start_services
    from freud_pipeline.defs.definitions import materialize_default

    home = dagster_home()
    print(f"DAGSTER_HOME={home}")
    started = time.time()
    with dg.DagsterInstance.get() as instance:
        results = materialize_default(demo_run_config(args.small), instance)
    if not results[-1].success:
        print("freud demo: the pipeline failed; see the log above (or the Dagster UI, run id "
              f"{results[-1].run_id}).")
        return 1
    print(f"\nPipeline materialised in {time.time() - started:.0f} s ({len(results)} runs).")
    if args.no_serve:
        return 0
    print("Starting the UIs (the first MLflow start runs its database migrations)...")
    for service in start_services(args.host, args.dagster_port, args.mlflow_port, args.app_port):
        print(f"  {service.name:<8} {service.url}")
    print("They keep running in the background; `freud stop` (or `make stop`) stops them.")
    return 0
