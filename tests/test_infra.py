"""infra/: the compose file, the images and the Kubernetes manifests parse, hold the services
and objects the stack needs, commit no secret, and copy only files that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

INFRA = REPO_ROOT / "infra"
COMPOSE = INFRA / "compose" / "compose.yaml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
DOCKERFILES = sorted(
    path for path in (INFRA / "docker").glob("Dockerfile.*") if path.suffix != ".dockerignore"
)
K8S = INFRA / "k8s"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN", re.IGNORECASE)
PASSWORD_IN_URL = re.compile(r"://[^:/@\s]+:(?!\$\{)[^@\s]+@")  # user:literal@host


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[tuple[str, str], dict]:
    """Every Kubernetes object under infra/k8s by (kind, name)."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_documents(path):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_every_infra_file_parses() -> None:
    yaml_files = sorted(INFRA.rglob("*.yaml"))
    assert len(yaml_files) >= 5
    for path in yaml_files:
        assert yaml_documents(path), f"{path} holds no YAML document"
    for path in sorted(INFRA.rglob("*.json")):
        assert isinstance(json.loads(path.read_text()), dict), path


def test_compose_brings_up_the_whole_stack() -> None:
    services = yaml_documents(COMPOSE)[0]["services"]
    for name in ("postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "score"):
        assert name in services, f"compose.yaml has no {name!r} service"
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--artifacts-destination" in mlflow and "--serve-artifacts" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://")
    worker = " ".join(services["prefect-worker"]["command"])
    assert "normalcy deploy --pool" in worker and "prefect worker start" in worker
    assert "--model=models:/normalcy@champion" in services["score"]["command"]
    assert services["score"]["build"]["dockerfile"] == "infra/docker/Dockerfile.score"
    for service in services.values():  # host ports on loopback only
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def _secret_values(mapping: dict) -> dict[str, str]:
    return {k: str(v) for k, v in mapping.items() if SECRET_NAME.search(k)}


def test_no_secret_value_is_committed() -> None:
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    secrets = _secret_values(example)
    assert "POSTGRES_PASSWORD" in secrets and "MINIO_ROOT_PASSWORD" in secrets
    assert all(value == "" for value in secrets.values()), secrets
    for name, service in yaml_documents(COMPOSE)[0]["services"].items():
        for key, value in _secret_values(service.get("environment", {})).items():
            assert value.startswith("${") and ":?" in value, f"{name}.{key} = {value!r}"
        for value in service.get("environment", {}).values():  # inside URLs too
            assert not PASSWORD_IN_URL.search(str(value)), f"{name}: {value}"
    for (kind, name), obj in k8s_objects().items():
        assert kind != "Secret", f"a Secret ({name}) is committed in infra/k8s"
        for container in _containers(obj):
            for env in container.get("env", []):
                assert not PASSWORD_IN_URL.search(env.get("value", "")), env
                if SECRET_NAME.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), env
    assert _is_git_ignored(INFRA / "compose" / ".env"), "infra/compose/.env must be git-ignored"


def _is_git_ignored(path: Path) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO_ROOT).returncode == 0


def _containers(obj: dict) -> list[dict]:
    return obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def copied_sources(dockerfile: Path) -> list[str]:
    """The source paths of every COPY (without --from) in a Dockerfile."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_every_file_the_dockerfiles_copy_exists() -> None:
    assert {path.name for path in DOCKERFILES} == {"Dockerfile.train", "Dockerfile.score"}
    for dockerfile in DOCKERFILES:
        sources = copied_sources(dockerfile)
        assert "src" in sources and "pyproject.toml" in sources, dockerfile
        for source in sources:  # the build context is the repository root
            assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


def test_the_training_image_takes_cpu_torch_and_the_scoring_image_no_torch() -> None:
    train = (INFRA / "docker" / "Dockerfile.train").read_text()
    assert "download.pytorch.org/whl/cpu" in train
    score = (INFRA / "docker" / "Dockerfile.score").read_text()
    instructions = [line for line in score.splitlines() if not line.lstrip().startswith("#")]
    assert not any("torch" in line for line in instructions)
    assert "--no-deps" in score and "['serve']" in score
    serve = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["serve"]
    assert not any(re.match(r"(torch|prefect|dvc|great-expectations|timm)\b", r) for r in serve)


SERVE_IMPORTS = """
import sys, json
from importlib.metadata import packages_distributions
sys.modules["torch"] = None
import normalcy.cli, normalcy.cli_scoring, normalcy.serving, normalcy.scoring
from normalcy.scoring import readers, writer, prediction_log, describe
top = {name.split(".")[0] for name, module in list(sys.modules.items()) if module}
dists = packages_distributions()
print(json.dumps(sorted({d for name in top for d in dists.get(name, [])})))
"""


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=\[;!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_serve_extra_holds_every_dependency_scoring_imports() -> None:
    """The slim image installs the package --no-deps plus the `serve` extra: each of the
    package's own dependencies that the scoring commands import must be in that extra."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    serve = {_requirement_name(r) for r in project["optional-dependencies"]["serve"]}
    serve |= {"mlflow"} if "mlflow-skinny" in serve else set()  # the same `mlflow` module
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_IMPORTS],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    imported = {name.lower().replace("_", "-") for name in json.loads(proc.stdout)}
    needed = (imported & declared) - {"normalcy"}
    assert {"onnxruntime", "numpy", "fastapi"} <= needed, needed
    assert needed <= serve, f"scoring imports {sorted(needed - serve)}, not in the serve extra"


def test_kubernetes_objects_of_the_stack() -> None:
    objects = k8s_objects()
    for key in (
        ("Deployment", "normalcy-score"),
        ("Service", "normalcy-score"),
        ("HorizontalPodAutoscaler", "normalcy-score"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("Deployment", "prefect-worker"),
    ):
        assert key in objects, f"infra/k8s has no {key}"
    score = _containers(objects[("Deployment", "normalcy-score")])[0]
    assert score["readinessProbe"]["httpGet"]["path"] == "/health"
    assert score["resources"]["limits"]["cpu"]
    hpa = objects[("HorizontalPodAutoscaler", "normalcy-score")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "normalcy-score"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    service = objects[("Service", "normalcy-score")]["spec"]
    assert (
        service["selector"]
        == objects[("Deployment", "normalcy-score")]["spec"]["selector"]["matchLabels"]
    )


def test_the_work_pool_template_gives_every_job_cpu_and_memory_requests_and_limits() -> None:
    """threads.py sizes torch from the cgroup CPU quota: a pod without a CPU limit would get
    one thread per node core."""
    template = json.loads((K8S / "prefect-base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    variables = template["variables"]["properties"]
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            placeholder = resources[kind][resource]
            name = re.fullmatch(r"\{\{ (\w+) \}\}", placeholder).group(1)
            assert variables[name]["default"], f"{name} has no default"
    assert variables["cpu_limit"]["default"] == variables["cpu_request"]["default"]


def test_docker_compose_config_accepts_the_file(tmp_path) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine: `docker compose config` cannot run")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"docker has no compose plugin here: {probe.stderr.strip()[:200]}")
    env = tmp_path / ".env"
    env.write_text(
        ENV_EXAMPLE.read_text()
        .replace("POSTGRES_PASSWORD=", "POSTGRES_PASSWORD=x")
        .replace("MINIO_ROOT_PASSWORD=", "MINIO_ROOT_PASSWORD=xxxxxxxx")
    )
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(env), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    missing = subprocess.run(  # without the secrets, compose refuses
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
