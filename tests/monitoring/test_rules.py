"""deploy/prometheus: promtool accepts the scrape config and the alert rules, every rule's
unit tests pass (`promtool test rules`), and every rule is tested both firing and not."""

import subprocess

import pytest
import yaml

from tests.monitoring.deploy import ALERTS, PROMETHEUS, RULE_TESTS, alert_rules, rule_key, shortened
from tests.tools import require_tools

EXPECTED_RULES = {
    ("HighLatency", "ttft"),
    ("HighLatency", "itl"),
    ("LowCacheHitRate", "prefix_reuse_missed"),
    ("ModelOverload", "rejecting"),
    ("ModelOverload", "kv_full"),
    ("ModelOverload", "queueing"),
    ("BackendFailure", "worker_missing"),
    ("BackendFailure", "worker_died"),
    ("BackendFailure", "errors"),
    ("BackendFailure", "frontend_down"),
}


def promtool(*args: str, cwd=PROMETHEUS) -> subprocess.CompletedProcess:
    require_tools("promtool")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_accepts_the_scrape_config_and_its_rules():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_promtool_accepts_the_rules_and_the_shortened_ones(tmp_path):
    (tmp_path / "short.yml").write_text(shortened(1.0))
    for path in (ALERTS, tmp_path / "short.yml"):
        result = promtool("check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=[p.stem for p in RULE_TESTS])
def test_promtool_rule_unit_tests_pass(path):
    result = promtool("test", "rules", path.name, cwd=path.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails_the_unit_tests(tmp_path):
    """The unit tests can fail: the worker-death case expecting nothing where it fires."""
    case = yaml.safe_load((PROMETHEUS / "tests" / "backend_failure.yml").read_text())
    case["rule_files"] = [str(ALERTS)]
    died = next(t for t in case["tests"] if "death" in t["name"])
    died["alert_rule_test"][1]["exp_alerts"] = []
    (tmp_path / "wrong.yml").write_text(yaml.safe_dump(case))
    result = promtool("test", "rules", "wrong.yml", cwd=tmp_path)
    assert result.returncode == 1
    assert 'cause="worker_died"' in result.stdout + result.stderr


def test_every_rule_is_unit_tested_firing_and_not_firing():
    rules = {rule_key(rule) for rule in alert_rules()}
    assert rules == EXPECTED_RULES
    fired, quiet = set(), set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for check in test["alert_rule_test"]:
                if check["exp_alerts"]:
                    fired |= {
                        rule_key({**a, "alertname": check["alertname"]})
                        for a in check["exp_alerts"]
                    }
                else:
                    quiet |= {key for key in rules if key[0] == check["alertname"]}
    assert fired == rules
    assert quiet >= rules


def test_every_rule_says_why_its_threshold_and_wait():
    """A comment before each rule's expr states its threshold; each `for:` says why."""
    blocks = ALERTS.read_text().split("- alert: ")[1:]
    assert len(blocks) == len(EXPECTED_RULES)
    for block in blocks:
        head, rest = block.split("expr:", 1)
        assert "# " in head, head
        for_line = next(line for line in rest.splitlines() if line.strip().startswith("for:"))
        assert "  # " in for_line, for_line


@pytest.mark.parametrize(
    "factor, line, expected",
    [
        (1.0, "        for: 5m  # why", "        for: 5s  # why"),
        (1.0, "        for: 0s  # now", "        for: 0s  # now"),
        (2.0, "  rate(x[10m]) > 0.5 * rate(y[5m])", "  rate(x[20s]) > 0.5 * rate(y[10s])"),
        (1.0, "        # rate over [5m] in a comment", "        # rate over [5m] in a comment"),
    ],
)
def test_shortened_rules_scale_only_durations(factor, line, expected, monkeypatch, tmp_path):
    path = tmp_path / "alerts.yml"
    path.write_text(line + "\n")
    monkeypatch.setattr("tests.monitoring.deploy.ALERTS", path)
    assert shortened(factor) == expected + "\n"
