"""The cluster deployment files, checked statically (no Docker daemon, no cluster here): deploy/Dockerfile,
.dockerignore, the Helm values and manifests in deploy/helm/, deploy/run-config-k8s.yaml and the "Kubernetes (Helm)"
subsection of docs/OPERATING.md. They parse; every module, command, job, asset and setting they name exists; the
k8s executor validates and builds from their run config; the GPU step tag is where collection and training run; the
dagster integrations belong to the pinned dagster release."""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import json
import re
import shutil
import sys
import tomllib
from pathlib import Path

import dagster as dg
import pytest
import yaml

try:
    import test_packaging
except ImportError:  # tests collected as a package
    from tests import test_packaging

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
VALUES = DEPLOY / "helm" / "values.yaml"
APP_MANIFESTS = DEPLOY / "helm" / "freud-app.yaml"
RUN_CONFIG = DEPLOY / "run-config-k8s.yaml"
DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "CMD", "ENTRYPOINT",
                       "LABEL", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}
# install.sh's Debian packages that only the tests or a one-machine setup need (browser tests, local services)
NOT_IN_IMAGE = {"chromium", "chromium-driver", "redis-server", "postgresql"}
# The cluster settings of docs/OPERATING.md "One machine to a cluster" the code location must get.
CLUSTER_SETTINGS = ("FREUD_DATA_DIR", "FREUD_OBJECT_STORE", "FREUD_S3_ENDPOINT_URL", "FREUD_LANCEDB_URI",
                    "MLFLOW_TRACKING_URI", "FREUD_MLFLOW_ARTIFACTS", "FREUD_DAGSTER_POSTGRES_URL", "FREUD_EXECUTOR")
SECRET_SETTINGS = {"MLFLOW_TRACKING_URI", "FREUD_DAGSTER_POSTGRES_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def final_stage(instructions):
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1]:]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def env_list(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture(scope="module")
def code_location(values) -> dict:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return deployment


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(APP_MANIFESTS.read_text()) if doc]


@pytest.fixture(scope="module")
def app_containers(manifests) -> dict[str, dict]:
    return {container["name"]: container for doc in manifests if doc["kind"] == "Deployment"
            for container in doc["spec"]["template"]["spec"]["containers"]}


@pytest.fixture(scope="module")
def defs() -> dg.Definitions:
    from freud_pipeline.defs.definitions import defs

    return defs


@pytest.fixture(scope="module")
def run_config() -> dict:
    return yaml.safe_load(RUN_CONFIG.read_text())


def kubeconfig(path: Path) -> Path:
    """A kubeconfig naming a cluster that is not there: dagster-k8s builds its API clients without connecting."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "nobody", "user": {"token": "unused"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nobody"}}]}))
    return path


def operating_subsection() -> str:
    text = (REPO / "docs" / "OPERATING.md").read_text()
    start = text.index("### Kubernetes (Helm)")
    end = text.find("\n## ", start)
    return text[start:] if end < 0 else text[start:end]


# ---- the image ------------------------------------------------------------------------------------------------------

def test_dockerfile_parses_into_known_instructions_and_a_non_root_code_location():
    instructions = dockerfile_instructions()
    assert {keyword for keyword, _ in instructions} <= DOCKER_INSTRUCTIONS
    stage = final_stage(instructions)
    assert stage[0][1].startswith("python:3.11-slim")
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (cmd,) = [json.loads(args) for keyword, args in stage if keyword == "CMD"]  # exec form: a JSON array
    assert not [keyword for keyword, _ in stage if keyword == "ENTRYPOINT"]  # the chart and manifests set commands
    assert cmd[:3] == ["dagster", "api", "grpc"]
    module = cmd[cmd.index("-m") + 1]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert module == pyproject["tool"]["dagster"]["module_name"]
    assert str(cmd[cmd.index("-p") + 1]) == "3030"


def test_dockerfile_copies_only_what_exists_and_is_in_the_build_context():
    patterns = dockerignore_patterns()
    assert {"data", ".venv"} <= set(patterns)
    copied = []
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in args:
            continue
        parts = [part for part in args.split() if not part.startswith("--")]
        copied += parts[:-1]
    assert {"pyproject.toml", "freud_pipeline", "dash_app", "configs"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), source
        assert source.split("/")[0] not in patterns, f"{source} is left out of the build context by .dockerignore"


def test_image_has_the_debian_packages_the_pipeline_needs():
    script = (REPO / "scripts" / "install.sh").read_text()
    block = re.search(r"DEB_PACKAGES=\((.*?)\)", script, re.S).group(1)
    needed = set()
    for word in block.split():
        brace = re.match(r"(.*)\{(.*)\}(.*)", word)
        needed |= {brace.group(1) + part + brace.group(3) for part in brace.group(2).split(",")} if brace else {word}
    runs = " ".join(args for keyword, args in final_stage(dockerfile_instructions()) if keyword == "RUN")
    installed = set(re.search(r"apt-get install (.*?)&&", runs).group(1).split())
    assert needed - NOT_IN_IMAGE <= installed, sorted(needed - NOT_IN_IMAGE - installed)


def test_image_ports_and_settings_match_the_manifests(code_location, app_containers):
    stage = final_stage(dockerfile_instructions())
    exposed = {int(port) for keyword, args in stage if keyword == "EXPOSE" for port in args.split()}
    ports = {code_location["port"]} | {port["containerPort"] for container in app_containers.values()
                                       for port in container["ports"]}
    assert ports == exposed == {3030, 8050, 5000}
    env = " ".join(args for keyword, args in stage if keyword == "ENV")
    data_dir = env_list(code_location)["FREUD_DATA_DIR"]["value"]
    assert f"FREUD_DATA_DIR={data_dir}" in env
    mounts = {mount["mountPath"] for mount in code_location["volumeMounts"]}
    assert data_dir in mounts  # the per-pod cache is the emptyDir


# ---- what the Helm values and manifests name ------------------------------------------------------------------------

def test_values_configure_the_k8s_run_launcher_and_an_external_postgres(values):
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False and values["postgresql"]["postgresqlHost"]
    assert values["generatePostgresqlPasswordSecret"] is False and values["global"]["postgresqlSecretName"]
    assert values["dagsterDaemon"]["enabled"] is True
    assert values["dagster-user-deployments"]["enabled"] is True


def test_code_location_module_loads_the_definitions_as_dagster_api_grpc_does(code_location, defs):
    from dagster._core.workspace.autodiscovery import loadable_targets_from_python_module

    args = code_location["dagsterApiGrpcArgs"]
    module = args[args.index("-m") + 1]
    assert code_location["includeConfigInLaunchedRuns"]["enabled"] is True
    (target,) = loadable_targets_from_python_module(module, working_directory=None)  # the one Definitions
    assert target.target_definition is defs
    assert defs.resolve_job_def("index_job") is not None


def test_manifest_commands_name_installed_modules_and_executables(manifests, app_containers):
    kinds = sorted(doc["kind"] for doc in manifests)
    assert kinds == ["Deployment", "Deployment", "Service", "Service"]
    bin_dir = Path(sys.executable).parent
    for container in app_containers.values():
        command = container["command"]
        if command[:2] == ["python", "-m"]:
            importlib.import_module(command[2])
        else:
            assert (bin_dir / command[0]).exists() or shutil.which(command[0]), command[0]
            importlib.import_module(command[0])  # mlflow: the console script's package
    assert app_containers["app"]["command"][:3] == ["python", "-m", "dash_app"]
    services = {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == "Service"}
    deployments = {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == "Deployment"}
    for name, service in services.items():  # each Service selects its Deployment's pods
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_settings_are_ones_freud_reads_and_secrets_come_from_secrets(code_location, app_containers):
    source = "\n".join(path.read_text() for package in ("freud_pipeline", "dash_app")
                       for path in (REPO / package).rglob("*.py"))
    location_env = env_list(code_location)
    containers = [location_env] + [env_list(container) for container in app_containers.values()]
    for env in containers:
        for name, entry in env.items():
            if name.startswith("FREUD_") or name == "MLFLOW_TRACKING_URI":
                assert f'"{name}"' in source, f"{name} is set but nothing in freud reads it"
            if name in SECRET_SETTINGS:
                assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]["key"] == name
    required = {name for name in CLUSTER_SETTINGS if f'"{name}"' in source} | {"FREUD_OBJECT_STORE"}
    assert required <= location_env.keys(), sorted(required - location_env.keys())
    assert location_env["FREUD_EXECUTOR"]["value"] == "k8s"
    for env in containers[1:]:  # the app and MLflow see the same bucket as the pipeline
        for name in env.keys() & location_env.keys():
            assert env[name].get("value") == location_env[name].get("value"), name


# ---- the k8s executor -----------------------------------------------------------------------------------------------

def test_k8s_executor_validates_the_run_config_for_every_job(defs, run_config):
    jobs = [defs.resolve_job_def(job.name) for job in defs.jobs]  # the defined jobs (their assets need no config)
    assert {"corpus_job", "activations_job", "index_job"} <= {job.name for job in jobs}
    for job in jobs:
        dg.validate_run_config(job, run_config)
    with pytest.raises(dg.DagsterInvalidConfigError, match="no_such_field"):
        dg.validate_run_config(defs.resolve_job_def("corpus_job"),
                               {"execution": {"config": {"k8s": {"no_such_field": 1}}}})


def test_k8s_executor_is_built_from_config_without_a_cluster(defs, run_config, tmp_path, monkeypatch):
    from dagster._config import process_config
    from dagster._core.executor.step_delegating import StepDelegatingExecutor
    from dagster_k8s.executor import K8sStepHandler

    from freud_pipeline.defs import executors

    monkeypatch.setenv("FREUD_EXECUTOR", "k8s")
    assert executors.default_executor_config() == {"k8s": {}}
    executor_def = defs.resolve_job_def("index_job").executor_def
    config = copy.deepcopy(run_config["execution"]["config"])
    config["k8s"].update(load_incluster_config=False, kubeconfig_file=str(kubeconfig(tmp_path / "kubeconfig")))
    processed = process_config(executor_def.config_schema.config_type, config)
    assert processed.success, processed.errors
    with dg.DagsterInstance.ephemeral() as instance:
        executor = executor_def.executor_creation_fn(dg.InitExecutorContext(
            job=executors.reconstructable_job("index_job"), executor_def=executor_def,
            executor_config=processed.value, instance=instance))
    assert isinstance(executor, StepDelegatingExecutor)
    assert isinstance(executor._step_handler, K8sStepHandler)
    assert executor._max_concurrent == config["k8s"]["max_concurrent"]
    # every step must be loadable in its own pod: a reconstructable job and outputs that outlive the process
    assert len(executor_def.get_requirements(processed.value)) == 3


def test_gpu_tag_is_on_collection_and_training_only(defs):
    from dagster_k8s.job import get_user_defined_k8s_config

    from freud_pipeline.defs import multi_sae
    from freud_pipeline.defs.executors import GPU_STEP_TAGS, gpu_op_tags

    def gpus(key: str):
        tags = defs.resolve_assets_def(key).op.tags
        limits = get_user_defined_k8s_config(tags).container_config.get("resources", {}).get("limits", {})
        return limits.get("nvidia.com/gpu")

    keys = {key.to_user_string() for asset in defs.assets if isinstance(asset, dg.AssetsDefinition)
            for key in asset.keys}
    collection = {key for key in keys if key.endswith("activations")}
    training = {"topk_sae", "sae_sweep"} | {key.to_user_string() for key in multi_sae.all_blocks_sae.keys}
    assert {"activations", "incoming_activations", "all_blocks_activations"} <= collection
    for key in collection | training:
        assert gpus(key) == 1, key
    for key in ("default_corpus", "sae_feature_index", "neuron_feature_index"):
        assert gpus(key) is None, key
    assert GPU_STEP_TAGS == gpu_op_tags(1)
    assert gpu_op_tags(0) == {}


def test_operating_subsection_names_existing_jobs_assets_and_files(defs):
    text = operating_subsection()
    jobs = set(re.findall(r"\b(\w+_job)\b", text))
    assert {"corpus_job", "activations_job", "index_job"} <= jobs
    for job in jobs:
        assert defs.resolve_job_def(job) is not None
    for path in re.findall(r"`((?:deploy/|\.dockerignore)[\w./-]*)`", text):
        assert (REPO / path).exists(), path
    for key in ("topk_sae", "all_blocks_sae", "incoming_activations"):
        assert key in text


# `pip check` is clean (the same test as in test_packaging.py, collected here too: the deployment installs these pins)
test_pip_check_is_clean = test_packaging.test_pip_check_is_clean


def test_dagster_integrations_are_releases_of_the_pinned_dagster():
    # dagster X.Y.Z is released with its integrations at 0.(Y+16).Z (1.13.27 <-> 0.29.27); the core packages
    # (webserver, graphql, pipes, shared) carry dagster's own version.
    dagster_version = importlib.metadata.version("dagster")
    major, minor, patch = (int(part) for part in dagster_version.split("."))
    integration_version = f"0.{minor + 16}.{patch}"
    installed = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name.startswith("dagster-"):
            installed[name] = dist.version
    assert {"dagster-k8s", "dagster-postgres", "dagster-celery"} <= installed.keys()
    for name, version in installed.items():
        assert version in (dagster_version, integration_version), f"{name} {version} is not dagster {dagster_version}'s"
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in pins:
        if pin.startswith("dagster"):
            assert pin.split("==")[1] in (dagster_version, integration_version), pin
