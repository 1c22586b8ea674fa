"""What deploy/ ships, read the way the monitoring tests need it: the alert rules (each
rule as its alert name and `cause` label), the dashboard's PromQL, and the rules with
their durations shortened for a test that cannot wait minutes."""

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "kvmesh.json"
DURATION = re.compile(r"\b(\d+)([smh])\b")
SECONDS = {"s": 1, "m": 60, "h": 3600}


def alert_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def rule_key(rule_or_alert: dict) -> tuple[str, str]:
    """(alert name, cause): what tells the shipped rules apart."""
    labels = rule_or_alert.get("labels") or rule_or_alert.get("exp_labels") or {}
    return rule_or_alert.get("alert") or rule_or_alert["alertname"], labels["cause"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the dashboard, in panel order."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


def shortened(seconds_per_minute: float) -> str:
    """alerts.yml with every duration (`for:` and range selectors) scaled so that a
    minute lasts `seconds_per_minute` seconds (at least 1 s); nothing else changes."""

    def scale(match: re.Match) -> str:
        seconds = int(match.group(1)) * SECONDS[match.group(2)]
        return f"{max(1, round(seconds * seconds_per_minute / 60))}s" if seconds else "0s"

    text = ALERTS.read_text()
    out = []
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("for:"):
            line = DURATION.sub(scale, line, count=1)
        elif not stripped.startswith("#"):
            line = re.sub(r"\[(\d+[smh])\]", lambda m: f"[{DURATION.sub(scale, m.group(1))}]", line)
        out.append(line)
    return "\n".join(out) + "\n"
