"""The background server check behind /ready: its answers, their age, a stuck check."""

from __future__ import annotations

import time

import pytest

from segs.config import load_settings
from segs.ops import readiness
from segs.ops.readiness import ServerCheck


def test_server_check_reports_unreachable_servers_and_its_age() -> None:
    settings = load_settings(env={"KAFKA_BROKERS": "127.0.0.1:1",
                                  "POSTGRES_URL": "postgresql://u@127.0.0.1:1/segs"},
                             env_file=None)
    check = ServerCheck(settings, interval_s=60)
    assert check.latest() == (["servers not checked yet"], None)
    check.start()
    try:
        deadline = time.monotonic() + 15
        while check.latest()[1] is None:
            assert time.monotonic() < deadline, "no check finished"
            time.sleep(0.05)
        missing, age = check.latest()
        assert missing == ["kafka does not answer", "database does not answer"]
        assert age is not None and 0 <= age < 5
    finally:
        check.stop()


def test_a_stuck_server_check_is_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    check = ServerCheck(load_settings(env={}, env_file=None))
    monkeypatch.setattr(check, "_checked_at", time.monotonic() - readiness.STALE_S - 1)
    monkeypatch.setattr(check, "_missing", [])
    missing, _ = check.latest()
    assert len(missing) == 1 and missing[0].startswith("server check is stale")


def test_supervisor_readiness_reads_the_cached_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from segs.runtime.state import WorkerState
    from segs.runtime.supervisor import Supervisor

    sup = Supervisor(load_settings(env={}, env_file=None), workers=2)
    assert sup.readiness(check_servers=False) == (
        False, {"workers": ["starting", "starting"],
                "missing": ["worker 0 is starting", "worker 1 is starting"]})
    sup.status[0] = sup.status[1] = WorkerState.RUNNING
    assert sup.readiness(check_servers=False)[0]
    ready, details = sup.readiness()
    assert not ready and details["missing"] == ["servers not checked yet"]
    assert details["checked_s_ago"] is None
    monkeypatch.setattr(sup.servers, "_missing", [])
    monkeypatch.setattr(sup.servers, "_checked_at", time.monotonic() - 1.0)
    ready, details = sup.readiness()
    assert ready and details["missing"] == [] and 1.0 <= float(details["checked_s_ago"]) < 2
