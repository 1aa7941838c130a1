"""deploy/: the Prometheus config and alert rules pass promtool (rules unit-tested by alerts_test.yml), the
Grafana provisioning points at what ships, and docker-compose.yml wires the three services together. Debian's
`docker-compose` (v1, installed by .ci/run) validates docker-compose.yml against its Compose-spec schema; the
wiring between the services is checked on the parsed file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus (Debian's package ships it; .ci/run installs it)"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, check=False)


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {test["name"] for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]}
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    covered = {case["alertname"] for test in cases for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert covered == alerts and len(tested) == len(alerts)  # every alert is shown firing


def test_a_broken_rule_test_fails(tmp_path: Path) -> None:
    """The unit tests can fail: the same cases against a rule whose threshold moved must not pass."""
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    rules = (PROMETHEUS / "alerts.yml").read_text()
    assert rules.count("> 0.95") == 1
    (tmp_path / "alerts.yml").write_text(rules.replace("> 0.95", "> 0.99"))
    result = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode != 0 and "Qwen3LocalGpuMemoryHigh" in result.stdout + result.stderr


def test_scrape_config_passes_promtool_check(tmp_path: Path) -> None:
    # the config as shipped, beside its rules and the key file docker-compose.yml mounts there
    shutil.copytree(PROMETHEUS, tmp_path / "prometheus")
    (tmp_path / "prometheus" / "secrets").mkdir()
    (tmp_path / "prometheus" / "secrets" / "api-key").write_text("a-key\n")
    result = promtool("check", "config", str(tmp_path / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["server:8000"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """host path (relative to the repository) → container path, for the service's ./ bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[source[2:]] = target
    return mounts


def test_compose_runs_server_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"server", "prometheus", "grafana"}
    server = services["server"]
    assert (ROOT / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert server["build"]["dockerfile"] == "Dockerfile.cuda"
    assert "8000:8000" in server["ports"]
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    named = {volume.split(":")[0] for service in services.values() for volume in service.get("volumes", [])}
    assert {name for name in named if not name.startswith("./")} <= set(compose["volumes"])
    assert services["prometheus"]["depends_on"] == ["server"] and services["grafana"]["depends_on"] == ["prometheus"]


def test_compose_mounts_what_deploy_ships(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = bind_mounts(services["prometheus"])
    assert prometheus["deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prometheus["deploy/prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    # the scrape config reads its key relative to itself: the compose file puts the server's key there
    key = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]["authorization"]
    assert prometheus["deploy/secrets/api-key"] == "/etc/prometheus/" + key["credentials_file"]
    assert bind_mounts(services["server"])["deploy/secrets/api-key"] == "/run/secrets/api-key"
    assert "/run/secrets/api-key" in " ".join(services["server"]["entrypoint"])
    grafana = bind_mounts(services["grafana"])
    for source in grafana:
        assert (ROOT / source).exists(), source
    assert grafana["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/qwen3-local.yml").read_text())
    assert grafana["deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_grafana_datasource_is_the_one_the_dashboard_uses(compose: dict[str, Any]) -> None:
    [source] = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["services"]["prometheus"]["ports"][0]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/qwen3-local.json").read_text())
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == source["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()


def test_compose_file_is_valid_for_docker_compose() -> None:
    docker_compose = shutil.which("docker-compose")
    assert docker_compose, "docker-compose is missing: install Debian's docker-compose package (.ci/run does)"
    checked = subprocess.run(
        [docker_compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
