"""Orchestration scale: collection throughput with 1 and 2 workers, and Dagster's per-partition overhead.

    .venv/bin/python benchmarks/scale.py [--chunks 4] [--clips 32] [--repeats 3] [--json out.json]

Throughput: a subset of the real Asterisk prompts is cut into `--chunks` equal manifests; one run materialises
a collection asset per chunk (the real `activations_asset` factory and `collect_partition`) on the
multiprocess executor with max_concurrent 1, then 2. Children fork from a forkserver that preloaded torch and
this module, as the deployment docs recommend. Audio seconds per wall second of the whole run.

Overhead: the same collection asset over an empty manifest, (a) as a direct call of collect_activations,
(b) as a Dagster run in-process, (c) as a Dagster run on the multiprocess executor; (b)-(a) and (c)-(a) are
what orchestration adds to every partition. Everything is written to a temporary data directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freud_pipeline.defs.activations import activations_asset  # noqa: E402
from freud_pipeline.defs.resources import FreudStorage  # noqa: E402

_OWN_DATA = "FREUD_BENCH_DATA" not in os.environ  # children inherit the variable, so all see one directory
DATA = Path(os.environ.setdefault("FREUD_BENCH_DATA", tempfile.mkdtemp(prefix="freud-scale-")))
MAX_CHUNKS = 8
bench_partitions = dg.StaticPartitionsDefinition(["all"])


def _chunk(name: str):
    @dg.asset(name=name, partitions_def=bench_partitions, group_name="bench")
    def _asset() -> dict:
        return {"manifest_path": str(DATA / "bench" / f"{name}.parquet")}

    return _asset


CHUNKS = [f"chunk{i}" for i in range(MAX_CHUNKS)] + ["empty"]
DATASET_ASSETS = {name: _chunk(name) for name in CHUNKS}
COLLECT_ASSETS = {name: activations_asset(f"{name}_activations", name, bench_partitions, True) for name in CHUNKS}


def _job(name: str, chunks: list[str]):
    return dg.define_asset_job(name, selection=dg.AssetSelection.assets(
        *[DATASET_ASSETS[c] for c in chunks], *[COLLECT_ASSETS[c] for c in chunks]), partitions_def=bench_partitions)


bench_defs = dg.Definitions(
    assets=list(DATASET_ASSETS.values()) + list(COLLECT_ASSETS.values()),
    jobs=[_job(f"collect_{n}", [f"chunk{i}" for i in range(n)]) for n in range(1, MAX_CHUNKS + 1)]
    + [_job("empty_partition", ["empty"])],
    resources={"storage": FreudStorage(data_dir=str(DATA)),
               "io_manager": dg.FilesystemIOManager(base_dir=str(DATA / "dagster_storage"))},
)

HOOKS = ["encoder.blocks.2", "encoder.blocks.2.mlp.1"]


def prepare(n_clips: int, n_chunks: int) -> float:
    """Real prompts -> chunk manifests; returns the total audio seconds."""
    from freud_pipeline.audio.datasets import build_asterisk_prompts, load_manifest, write_manifest

    build = build_asterisk_prompts(DATA / "datasets" / "asterisk_prompts", limit=n_clips, align=False,
                                   data_root=DATA)
    manifest = load_manifest(build.manifest_path)
    for i in range(n_chunks):
        write_manifest(manifest.iloc[i::n_chunks], DATA / "bench" / f"chunk{i}.parquet")
    write_manifest(manifest.iloc[:0], DATA / "bench" / "empty.parquet")
    return float(manifest["duration_s"].sum())


def recon(job: str):
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    return ReconstructableRepository.for_file(__file__, "bench_defs").get_reconstructable_job(job)


def multiprocess(max_concurrent: int) -> dict:
    return {"execution": {"config": {"multiprocess": {
        "max_concurrent": max_concurrent,
        "start_method": {"forkserver": {"preload_modules": ["torch", "freud_pipeline.defs.activations"]}}}}}}


def clear_shards() -> None:
    shutil.rmtree(DATA / "activations", ignore_errors=True)


def run_job(instance, job: str, run_config: dict) -> tuple[float, dict]:
    clear_shards()
    started = time.perf_counter()
    result = dg.execute_job(recon(job), instance=instance, run_config=run_config, tags={"dagster/partition": "all"})
    wall = time.perf_counter() - started
    if not result.success:
        raise SystemExit(f"{job} failed: see {instance.root_directory}")
    steps = {e.step_key: e.event_specific_data.duration_ms / 1000 for e in result.all_events
             if e.event_type_value == "STEP_SUCCESS"}
    return wall, steps


def direct_empty() -> float:
    from freud_pipeline.activations.collect import collect_activations
    from freud_pipeline.audio.datasets import load_manifest

    clear_shards()
    started = time.perf_counter()
    collect_activations(load_manifest(DATA / "bench" / "empty.parquet"), DATA / "activations" / "direct",
                        hooks=HOOKS, device="cpu", data_root=DATA)
    return time.perf_counter() - started


def in_process_empty(instance) -> float:
    clear_shards()
    started = time.perf_counter()
    assert bench_defs.resolve_job_def("empty_partition").execute_in_process(partition_key="all",
                                                                            instance=instance).success
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=4, help=f"collection steps per run (<= {MAX_CHUNKS})")
    parser.add_argument("--clips", type=int, default=32, help="Asterisk prompts in the subset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("FREUD_OFFLINE", "1")
    os.environ.setdefault("FREUD_MODEL_DIR", str(Path(__file__).resolve().parents[1] / "data" / "models"))
    audio_s = prepare(args.clips, args.chunks)
    job = f"collect_{args.chunks}"
    out: dict = {"clips": args.clips, "chunks": args.chunks, "audio_seconds": round(audio_s, 1),
                 "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    (DATA / "instance").mkdir(exist_ok=True)
    with dg.instance_for_test(temp_dir=str(DATA / "instance")) as instance:
        run_job(instance, job, multiprocess(1))  # warm-up: page cache, model conversion, forkserver imports
        for workers in (1, 2):
            walls, collect_s = [], []
            for _ in range(args.repeats):
                wall, steps = run_job(instance, job, multiprocess(workers))
                walls.append(wall)
                collect_s.append(sum(v for k, v in steps.items() if k.endswith("_activations")))
            wall = statistics.median(walls)
            out[f"workers_{workers}"] = {"run_wall_s": round(wall, 2), "runs_s": [round(w, 2) for w in walls],
                                         "collect_steps_s": round(statistics.median(collect_s), 2),
                                         "audio_s_per_s": round(audio_s / wall, 2)}
            print(f"{workers} worker(s): {wall:.1f} s per run, {audio_s / wall:.1f} audio-s/s", flush=True)

        direct = [direct_empty() for _ in range(args.repeats)]
        in_proc = [in_process_empty(instance) for _ in range(args.repeats)]
        multi = [run_job(instance, "empty_partition", multiprocess(1))[0] for _ in range(args.repeats)]
    med = {name: statistics.median(v) for name, v in (("direct", direct), ("in_process", in_proc),
                                                       ("multiprocess", multi))}
    out["empty_partition_s"] = {k: round(v, 2) for k, v in med.items()}
    out["overhead_s"] = {"in_process": round(med["in_process"] - med["direct"], 2),
                         "multiprocess": round(med["multiprocess"] - med["direct"], 2)}
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    if _OWN_DATA:
        shutil.rmtree(DATA, ignore_errors=True)


if __name__ == "__main__":
    main()
