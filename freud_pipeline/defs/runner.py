"""Materialise one asset (and whatever upstream it lacks) from a YAML config file, as `freud collect` does."""

from pathlib import Path

import dagster as dg
import yaml

from freud_pipeline.errors import FreudError


def load_run_file(path: str | Path) -> dict:
    """A config file: {asset: name, partition: key (optional), config: {...}}."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "asset" not in data:
        raise FreudError(f"{path}: a config file names the asset to materialise under 'asset:'")
    return data


def materialize_asset(defs: dg.Definitions, asset: str, partition: str | None = None, config: dict | None = None,
                      instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey(asset)
    if not graph.has(key):
        known = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
        raise FreudError(f"unknown asset {asset!r}; known assets: {', '.join(known)}")
    node = graph.get(key)
    if node.partitions_def is not None:
        keys = node.partitions_def.get_partition_keys()
        if partition not in keys:
            raise FreudError(f"asset {asset} needs a partition, one of: {', '.join(keys)}")
    # Upstream assets never materialised in this instance run first (same partition where partitioned alike).
    for parent in node.parent_keys:
        parent_node = graph.get(parent)
        parent_partition = partition if parent_node.partitions_def is not None else None
        if instance is not None and not _materialised(instance, parent, parent_partition):
            result = materialize_asset(defs, parent.to_user_string(), parent_partition, None, instance)
            if not result.success:
                return result
    selection = dg.AssetSelection.assets(key)
    assets = list(defs.assets) + list(defs.asset_checks or [])
    run_config = {"ops": {asset: {"config": config}}} if config else {}
    return dg.materialize(assets, selection=selection, run_config=run_config, instance=instance,
                          partition_key=partition, resources=defs.resources, raise_on_error=False)


def _materialised(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> bool:
    if partition is None:
        return instance.get_latest_materialization_event(key) is not None
    return partition in instance.get_materialized_partitions(key)
