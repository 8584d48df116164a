"""Seed stability of the SAE recipe, and counterparts of SAE features across the indexed SAEs.

`sae_seed_stability` (on request: `freud collect --config configs/train/demo_seed_stability.yaml`; it trains
the recipe once per extra seed, so `make demo` leaves it out) trains the SAE config of `topk_sae` with each of
`seeds`, matches every pair one-to-one by decoder cosine (`sae.matching.seed_stability`) and reports the share of
features with a counterpart at or above each threshold against two random dictionaries of the same shapes. The
first seed reuses the registered champion when it was trained with the same recipe (every TrainConfig field but
the operational ones in `OPERATIONAL`) on the same selection (`freud.selection_digest`); otherwise it is trained
too. Seed runs go through `train_sae`, not `run_sae`: they are neither splice-evaluated, gated, registered nor
promoted (they exist to be compared, not used), and live under `sae/seed_stability/<model>-<hook>-<arch>/<run id>`,
outside the directory the retention rule prunes. One MLflow parent run ("seed-stability-...", tag
`freud.kind=seed_stability`) holds the metrics `seed_stability/share_matched_<t>` (mean over pairs),
`seed_stability/chance_<t>`, `seed_stability/mean_cosine` and `seed_stability/chance_mean_cosine`; the seed runs
are its children. LanceDB gets one `seed_stability` row per pair and the pairs' one-to-one matches
(`feature_matches`, kind "seed").

`sae_counterparts` (eager after `sae_feature_index`, like the index after a new SAE) stores, for every pair of
indexed SAE sets of one model and width, each feature's closest features in the other set
(`features.matches.build_counterparts`; two 6144-latent sets: 1-3 s per ordered pair). Its check verifies that
every stored counterpart's set exists.
"""

from pathlib import Path

import dagster as dg
import pandas as pd

from freud_pipeline.defs.resources import FreudStorage, MlflowTracking
from freud_pipeline.defs.sae import SaeAssetConfig, run_config, training_selection
from freud_pipeline.defs.schedules import INDEX_AUTOMATION
from freud_pipeline.features import matches
from freud_pipeline.features.runs import run_url
from freud_pipeline.sae.config import TrainConfig
from freud_pipeline.sae.matching import THRESHOLDS

STUDY_TAG = "freud.seed_stability"  # the parent run's id, on every seed run of the study
# TrainConfig fields that do not change the trained weights: a champion differing only in these is the recipe.
OPERATIONAL = {"device", "bf16", "log_every", "eval_every", "eval_batches", "checkpoint_every"}


class SeedStabilityConfig(SaeAssetConfig):
    """The SAE config of `topk_sae` (its recipe), the seeds to train it with and the cosine thresholds reported."""

    seeds: list[int] = [0, 1]
    thresholds: list[float] = list(THRESHOLDS)
    reuse_champion: bool = True  # the first seed: the registered champion, when it is this recipe on this data


def recipe_fields() -> list[str]:
    return [name for name in TrainConfig.model_fields if name not in OPERATIONAL]


def reusable_champion(client, recipe: TrainConfig, selection_digest: str) -> tuple[dict | None, str]:
    """(the champion of recipe's registered model as {run_id, checkpoint_dir, sha256}, why) when it was trained
    with `recipe` (its seed included) on the selection with this digest and its checkpoint is on disk; else
    (None, why not)."""
    from freud_pipeline.sae.registry import champion_version, registered_model_name
    from freud_pipeline.sae.run import SELECTION_TAG

    name = registered_model_name(recipe.model_name, recipe.hook, recipe.architecture)
    version = champion_version(client, name)
    if version is None:
        return None, f"{name} has no champion"
    run = client.get_run(version.run_id)
    if run.data.tags.get(SELECTION_TAG) != selection_digest:
        return None, f"champion run {version.run_id[:8]} trained on other data"
    params = run.data.params
    differ = [f for f in recipe_fields() if params.get(f) != str(getattr(recipe, f))]
    if differ:
        return None, f"champion run {version.run_id[:8]} differs in " + ", ".join(
            f"{f} ({params.get(f)} vs {getattr(recipe, f)})" for f in differ)
    directory = version.tags.get("checkpoint_dir")
    sha256 = version.tags.get("checkpoint_sha256") or run.data.tags.get("checkpoint_sha256")
    if not directory or not Path(directory).is_dir():
        return None, f"champion run {version.run_id[:8]} has no checkpoint on disk"
    return {"run_id": version.run_id, "checkpoint_dir": directory, "sha256": sha256}, \
        f"champion run {version.run_id[:8]} (version {version.version}) is this recipe on this data"


def _metrics(study: dict) -> dict[str, float]:
    out = {}
    for t in study["thresholds"]:
        out[f"seed_stability/share_matched_{t:g}"] = study["mean"]["shares"][t]
        out[f"seed_stability/chance_{t:g}"] = study["chance"]["shares"][t]
    out["seed_stability/mean_cosine"] = study["mean"]["mean_cosine"]
    out["seed_stability/chance_mean_cosine"] = study["chance"]["mean_cosine"]
    out["seed_stability/n_pairs"] = float(len(study["pairs"]))
    return out


@dg.asset(group_name="sae", kinds={"pytorch", "mlflow", "lancedb"}, pool="model",
          description="Seed stability of the SAE recipe: trained once per seed, features matched one-to-one by "
                      "decoder cosine; the share matched at each threshold against two random dictionaries' "
                      "(chance), in MLflow and LanceDB. On request (it trains the recipe again).")
def sae_seed_stability(context: dg.AssetExecutionContext, config: SeedStabilityConfig, storage: FreudStorage,
                       mlflow: MlflowTracking, activations: dict) -> dict:
    from freud_pipeline.features.build import decoder_directions
    from freud_pipeline.sae.checkpoint import load_verified
    from freud_pipeline.sae.matching import seed_stability
    from freud_pipeline.sae.run import SELECTION_TAG, selection_inputs
    from freud_pipeline.sae.tracking import TrainingRun, log_datasets
    from freud_pipeline.sae.train import train_sae

    seeds = list(dict.fromkeys(config.seeds))
    if len(seeds) < 2:
        raise dg.Failure(f"seed stability needs at least two different seeds, got {config.seeds}")
    model, selection = training_selection(config, storage, activations)
    recipe = run_config(config, model).train_config().model_copy(update={"seed": seeds[0]})
    context.log.info(f"seed stability of {recipe.architecture} {recipe.hook} on {selection.describe()}, seeds {seeds}")
    client = mlflow.client()
    reused, why = reusable_champion(client, recipe, selection.digest) if config.reuse_champion else (None, "off")
    context.log.info(f"seed {seeds[0]}: {'reusing the ' if reused else 'training: '}{why}")
    out_root = storage.path("sae", "seed_stability", f"{model}-{recipe.hook}-{recipe.architecture}")
    tags = {matches.STUDY_KIND_TAG: matches.STUDY_KIND, "model": model, "hook": recipe.hook,
            "architecture": recipe.architecture, SELECTION_TAG: selection.digest, "dagster_run_id": context.run_id}
    runs, directions = {}, {}
    with TrainingRun(mlflow.uri, mlflow.experiment, f"seed-stability-{recipe.architecture}-{recipe.hook}",
                     tags) as parent:
        parent.log_params({**{f: getattr(recipe, f) for f in recipe_fields() if f != "seed"},
                           "seeds": seeds, "thresholds": config.thresholds, "selection_digest": selection.digest})
        for seed in seeds:
            if seed == seeds[0] and reused:
                sae, runs[seed] = load_verified(reused["checkpoint_dir"], reused["sha256"]), reused["run_id"]
            else:
                cfg = recipe.model_copy(update={"seed": seed, "checkpoint_every": 0})
                trained = train_sae(selection.train_source(), cfg, out_dir=lambda run_id: out_root / run_id,
                                    mlflow_tracking_uri=mlflow.uri, experiment=mlflow.experiment,
                                    run_name=f"seed{seed}-{recipe.architecture}-{recipe.hook}",
                                    tags={"mlflow.parentRunId": parent.run_id, STUDY_TAG: parent.run_id,
                                          "seed": str(seed), SELECTION_TAG: selection.digest,
                                          "dagster_run_id": context.run_id},
                                    eval_source=selection.eval_source())
                log_datasets(client, trained.run_id, selection_inputs(selection))
                sae, runs[seed] = trained.sae, trained.run_id
                fvu = trained.metrics.get("eval/fvu", float("nan"))
                context.log.info(f"seed {seed}: run {trained.run_id}, FVU {fvu:.3f}")
            directions[seed] = decoder_directions(sae)
        study = seed_stability(directions, config.thresholds)
        parent.log_params({f"run_seed_{seed}": run_id for seed, run_id in runs.items()}
                          | {"reused_champion": reused["run_id"] if reused else "",
                             "n_latents_resolved": study["n_latents"]})
        parent.log_metrics(_metrics(study), recipe.steps)
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    rows = [{"study_id": parent.run_id, "model": model, "hook": recipe.hook, "architecture": recipe.architecture,
             "n_latents": study["n_latents"], "d_in": study["d_in"], "steps": recipe.steps,
             "seed_a": p["seed_a"], "seed_b": p["seed_b"], "run_a": runs[p["seed_a"]], "run_b": runs[p["seed_b"]],
             "thresholds": study["thresholds"], "share_matched": [p["shares"][t] for t in study["thresholds"]],
             "chance": [study["chance"]["shares"][t] for t in study["thresholds"]],
             "mean_cosine": p["mean_cosine"], "chance_mean_cosine": study["chance"]["mean_cosine"],
             "mlflow_run_id": parent.run_id, "experiment_id": experiment_id,
             "recipe": recipe.model_dump(exclude={"seed"})} for p in study["pairs"]]
    matches.write_seed_stability(rows, storage.index_uri)
    for p in study["pairs"]:
        match = p["match"]
        matches.write_matches(matches.run_set(runs[p["seed_a"]]), matches.run_set(runs[p["seed_b"]]),
                              match.counterpart, match.cosine, kind="seed", one_to_one=True, uri=storage.index_uri)
    curve = pd.DataFrame([{"threshold": t, "share matched": study["mean"]["shares"][t],
                           "chance (random dictionaries)": study["chance"]["shares"][t]} for t in study["thresholds"]])
    url = run_url({"experiment_id": experiment_id, "run_id": parent.run_id})
    context.add_output_metadata({**_metrics(study), "mlflow_run": dg.MetadataValue.url(url),
                                 "curve": dg.MetadataValue.md(curve.to_markdown(index=False)),
                                 "runs": dg.MetadataValue.json({str(k): v for k, v in runs.items()}),
                                 "reused_champion": reused["run_id"] if reused else why})
    return {"study_id": parent.run_id, "experiment_id": experiment_id, "runs": {str(k): v for k, v in runs.items()},
            "reused_champion": reused["run_id"] if reused else None, "index_uri": storage.index_uri,
            "metrics": _metrics(study), "n_latents": study["n_latents"], "d_in": study["d_in"]}


class CounterpartsConfig(dg.Config):
    top: int = 3  # closest counterparts kept per feature and other set
    force: bool = False  # recompute pairs already computed from the sets' current builds


@dg.asset(group_name="features", kinds={"lancedb"}, pool="lancedb_writer", deps=["sae_feature_index"],
          automation_condition=INDEX_AUTOMATION,
          description="Each SAE feature's closest features (decoder cosine) in every other indexed SAE set of the "
                      "same model and width, for the feature cards' links; pairs of removed sets are dropped.")
def sae_counterparts(context: dg.AssetExecutionContext, config: CounterpartsConfig, storage: FreudStorage) -> dict:
    summary = matches.build_counterparts(storage.index_uri, top=config.top, force=config.force)
    context.log.info(f"counterparts: {len(summary['pairs'])} pair(s) computed, {summary['skipped']} current, "
                     f"{summary['removed']} removed, {summary['seconds']:.1f} s")
    metadata = {"n_sets": summary["n_sets"], "pairs_computed": len(summary["pairs"]),
                "pairs_current": summary["skipped"], "pairs_removed": summary["removed"],
                "seconds": summary["seconds"]}
    if summary["pairs"]:
        metadata["pairs"] = dg.MetadataValue.md(pd.DataFrame(summary["pairs"]).to_markdown(index=False))
    context.add_output_metadata(metadata)
    return {"index_uri": storage.index_uri, **summary}


@dg.asset_check(asset=sae_counterparts, name="counterpart_sets_exist",
                description="Every stored counterpart names an existing SAE set and a feature inside it.")
def counterpart_sets_exist(sae_counterparts: dict) -> dg.AssetCheckResult:
    problems = matches.check_counterparts(sae_counterparts["index_uri"])
    return dg.AssetCheckResult(passed=not problems, description="; ".join(problems) or "all counterparts resolve",
                               metadata={"n_pairs": len(matches.pair_rows(sae_counterparts["index_uri"], "cross")),
                                         "problems": dg.MetadataValue.json(problems[:20])})


STABILITY_ASSETS = [sae_seed_stability, sae_counterparts]
STABILITY_CHECKS = [counterpart_sets_exist]
