"""Many SAEs from one pass in Dagster: one asset per hook, trained together by `sae.multi.run_saes`.

`all_blocks_sae` is a multi-asset with one asset per hook of `ALL_BLOCKS` (tiny.en's residual stream after each of
its 4 encoder blocks): `sae_encoder_blocks_0` ... `sae_encoder_blocks_3`. It can be subset: materialising some of
them trains only those hooks, all from one read of the activations per step; each asset's materialisation,
metadata and output are its own hook's run (lineage and re-materialisation stay per hook). Each hook's run is a
whole SAE run as `topk_sae`'s (splice-evaluated, gated, registered as `freud-sae.<model>.<hook>.<architecture>`,
maybe promoted, reported; its directory `sae/<model>-<hook>-<architecture>/<run id>/`), grouped under one MLflow
parent run. The config is `topk_sae`'s (`defs.sae.SaeAssetConfig`: the recipe, thresholds and where the frames come
from) without `hook`; `resume_from` is the parent MLflow run id of a killed multi run (`sae.multi.resume_points`).

The frames: `all_blocks_activations`, the default corpus collected with every block's residual stream into its own
dataset directory `activations/<model>/default_corpus_all_blocks/<split>` (configs/features/default_all_blocks_*.yaml),
so what the default pipeline reads (`activations`, block 2 only) is unchanged; or, with `dataset`, that dataset's
splits. Incoming batches (`include_incoming`) are used only when they hold every trained hook.
`freud collect --config configs/train/demo_all_blocks.yaml` trains the four.
"""

import json
from pathlib import Path

import dagster as dg
import pydantic

from freud_pipeline.activations.writer import MANIFEST
from freud_pipeline.defs.activations import ActivationsConfig, collect_partition
from freud_pipeline.defs.executors import GPU_STEP_TAGS
from freud_pipeline.defs.partitions import split_partitions
from freud_pipeline.defs.resources import FreudStorage, MlflowTracking
from freud_pipeline.defs.sae import SaeAssetConfig, run_metadata, splice_manifest, training_selection
from freud_pipeline.features.runs import run_url
from freud_pipeline.sae.run import SaeRunConfig
from freud_pipeline.sae.selection import TrainingSelection

ALL_BLOCKS = tuple(f"encoder.blocks.{i}" for i in range(4))  # tiny.en's encoder: 4 blocks
ALL_BLOCKS_DATASET = "default_corpus_all_blocks"  # activations/<model>/<this>/<split>: not the default's directory


def hook_asset(hook: str) -> str:
    """The asset name of a hook's SAE: sae_encoder_blocks_0 for encoder.blocks.0."""
    return "sae_" + hook.replace(".", "_")


class AllBlocksActivationsConfig(ActivationsConfig):
    hooks: list[str] = list(ALL_BLOCKS)


@dg.asset(group_name="activations", kinds={"arrow", "pytorch"}, pool="model", op_tags=GPU_STEP_TAGS,
          partitions_def=split_partitions,
          ins={"default_corpus": dg.AssetIn("default_corpus")},
          description="Whisper encoder activations of the default corpus at every block's residual stream, one split "
                      f"per partition, in their own directory (activations/<model>/{ALL_BLOCKS_DATASET}): the frames "
                      "the per-hook SAEs of all_blocks_sae train on.")
def all_blocks_activations(context: dg.AssetExecutionContext, config: AllBlocksActivationsConfig,
                           storage: FreudStorage, default_corpus: dict) -> dict:
    return collect_partition(context, config, storage, ALL_BLOCKS_DATASET, default_corpus["manifest_path"],
                             split_column_filter=True)


MultiSaeConfig = pydantic.create_model(
    "MultiSaeConfig", __base__=dg.Config,
    __doc__="topk_sae's config (defs.sae.SaeAssetConfig) without `hook`: one SAE per selected asset (hook); "
            "`resume_from`: the parent MLflow run id of a killed multi run.",
    **{name: (info.annotation, info) for name, info in SaeAssetConfig.model_fields.items()
       if name not in ("hook", "resume_from")},
    resume_from=(str, pydantic.Field("", description="the parent MLflow run id of a killed multi run: every SAE "
                                                     "continues from the latest checkpoint step all of them reached")))


def _holds(directory: str, hooks: list[str]) -> bool:
    spec = json.loads((Path(directory) / MANIFEST).read_text()).get("spec") or {}
    return set(hooks) <= set(spec.get("hooks", []))


def multi_selection(config, storage: FreudStorage, activations: dict, hooks: list[str]
                    ) -> tuple[str, TrainingSelection]:
    """(model, partitions) as `defs.sae.training_selection` gives them for one hook, less the incoming batches
    that lack one of `hooks` (they were collected with other hooks)."""
    model, selection = training_selection(SaeAssetConfig(**config.model_dump(), hook=hooks[0]), storage,
                                          activations)
    kept = tuple(p for p in selection.partitions if p.use != "split" or _holds(p.directory, hooks))
    return model, TrainingSelection(selection.model, kept)


def multi_sae_asset(name: str, hooks: tuple[str, ...], activations_asset: str):
    """A subsettable multi-asset training one SAE per hook (asset `hook_asset(hook)`) from one pass."""
    from freud_pipeline.sae.multi import resume_points, run_saes

    outs = {hook_asset(hook): dg.AssetOut(
        is_required=False, group_name="sae", kinds={"pytorch", "mlflow"},
        description=f"A sparse autoencoder on {hook}, trained with the other hooks of {name} from one read of the "
                    f"activations; its run in MLflow (a child of the multi run), registered as "
                    f"freud-sae.<model>.{hook.replace('.', '_')}.<architecture>.") for hook in hooks}

    @dg.multi_asset(name=name, outs=outs, can_subset=True, pool="model", op_tags=GPU_STEP_TAGS,
                    ins={"activations": dg.AssetIn(activations_asset), "default_corpus": dg.AssetIn("default_corpus")},
                    description=f"One SAE per hook ({', '.join(hooks)}), all trained in lockstep from one read of "
                                "the activations per step; materialise a subset to train only those hooks.")
    def _asset(context: dg.AssetExecutionContext, config: MultiSaeConfig, storage: FreudStorage,
               mlflow: MlflowTracking, activations: dict, default_corpus: dict):
        selected = [hook for hook in hooks if hook_asset(hook) in context.selected_output_names]
        model, selection = multi_selection(config, storage, activations, selected)
        fields = config.model_dump(include=set(SaeRunConfig.model_fields))
        cfgs = {hook: SaeRunConfig(**fields, hook=hook, model_name=model) for hook in selected}  # validated here
        runs_dirs = {hook: storage.path("sae", f"{model}-{hook}-{config.architecture}") for hook in selected}
        resume = resume_points(mlflow.uri, config.resume_from) if config.resume_from else None
        context.log.info(f"training {len(selected)} SAEs ({', '.join(selected)}) on {selection.describe()} "
                         f"(selection {selection.digest[:12]})")
        tags = {"dagster_run_id": context.run_id, "whisper_model": model, "dataset": config.dataset or "default_corpus",
                "train_split": config.train_split, "eval_split": config.eval_split}
        results = run_saes(cfgs, selection.train_source(), selection.eval_source(), runs_dir=runs_dirs,
                           tracking_uri=mlflow.uri, experiment=mlflow.experiment,
                           corpus_manifest=splice_manifest(config, storage, default_corpus), data_root=storage.root,
                           tags=tags, hook_tags={hook: {"dagster_asset_key": hook_asset(hook)} for hook in selected},
                           resume_from=resume, selection=selection, run_name=f"{name}-{config.architecture}")
        for hook, result in results.items():
            parent = result.parent_run_id
            context.log.info(f"{hook}: SAE run {result.run_id} in {result.checkpoint_dir}: quality check "
                             f"{'passed' if result.passed else 'failed: ' + '; '.join(result.quality['failures'])}")
            metadata = run_metadata(result, selection) | {
                "mlflow_parent_run_id": parent,
                "mlflow_parent_run": dg.MetadataValue.url(run_url({"experiment_id": result.experiment_id,
                                                                    "run_id": parent}))}
            yield dg.Output({**result.summary(), "hook": hook, "architecture": config.architecture,
                             "runs_dir": str(runs_dirs[hook]), "keep_runs": config.keep_runs,
                             "selection": selection.records(), "selection_digest": selection.digest,
                             "parent_run_id": parent}, output_name=hook_asset(hook), metadata=metadata)

    return _asset


all_blocks_sae = multi_sae_asset("all_blocks_sae", ALL_BLOCKS, "all_blocks_activations")

MULTI_SAE_ASSETS = [all_blocks_activations, all_blocks_sae]
