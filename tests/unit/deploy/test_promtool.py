"""The alert rules, checked by Prometheus's own tool: `promtool check rules` and the unit
tests of `deploy/prometheus/rules.test.yml`, one test per alert (issue 19, item 6).

promtool comes with the Debian package ``prometheus`` (`.ci/run` installs it when missing
and root); without it the tests are skipped and say so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).parents[3] / "deploy" / "prometheus"
RULES, RULE_TESTS = PROMETHEUS / "rules.yml", PROMETHEUS / "rules.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed: the alert rules are not checked "
                    "(apt-get install prometheus)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_runs_the_rule_tests() -> None:
    out = promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_test_that_sees_it_fire() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    firing = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts and alerts == firing
