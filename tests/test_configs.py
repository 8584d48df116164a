"""Every shipped config (configs/**/*.yaml, and the original FREUD's JSON configs under configs/**/*.json, as
translated) names a real asset, a partition it has, and a config Dagster accepts: what `freud collect --config`
would run."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*(REPO / "configs").rglob("*.yaml"), *(REPO / "configs").rglob("*.json")])


@pytest.fixture(scope="module")
def graph():
    from freud_pipeline.defs.definitions import defs

    return defs, defs.resolve_asset_graph()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_a_shipped_config_names_a_known_asset_and_validates(path, graph):
    from freud_pipeline.cli.legacy_config import read_run_config

    defs, asset_graph = graph
    run, translation = read_run_config(path)
    assert (translation is not None) == (path.suffix == ".json")  # a shipped .json is an original FREUD config
    from freud_pipeline.defs.runner import _asset_nodes

    key = dg.AssetKey(run["asset"])  # an asset, or a multi-asset named by its op (all_blocks_sae: all its assets)
    keys = [key] if asset_graph.has(key) else _asset_nodes(defs, asset_graph, run["asset"], None)[0]
    node = asset_graph.get(keys[0])
    if node.partitions_def is not None and "partition" in run:
        assert run["partition"] in node.partitions_def.get_partition_keys()
    job = dg.define_asset_job("config_check", selection=keys).resolve(
        asset_graph=asset_graph, resource_defs=defs.resources)
    assert dg.validate_run_config(job, {"ops": {run["asset"]: {"config": run.get("config") or {}}}})
