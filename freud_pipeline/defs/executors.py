"""One executor for every job, chosen by run config: in-process, multiprocess (default), dagster-celery or
Kubernetes (dagster-k8s: each step in its own pod).

The same definitions run on one machine (multiprocess: each step in its own process) and on many (celery:
each step becomes a task on a Redis broker that any `dagster-celery worker` picks up). Steps exchange only
small dicts of paths through the IO manager; shards, checkpoints and LanceDB are addressed by path or URI under
FREUD_DATA_DIR. So workers either see the same data directory (a shared volume), or each keeps its own as a cache
of an object store (FREUD_OBJECT_STORE, FREUD_LANCEDB_URI in the bucket, MLflow and the Dagster instance on
PostgreSQL: docs/OPERATING.md "One machine to a cluster"; tests/test_cluster.py runs it).

Default: FREUD_EXECUTOR (multiprocess | in_process | celery | k8s; default multiprocess). For celery the broker and
result backend come from FREUD_CELERY_BROKER / FREUD_CELERY_BACKEND (default redis://127.0.0.1:6379/0).
Per run, in the launchpad or a run config file:

    execution:
      config:
        celery:
          broker: redis://broker:6379/0
          backend: redis://broker:6379/0

k8s is dagster-k8s's `k8s_job_executor` (its config schema and construction, reused as is): the run's pod
launches one Kubernetes Job per step, with the code location's image and environment (deploy/helm/values.yaml),
so a step that asks for a GPU (`GPU_STEP_TAGS`, on collection and training) gets a pod on a GPU node and the rest
stay on CPU nodes. Every other executor ignores that tag. Per run:

    execution:
      config:
        k8s:
          max_concurrent: 4
          step_k8s_config: {container_config: {resources: {requests: {cpu: "2", memory: 8Gi}}}}

`execute_in_process` (tests, `freud demo`) ignores the executor and runs in the calling process.
"""

import os

import dagster as dg
from dagster import Array, Field, Noneable, Permissive, Selector, StringSource
from dagster._core.definitions.executor_definition import (
    IN_PROC_CONFIG,
    MULTI_PROC_CONFIG,
    _core_in_process_executor_creation,
    _core_multiprocess_executor_creation,
    multiple_process_executor_requirements,
)
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster_k8s import k8s_job_executor

from freud_pipeline import settings
from freud_pipeline.errors import FreudError

KINDS = ("multiprocess", "in_process", "celery", "k8s")
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

CELERY_CONFIG = Field(
    {
        "broker": Field(Noneable(StringSource), is_required=False, description="Celery broker URL (Redis)."),
        "backend": Field(Noneable(StringSource), is_required=False, description="Celery result backend URL."),
        "include": Field(Array(str), is_required=False, description="Modules every worker imports."),
        "config_source": Field(Noneable(Permissive()), is_required=False,
                               description="More Celery settings (lower-case names)."),
        "retries": get_retries_config(),
    },
    description="Each step as a task on a Celery broker, run by `dagster-celery worker` processes.",
)


# dagster-k8s's own schema (job_namespace, step_k8s_config, per_step_k8s_config, max_concurrent, env_secrets...).
K8S_CONFIG = Field(k8s_job_executor.config_schema.config_type, is_required=False,
                   description="Each step as a Kubernetes Job in its own pod (dagster-k8s k8s_job_executor); "
                               "steps with GPU_STEP_TAGS request a GPU.")


def celery_defaults() -> dict:
    broker = os.environ.get("FREUD_CELERY_BROKER") or DEFAULT_BROKER
    return {"broker": broker, "backend": os.environ.get("FREUD_CELERY_BACKEND") or broker}


def default_executor_config() -> dict:
    kind = os.environ.get("FREUD_EXECUTOR", "").strip() or "multiprocess"
    if kind not in KINDS:
        raise FreudError(f"FREUD_EXECUTOR={kind!r} is not an executor; choose one of {', '.join(KINDS)}")
    return {"celery": celery_defaults()} if kind == "celery" else {kind: {}}


def _requirements(config: dict):
    return [] if "in_process" in config else multiple_process_executor_requirements()


def _create(init_context: dg.InitExecutorContext) -> dg.Executor:
    (kind, config), = init_context.executor_config.items()
    if kind == "in_process":
        return _core_in_process_executor_creation(config)
    if kind == "multiprocess":
        return _core_multiprocess_executor_creation(config)
    if kind == "k8s":
        return k8s_job_executor.executor_creation_fn(dg.InitExecutorContext(
            job=init_context.job, executor_def=k8s_job_executor, executor_config=config,
            instance=init_context.instance))
    try:
        from dagster_celery.executor import CeleryExecutor
    except ImportError:
        raise FreudError("the celery executor needs dagster-celery and the redis client in this environment "
                         "(see docs/OPERATING.md, 'dagster-celery with Redis')") from None
    return CeleryExecutor(broker=config.get("broker"), backend=config.get("backend"), include=config.get("include"),
                          config_source=config.get("config_source"), retries=RetryMode.from_config(config["retries"]))


def freud_executor(default: dict | None = None) -> dg.ExecutorDefinition:
    """The executor definition, defaulting to `default` (else FREUD_EXECUTOR, read now)."""
    return dg.ExecutorDefinition(
        name="freud",
        config_schema=Field(
            Selector({"multiprocess": MULTI_PROC_CONFIG, "in_process": IN_PROC_CONFIG, "celery": CELERY_CONFIG,
                      "k8s": K8S_CONFIG}),
            default_value=default or default_executor_config(),
        ),
        requirements=_requirements,
        executor_creation_fn=_create,
        description="multiprocess (default), in_process, celery (dagster-celery workers on a Redis broker) or k8s "
                    "(each step in its own Kubernetes pod).",
    )


def reconstructable_job(name: str, module: str = "freud_pipeline.defs.definitions",
                        attribute: str = "defs") -> ReconstructableJob:
    """A job that other processes (multiprocess children, celery workers) can load by module and name."""
    root = settings.checkout_root()  # None when installed: the module imports from site-packages
    repo = ReconstructableRepository.for_module(module, attribute, working_directory=str(root) if root else None)
    return repo.get_reconstructable_job(name)


def gpu_op_tags(gpus: int | None = None) -> dict:
    """Op tags that make a step's Kubernetes pod request GPUs (the k8s executor; every other executor ignores
    them). FREUD_K8S_GPUS sets the count (default 1; 0: no tag, CPU pods, for a cluster without GPU nodes)."""
    raw = os.environ.get("FREUD_K8S_GPUS", "").strip()
    count = (int(raw) if raw else 1) if gpus is None else gpus
    if count <= 0:
        return {}
    # The limit alone makes the scheduler place the pod on a node with free GPUs (NVIDIA device plugin).
    return {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": count}}}}}


# The one GPU step tag of the model steps, collection (defs/activations.py, all_blocks_activations) and training
# (topk_sae, sae_sweep, all_blocks_sae): `@dg.asset(..., op_tags=GPU_STEP_TAGS)`. Read when the definitions load.
GPU_STEP_TAGS = gpu_op_tags()
