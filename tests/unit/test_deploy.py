"""Static checks of the container deployment: docker-compose.yml, the Dockerfile and the
observability stack (deploy/prometheus, deploy/grafana).

No Docker engine is needed: the compose file is validated against the Compose
specification's JSON schema and its structure is checked with PyYAML; the Grafana
dashboard's PromQL is checked against the metrics docs/metrics.md lists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
METRICS_DOC = ROOT / "docs" / "metrics.md"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "meshserve.json"
GRAFANA_DATASOURCES = (
    ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
)
GRAFANA_DASHBOARDS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "meshserve.yml"


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


# --------------------------------------------------------------------------- observability

# The metrics port each scrape job reads from its services' environment.
_METRICS_PORT_ENV = {
    "meshserve-gateway": "MESHSERVE_GATEWAY_METRICS_PORT",
    "meshserve-worker": "MESHSERVE_WORKER_METRICS_PORT",
}
_DS = {"type": "prometheus", "uid": "${datasource}"}


def _load_yaml(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), path
    return data


def _default(value: str) -> str:
    """`${VAR:-default}` as Compose resolves it with VAR unset; other values unchanged."""
    m = re.fullmatch(r"\$\{\w+:?-([^}]*)\}", value)
    return m.group(1) if m else value


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), address
    return host, int(port)


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Short-syntax volumes as {container path: source}."""
    out = {}
    for item in svc.get("volumes", []):
        source, target = str(item).split(":")[:2]
        out[target] = source
    return out


def _published(svc: dict[str, Any]) -> set[int]:
    """Container ports published ("[ip:]host:container") or exposed."""
    ports = {int(str(p).rsplit(":", 1)[-1]) for p in svc.get("ports", [])}
    return ports | {int(p) for p in svc.get("expose", [])}


# docs/metrics.md table rows: | `name` [, `name`] | type | labels | meaning |
_DOC_ROW = re.compile(r"^\|([^|]*`meshserve_[^|]*)\|([^|]*)\|([^|]*)\|", re.M)
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def documented_metrics(text: str) -> dict[str, frozenset[str]]:
    """The series names docs/metrics.md promises, each with its documented labels.

    Counters are served with `_total` (whether or not the table spells it), histograms as
    `_bucket` (plus `le`), `_sum` and `_count`; a row without a type repeats metrics that
    another row describes.
    """
    families: dict[str, tuple[str, frozenset[str]]] = {}
    repeats: list[str] = []
    for names_cell, type_cell, labels_cell in _DOC_ROW.findall(text):
        names = re.findall(r"`(meshserve_\w+)`", names_cell)
        kind = type_cell.strip()
        if not kind:
            repeats.extend(names)
            continue
        assert kind in _SUFFIXES, f"{names}: unknown metric type {kind!r}"
        labels = frozenset(x.strip() for x in labels_cell.split(",") if x.strip())
        for name in names:
            families[name] = (kind, labels)
    assert set(repeats) <= families.keys(), set(repeats) - families.keys()
    served: dict[str, frozenset[str]] = {}
    for name, (kind, labels) in families.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        for suffix in _SUFFIXES[kind]:
            served[base + suffix] = labels | {"le"} if suffix == "_bucket" else labels
    return served


_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names,
    strings, durations, numbers and Grafana variables left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        if m.group(2) is None and m.group(1).lower() not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def expr_problems(expr: str, documented: dict[str, frozenset[str]]) -> list[str]:
    """Metric names docs/metrics.md does not list (process_* aside), and label matchers on
    labels a metric does not have (job and instance are Prometheus's; the worker job adds
    worker, deploy/prometheus/prometheus.yml)."""
    problems = [
        f"unknown metric {name}"
        for name in sorted(metric_names(expr))
        if name not in documented and not name.startswith("process_")
    ]
    for name, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        if name not in documented:
            continue
        allowed = documented[name] | {"job", "instance"}
        if name.startswith("meshserve_worker_"):
            allowed |= {"worker"}
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            if label not in allowed:
                problems.append(f"{name} has no label {label}")
    return problems


@pytest.fixture(scope="module")
def documented() -> dict[str, frozenset[str]]:
    return documented_metrics(METRICS_DOC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        data = json.load(f)
    assert isinstance(data, dict)
    return data


def _graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _graph_panels(dashboard)
        for target in panel["targets"]
    ]


def test_metrics_doc_parses(documented: dict[str, frozenset[str]]) -> None:
    assert len(documented) > 50, sorted(documented)
    assert documented["meshserve_gateway_requests_total"] == {"method", "model", "code"}
    assert "meshserve_gateway_requests" not in documented  # counters only with _total
    assert documented["meshserve_gateway_request_duration_seconds_bucket"] == {
        "method",
        "model",
        "le",
    }
    assert "meshserve_gateway_request_duration_seconds" not in documented  # no bare histogram
    assert documented["meshserve_worker_queue_depth"] == {"model"}
    assert documented["meshserve_gateway_open_streams"] == frozenset()
    assert "meshserve_registry_request_duration_seconds_count" in documented


def test_expr_checker_catches_what_it_must(documented: dict[str, frozenset[str]]) -> None:
    share = (
        "sum by (worker) (rate(meshserve_gateway_worker_picks_total[$__rate_interval]))"
        " / ignoring(worker) group_left sum(rate(meshserve_gateway_worker_picks_total[5m]))"
    )
    assert metric_names(share) == {"meshserve_gateway_worker_picks_total"}
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{model=~"$model", x="b c"}[1m])))'
        " / on (job) process_open_fds offset 5m > bool 1e3"
    ) == {"a_bucket", "process_open_fds"}
    assert expr_problems(share, documented) == []
    assert expr_problems("rate(process_cpu_seconds_total[1m])", documented) == []
    assert expr_problems("rate(meshserve_gateway_made_up_total[1m])", documented) == [
        "unknown metric meshserve_gateway_made_up_total"
    ]
    assert expr_problems("rate(meshserve_gateway_requests[1m])", documented) == [
        "unknown metric meshserve_gateway_requests"  # the counter is served with _total
    ]
    assert expr_problems("meshserve_worker_prefill_seconds", documented) == [
        "unknown metric meshserve_worker_prefill_seconds"  # a histogram: _bucket/_sum/_count
    ]
    assert expr_problems('meshserve_gateway_queue_length{model=~"$model"}', documented) == [
        "meshserve_gateway_queue_length has no label model"
    ]
    assert expr_problems('sum(meshserve_worker_inflight{worker="w", job="j"})', documented) == []


def test_dashboard_panels_have_a_datasource_and_targets(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    panels = _graph_panels(dashboard)
    assert len(panels) >= 20
    nested = [p for row in dashboard["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in dashboard["panels"] + nested]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        title = panel["title"]
        assert panel.get("datasource") == _DS, title
        assert panel["targets"], f"{title} has no target"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target.get("datasource") == _DS, title
            assert target["expr"].strip(), title
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, title
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"] == _DS
    query = model["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(meshserve_gateway_requests_total, model)"
    assert model["includeAll"] and model["allValue"] == ".*"  # regex matchers: model=~"$model"
    assert any('model=~"$model"' in expr for _, expr in _exprs(dashboard))
    for title, expr in _exprs(dashboard):
        assert 'model="$model"' not in expr, f"{title}: a multi-value variable needs =~"


def test_dashboard_uses_only_documented_metrics(
    dashboard: dict[str, Any], documented: dict[str, frozenset[str]]
) -> None:
    problems = [
        f"{title}: {problem}"
        for title, expr in _exprs(dashboard)
        for problem in expr_problems(expr, documented)
    ]
    assert not problems, "\n".join(problems)


def test_dashboard_covers_the_fleet(dashboard: dict[str, Any]) -> None:
    used = {name for _, expr in _exprs(dashboard) for name in metric_names(expr)}
    wanted = {
        "meshserve_gateway_requests_total",
        "meshserve_gateway_request_duration_seconds_bucket",
        "meshserve_gateway_time_to_first_token_seconds_bucket",
        "meshserve_gateway_inter_token_seconds_bucket",
        "meshserve_gateway_tokens_streamed_total",
        "meshserve_worker_tokens_generated_total",
        "meshserve_gateway_queue_length",
        "meshserve_gateway_queue_wait_seconds_bucket",
        "meshserve_gateway_admission_rejections_total",
        "meshserve_gateway_retries_total",
        "meshserve_gateway_worker_picks_total",
        "meshserve_gateway_routing_decision_seconds_bucket",
        "meshserve_worker_inflight",
        "meshserve_worker_queue_depth",
        "meshserve_worker_kv_cache_usage_ratio",
        "meshserve_worker_batch_size_bucket",
        "meshserve_worker_prefill_seconds_bucket",
        "meshserve_worker_decode_seconds_per_token_bucket",
        "meshserve_worker_model_state",
        "meshserve_worker_errors_total",
        "meshserve_gateway_registry_connected",
        "meshserve_gateway_registry_view_age_seconds",
        "meshserve_worker_device_memory_used_bytes",
        "meshserve_worker_device_memory_total_bytes",
    }
    assert wanted <= used, sorted(wanted - used)
    quantiles = " ".join(expr for _, expr in _exprs(dashboard))
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le" in quantiles


def test_prometheus_scrapes_the_compose_services(
    services: dict[str, dict[str, Any]], workers: dict[str, dict[str, Any]]
) -> None:
    config = _load_yaml(PROMETHEUS)
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(_METRICS_PORT_ENV)
    expected_hosts = {"meshserve-gateway": {"gateway"}, "meshserve-worker": set(workers)}
    for name, job in jobs.items():
        targets = [t for group in job["static_configs"] for t in group["targets"]]
        hosts = set()
        for target in targets:
            host, port = _host_port(target)
            assert host in services, f"{name}: {target} is no compose service"
            env = _env(services[host])
            assert port == int(env[_METRICS_PORT_ENV[name]]), f"{name}: {target}"
            assert port in _published(services[host]), f"{target} is not exposed"
            hosts.add(host)
        assert hosts == expected_hosts[name], f"{name} scrapes {sorted(hosts)}"
    # The Kubernetes discovery is an example in a comment, not a live job.
    assert "kubernetes_sd_configs" in PROMETHEUS.read_text(encoding="utf-8")
    assert all("kubernetes_sd_configs" not in job for job in jobs.values())


def test_services_export_metrics_and_traces_to_the_stack(
    services: dict[str, dict[str, Any]], workers: dict[str, dict[str, Any]]
) -> None:
    wired = {"gateway": services["gateway"], **workers}
    for name, svc in wired.items():
        env = _env(svc)
        prefix = "MESHSERVE_GATEWAY_" if name == "gateway" else "MESHSERVE_WORKER_"
        assert 0 < int(env[prefix + "METRICS_PORT"]) < 65536, name
        assert env[prefix + "METRICS_HOST"] == "0.0.0.0", name  # reachable from prometheus
        endpoint = urlsplit(env["MESHSERVE_OTLP_ENDPOINT"])
        assert endpoint.scheme == "http" and endpoint.hostname == "jaeger", name
        assert endpoint.port == 4317, name  # OTLP/gRPC
        assert 0.0 < float(_default(env["MESHSERVE_TRACE_SAMPLE_RATIO"])) <= 1.0, name
    assert 4317 in _published(services["jaeger"])
    assert 9464 in _published(services["gateway"])  # the fleet page and /metrics from the host


def test_observability_services(services: dict[str, dict[str, Any]]) -> None:
    images = {
        "prometheus": r"prom/prometheus:v3\.\d+\.\d+",
        "grafana": r"grafana/grafana:\d+\.\d+\.\d+",
        "jaeger": r"jaegertracing/(?:jaeger:2|all-in-one:1)\.\d+\.\d+",
    }
    for name, pattern in images.items():
        assert re.fullmatch(pattern, services[name]["image"]), services[name]["image"]
    assert 9090 in _published(services["prometheus"])
    assert 3000 in _published(services["grafana"])
    assert 16686 in _published(services["jaeger"])

    prom = services["prometheus"]
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    assert _mounts(prom)[config_arg.split("=", 1)[1]] == "./deploy/prometheus/prometheus.yml"

    grafana = services["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = _load_yaml(GRAFANA_DASHBOARDS)["providers"][0]
    assert provider["type"] == "file"
    dashboard_dir = provider["options"]["path"]
    assert mounts[f"{dashboard_dir}/meshserve.json"] == "./deploy/grafana/meshserve.json"
    env = _env(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(dashboard_dir + "/")

    (datasource,) = _load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.port == 9090


def test_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for source in _mounts(svc).values():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            elif not source.startswith("/"):
                assert source in declared, f"{name}: volume {source} is not declared"
