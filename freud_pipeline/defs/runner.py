"""Materialise one asset (and whatever upstream it lacks) from a run config file, as `freud collect` does (or only
check the config, as `freud collect --dry-run` does); free what runs of a process that died (kill -9, OOM) left
holding before an in-process run starts."""

import socket

import dagster as dg
import psutil

from freud_pipeline.errors import FreudError

PROCESS_TAG = "freud/process"  # "<host>:<pid>:<process start time>" of the process running an in-process run
LIVE_STATUSES = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                 dg.DagsterRunStatus.CANCELING]


def process_tags() -> dict[str, str]:
    """Tags of an in-process run naming the process that runs it, so a later run can tell whether it died."""
    me = psutil.Process()
    return {PROCESS_TAG: f"{socket.gethostname()}:{me.pid}:{me.create_time():.3f}"}


def _process_gone(tag: str) -> bool:
    host, pid, started = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return False  # another machine's run: its own machine judges it
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) > 1.0  # pid reused by another process
    except psutil.NoSuchProcess:
        return True


def free_dead_runs(instance: dg.DagsterInstance | None, report=print) -> list[str]:
    """Mark failed every unfinished in-process run whose process is gone, and free the pool slots of runs that
    hold some though they ended: without a daemon nothing else would, and the next run would wait forever."""
    if instance is None:
        return []
    freed = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=LIVE_STATUSES)):
        run, tag = record.dagster_run, record.dagster_run.tags.get(PROCESS_TAG)
        if not tag or not _process_gone(tag):
            continue
        pid = tag.rsplit(":", 2)[1]
        instance.report_run_failed(run, message=f"the process running this run (pid {pid}) is gone "
                                                "(killed or crashed); marked failed by the next run")
        freed.append(run.run_id)
        report(f"run {run.run_id} ({run.job_name}) was left {run.status.value.lower()} by process {pid}, "
               "which is gone: marked it failed and freed its pool slots")
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
    return freed


def materialize_asset(defs: dg.Definitions, asset: str, partition: str | None = None, config: dict | None = None,
                      instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    free_dead_runs(instance)
    return _materialize(defs, asset, partition, config, instance)


def _asset_nodes(defs: dg.Definitions, graph, asset: str, partition: str | None,
                 instance: dg.DagsterInstance | None = None):
    """(keys, nodes) that `asset` names: one asset, or every asset of the multi-asset whose op it names (e.g.
    all_blocks_sae: its assets materialise together, from one run of its op, configured under the op's name)."""
    key = dg.AssetKey(asset)
    if graph.has(key):
        keys = [key]
    else:
        keys = next((sorted(a.keys) for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)
                     and len(a.keys) > 1 and a.node_def.name == asset), None)
        if keys is None:
            known = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
            raise FreudError(f"unknown asset {asset!r}; known assets: {', '.join(known)}")
    nodes = [graph.get(k) for k in keys]
    partitions_def = nodes[0].partitions_def
    if partitions_def is not None:
        if isinstance(partitions_def, dg.DynamicPartitionsDefinition) and instance is None:
            return keys, nodes  # its partitions live in an instance (incoming batches): the run checks the key
        partition_keys = partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        if partition not in partition_keys:
            raise FreudError(f"asset {asset} needs a partition, one of: {', '.join(partition_keys)}")
    return keys, nodes


def check_asset_config(defs: dg.Definitions, asset: str, partition: str | None = None,
                       config: dict | None = None) -> None:
    """FreudError unless `asset` exists, `partition` is one of its partitions (when it has any) and Dagster accepts
    `config` as its config: what a run would refuse first, checked without running anything."""
    graph = defs.resolve_asset_graph()
    keys, _ = _asset_nodes(defs, graph, asset, partition)
    job = dg.define_asset_job("config_check", selection=keys).resolve(asset_graph=graph,
                                                                      resource_defs=defs.resources)
    try:
        dg.validate_run_config(job, {"ops": {asset: {"config": config or {}}}})
    except dg.DagsterInvalidConfigError as exc:
        problems = "; ".join(error.message for error in exc.errors) or str(exc)
        raise FreudError(f"asset {asset}: config not accepted: {problems}") from None


def _materialize(defs: dg.Definitions, asset: str, partition: str | None, config: dict | None,
                 instance: dg.DagsterInstance | None) -> dg.ExecuteInProcessResult:
    graph = defs.resolve_asset_graph()
    keys, nodes = _asset_nodes(defs, graph, asset, partition, instance)
    node = nodes[0]
    # Upstream assets never materialised in this instance run first: the same partition where partitioned alike,
    # every missing partition of a partitioned parent of an unpartitioned asset (which reads them all). Dynamic
    # partitions (incoming batches) are the sensor's to fill: the asset reads the ones there are.
    for parent in sorted({p for n in nodes for p in n.parent_keys} - set(keys)):
        parent_node = graph.get(parent)
        if isinstance(parent_node.partitions_def, dg.DynamicPartitionsDefinition):
            continue
        if parent_node.partitions_def is None:
            needed = [None]
        elif node.partitions_def is not None:
            needed = [partition]
        else:
            needed = parent_node.partitions_def.get_partition_keys()
        for parent_partition in needed:
            if instance is not None and not _materialised(instance, parent, parent_partition):
                result = _materialize(defs, parent.to_user_string(), parent_partition, None, instance)
                if not result.success:
                    return result
    selection = dg.AssetSelection.assets(*keys)
    assets = list(defs.assets) + list(defs.asset_checks or [])
    run_config = {"ops": {asset: {"config": config}}} if config else {}
    return dg.materialize(assets, selection=selection, run_config=run_config, instance=instance,
                          partition_key=partition, resources=defs.resources, raise_on_error=False,
                          tags=process_tags())


def _materialised(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> bool:
    if partition is None:
        return instance.get_latest_materialization_event(key) is not None
    return partition in instance.get_materialized_partitions(key)
