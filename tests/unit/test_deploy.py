"""Static checks of the container deployment: docker-compose.yml and the Dockerfile.

No Docker engine is needed: the compose file is validated against the Compose
specification's JSON schema and its structure is checked with PyYAML.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _check_jsonschema() -> str:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if exe.exists():
        return str(exe)
    found = shutil.which("check-jsonschema")
    if found is None:
        pytest.skip("check-jsonschema is not installed")
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict)
    return svcs


@pytest.fixture(scope="module")
def workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {name: svc for name, svc in services.items() if name.startswith("worker")}
    assert len(found) >= 2, sorted(services)
    return found


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):  # ["KEY=value", ...] form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_matches_compose_spec() -> None:
    proc = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert {"etcd", "gateway", "worker-1", "worker-2"} <= services.keys()


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} disables its healthcheck"


def test_etcd(services: dict[str, dict[str, Any]]) -> None:
    etcd = services["etcd"]
    assert re.fullmatch(r"quay\.io/coreos/etcd:v3\.5\.\d+", etcd["image"])
    args = " ".join(etcd["command"])
    assert "--listen-client-urls=http://0.0.0.0:2379" in args
    assert "--advertise-client-urls=http://etcd:2379" in args
    assert "endpoint" in etcd["healthcheck"]["test"]
    assert "health" in etcd["healthcheck"]["test"]


def test_gateway(services: dict[str, dict[str, Any]]) -> None:
    gw = services["gateway"]
    deps = gw["depends_on"]
    assert "etcd" in deps
    if isinstance(deps, dict):
        assert deps["etcd"]["condition"] == "service_healthy"
    assert "50051:50051" in [str(p) for p in gw["ports"]]
    env = _env(gw)
    assert env["MESHSERVE_GATEWAY_LISTEN"] == "0.0.0.0:50051"
    assert env["MESHSERVE_GATEWAY_ETCD"] == "etcd:2379"
    assert gw["command"] == ["gateway"]


def test_workers_have_their_own_gpu_id_and_address(
    workers: dict[str, dict[str, Any]],
) -> None:
    ids, addresses, gpus = set(), set(), set()
    for name, svc in workers.items():
        env = _env(svc)
        assert svc["command"] == ["worker"]
        assert "cuda:0" in env["MESHSERVE_WORKER_DEVICE"], name
        assert env["MESHSERVE_WORKER_ETCD"] == "etcd:2379"
        assert env["MESHSERVE_WORKER_LISTEN"] == "0.0.0.0:50061"
        assert env["MESHSERVE_WORKER_MODELS_DIR"] == "/models"
        ids.add(env["MESHSERVE_WORKER_WORKER_ID"])
        advertise = env["MESHSERVE_WORKER_ADVERTISE"]
        assert advertise == f"{name}:50061"
        addresses.add(advertise)

        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        dev = devices[0]
        assert dev["driver"] == "nvidia"
        assert "gpu" in dev["capabilities"]
        assert len(dev["device_ids"]) == 1
        gpus.add(dev["device_ids"][0])

        assert "etcd" in svc["depends_on"]
        assert svc.get("restart")
        assert svc.get("stop_grace_period")
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert len(ids) == len(workers), "worker ids must be distinct"
    assert len(addresses) == len(workers), "advertise addresses must be distinct"
    assert len(gpus) == len(workers), "each worker needs its own GPU"


def test_dockerfile_bakes_models_and_runs_offline() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^RUN .*meshserve models make-demo --models-dir /models", text, re.M)
    assert re.search(r"HF_HUB_OFFLINE=1", text)
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=", text, re.M)
    assert re.search(r"^USER (?!root\b|0\b)\S+", text, re.M), "must not run as root"
    assert re.search(r'^ENTRYPOINT \["meshserve"\]', text, re.M)
    assert re.search(r"^EXPOSE .*\b50051\b.*\b50061\b", text, re.M)
