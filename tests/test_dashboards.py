"""The Grafana dashboard and the Prometheus alert rules use only metrics the daemon exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AS_SCHEDULER, SCHEDULER_TOKEN, AppClient
from tests.db import execute
from tests.scrape import scrape

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "model-registry.json"
ALERTS = ROOT / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "prometheus" / "alerts.test.yml"
METRIC = re.compile(r"\b(model_registry_[a-z0-9_]+)\b")
DURATION = re.compile(r"^\d+(ms|s|m|h|d|w|y)$")


def _dashboard_queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_queries(item)


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _balanced(expr: str) -> bool:
    """Brackets outside string literals open and close in order."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack


def test_the_dashboard_imports_as_is() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "model-registry"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "free",
        "usable",
        "pending",
        "active models",
        "poll errors",
        "age",
        "requests",
        "latency",
        "reservations",
        "fleet",
    ):
        assert topic in titles, topic
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(_balanced(t["expr"]) for t in panel["targets"])


def test_the_alert_rules_are_well_formed() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} == {
        "ModelRegistryTargetDown",
        "ModelRegistryRestartLoop",
        "ModelRegistryDatabaseUnreachable",
        "ModelRegistryReadingsStale",
        "ModelRegistryPollerFailing",
        "ModelRegistryNoModelActive",
        "ModelRegistryFleetHostStale",
        "ModelRegistryFootprintAboveDeclared",
        "ModelRegistryFootprintBelowDeclared",
    }
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert DURATION.match(rule["for"]), rule["for"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert _balanced(rule["expr"]), rule["expr"]


def _promtool() -> str:
    found = os.environ.get("MODEL_REGISTRY_TEST_PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip(
            "promtool is not installed (Debian: apt-get install prometheus, or point "
            "MODEL_REGISTRY_TEST_PROMTOOL at one); .ci/run provides it"
        )
    return found


def test_every_alert_rule_has_promtool_unit_tests_and_they_pass() -> None:
    promtool = _promtool()
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Each rule is shown firing at least once, and not firing at least once.
    scenarios = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    checks = [check for scenario in scenarios for check in scenario["alert_rule_test"]]
    for rule in _rules():
        of_rule = [c for c in checks if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in of_rule), f"{rule['alert']} never shown firing"
        assert any(not c["exp_alerts"] for c in of_rule), f"{rule['alert']} never shown quiet"


async def test_every_metric_they_use_is_exported(start_app: AppClient, database_url: str) -> None:
    # A model with samples, so its footprint series exist.
    await execute(
        database_url,
        "INSERT INTO footprint_samples (instance_id, model, gpu_name, peak_mib, host) "
        "SELECT 'i' || n, 'medium', 'Simulated GPU', 3000, 'h' FROM generate_series(1, 3) AS n",
    )
    client = await start_app(scheduler_token=SCHEDULER_TOKEN)
    # One of everything: a request, a reservation, a refusal, so every series exists.
    await client.get("/models")
    await client.post("/reservations", json={"vram_mib": 1}, headers=AS_SCHEDULER)
    exported = {name for name, _labels in await scrape(client)}
    used = set()
    for query in _dashboard_queries(json.loads(DASHBOARD.read_text())):
        used |= set(METRIC.findall(query))
    for rule in _rules():
        used |= set(METRIC.findall(rule["expr"]))
    assert used, "the files use metrics"
    assert used <= exported, sorted(used - exported)
