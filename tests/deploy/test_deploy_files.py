"""The deployment files: Prometheus config, rules and their unit tests (promtool), the Grafana
dashboard as Grafana loads it, compose and Kubernetes manifests against what the repo has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.dashboard_module import load_dashboard

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERVER_PORT = 8000  # the Dockerfile's entry point: smoothsmoe serve --port 8000


def promtool(*args: str) -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed (deploy/install.sh installs Debian's prometheus package)"
    p = subprocess.run([binary, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_promtool_checks_config_and_rules_and_runs_the_alert_unit_tests():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in promtool("check", "rules", "rules/smoothsmoe.rules.yml")
    assert "SUCCESS" in promtool("test", "rules", "tests/smoothsmoe.rules.test.yml")


def test_dashboard_json_is_generated_from_dashboard_py():
    committed = json.loads((DEPLOY / "grafana" / "dashboards" / "smoothsmoe.json").read_text())
    assert committed == load_dashboard().grafana_json(), "run: python deploy/grafana/dashboard.py"


def test_dashboard_loads_the_way_grafana_would():
    d = json.loads((DEPLOY / "grafana" / "dashboards" / "smoothsmoe.json").read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["y"] >= 0, p["title"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & cell, f"{p['title']} overlaps another panel"
        cells |= cell
        if p["type"] == "row":
            continue
        assert p["description"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" and t["expr"] for t in p["targets"])
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables, (p["title"], var)
    kinds = {p["type"] for p in d["panels"]}
    assert {"row", "timeseries", "stat", "heatmap"} <= kinds


def test_dashboard_uses_only_recorded_or_exported_series():
    """Every smoothsmoe series a panel names is a recording rule or a metric the server exports."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "smoothsmoe.rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exported = {"smoothsmoe_epsilon", "smoothsmoe_epsilon_bound", "smoothsmoe_extra_budget", "smoothsmoe_config_info",
                "smoothsmoe_tokens_routed_total"}
    for panel in load_dashboard().PANELS:
        for expr, _ in panel.targets:
            for name in re.findall(r"smoothsmoe[:_][\w:]+", expr):
                assert name in recorded | exported, (panel.title, name)


def dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\w+)", (REPO / "Dockerfile").read_text(), flags=re.MULTILINE))


def test_dockerfile_has_cpu_and_cuda_targets_and_runs_as_non_root():
    text = (REPO / "Dockerfile").read_text()
    assert {"cpu", "cuda"} <= dockerfile_targets()
    assert "USER smoothsmoe" in text and f'"--port", "{SERVER_PORT}"' in text and "deploy/install.sh" in text
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", text, flags=re.MULTILINE):
        for path in src.split():
            assert (REPO / path).exists(), path


def test_compose_references_what_exists():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("smoothsmoe-cpu", "smoothsmoe-gpu"):
        s = services[name]
        assert (DEPLOY / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
        assert s["build"]["target"] in dockerfile_targets()
        assert s["ports"] == [f"{SERVER_PORT}:{SERVER_PORT}"]
        assert "smoothsmoe" in s["networks"]["default"]["aliases"]  # the name prometheus.yml scrapes
    for s in services.values():
        for volume in s.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (DEPLOY / host).exists(), volume
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"smoothsmoe:{SERVER_PORT}"]
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090" and "prometheus" in services
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "smoothsmoe.yml").read_text())
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert (DEPLOY / mounted[provider["providers"][0]["options"]["path"]] / "smoothsmoe.json").is_file()


def test_kubernetes_manifests_fit_together():
    docs = {}
    for f in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            docs[doc["kind"]] = doc
    assert set(docs) == {"Deployment", "Service", "ServiceMonitor"}
    dep, svc, mon = docs["Deployment"], docs["Service"], docs["ServiceMonitor"]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert container["image"].split(":")[-1] in dockerfile_targets()
    assert container["ports"] == [{"name": "http", "containerPort": SERVER_PORT}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    from smoothsmoe_server.commands.cli import GRACEFUL_SHUTDOWN_S, SHUTDOWN_TIMEOUT_S

    assert pod["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_TIMEOUT_S + GRACEFUL_SHUTDOWN_S  # drain fits
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
