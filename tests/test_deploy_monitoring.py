"""deploy/: the Grafana dashboard and the Prometheus alert rules are importable, name only
metrics the daemon exposes, and (where promtool is installed) parse and fire as intended."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from audience_sync.http.metrics import Metrics
from tests.conftest import skip_without

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "alerts.yml"
RULE_TESTS = DEPLOY / "alerts.test.yml"
PROMTOOL = shutil.which("promtool")


@pytest.fixture
def needs_promtool() -> None:
    """Skip without promtool, saying why; fail when the run requires it (CI: .ci/run)."""
    skip_without(
        "promtool", None if PROMTOOL else "promtool is not installed (Debian: apt-get install prometheus)"
    )


# Series Prometheus makes itself, not the daemon.
PROMETHEUS_SERIES = {"up"}
# A dashboard's template variables, as Grafana would fill them in, so that its queries parse.
GRAFANA_VARIABLES = {"$job": "audience-sync", "$instance": ".*", "$audience": ".*"}
PANEL_TYPES = {"stat", "bargauge", "timeseries", "table", "gauge", "row", "text"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                "offset", "bool", "inf", "nan"}  # fmt: skip


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def panel_targets() -> list[dict[str, Any]]:
    return [target for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def exposed_series() -> set[str]:
    """Every series name the daemon's /metrics shows, once each metric has a sample."""
    metrics = Metrics(["pro_plan"], timedelta(hours=3), timedelta(minutes=30))
    metrics.record_run("pro_plan", "success", sent=3, failed=1, duration=2.5)
    metrics.set_pending("pro_plan", 4)
    metrics.set_last_success("pro_plan", datetime.now(UTC))
    metrics.set_next_run("pro_plan", datetime.now(UTC))
    text = metrics.exposition().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels, strings,
    durations and Grafana variables left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    tokens = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {token for token in tokens if token.lower() not in PROMQL_WORDS}


def test_the_name_extraction_sees_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, audience) (increase(audience_sync_run_duration_seconds_bucket'
        '{job="$job", audience=~"a|b"}[6h]))) > 1.5 unless on (audience) up offset 6h and x:y:z'
    )  # fmt: skip
    assert metric_names(expr) == {"audience_sync_run_duration_seconds_bucket", "up", "x:y:z"}


# --- the dashboard ------------------------------------------------------------------------------


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert board["id"] is None  # Grafana assigns one on import
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len(panels) >= 8
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in PANEL_TYPES
        assert panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & covered, f"panel {panel['title']!r} overlaps another"
        cells |= covered
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == "${datasource}"
    for name in ("job", "instance", "audience"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_metric_the_dashboard_and_the_rules_name_is_exposed() -> None:
    exposed = exposed_series()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = exposed | PROMETHEUS_SERIES | recorded
    named: dict[str, set[str]] = {
        "dashboard": set().union(*(metric_names(t["expr"]) for t in panel_targets())),
        "dashboard variables": {
            re.match(r"label_values\((\w+)", v["query"]["query"]).group(1)  # type: ignore[union-attr]
            for v in dashboard()["templating"]["list"]
            if v["type"] == "query"
        },
        "rules": set().union(*(metric_names(rule["expr"]) for rule in rules())),
        "rule tests": {
            series["series"].split("{")[0]
            for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
            for series in test["input_series"]
        },
    }
    for where, names in named.items():
        assert names, where
        assert names <= known, f"{where} names series the daemon does not expose: {sorted(names - known)}"
    assert "audience_sync_last_success_timestamp_seconds" in named["rules"]  # the extraction works


@pytest.mark.usefixtures("needs_promtool")
def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel query, variables filled in as Grafana would, checked by promtool as a rule."""
    records = []
    for number, target in enumerate(panel_targets()):
        expr = target["expr"]
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        records.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))

    result = promtool("check", "rules", str(path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(records)} rules found" in result.stdout


# --- the alert rules ----------------------------------------------------------------------------


def test_the_rules_cover_the_four_kinds_of_trouble() -> None:
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    for name in (
        "AudienceSyncDown",
        "AudienceSyncStale",
        "AudienceSyncPendingGrowing",
        "AudienceSyncRunsFailing",
    ):
        assert name in alerts
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts - fires == set(), "alerts no test fires"
    assert alerts - quiet == set(), "alerts no test keeps quiet"


@pytest.mark.usefixtures("needs_promtool")
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@pytest.mark.usefixtures("needs_promtool")
def test_the_alerts_fire_on_the_series_that_should_raise_them() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)
