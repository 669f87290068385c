"""`segs-stream bench --quick` end to end, so the benchmark code never rots.

Runs every scenario with tiny sizes against the session's real servers (passed on through
SEGS_TEST_KAFKA / SEGS_TEST_POSTGRES_URL, so no second Kafka starts) and checks the outputs
exist and hold figures; it asserts nothing about speed. Quix Streams is not installed here:
the peer scenario runs when its environment is already cached, else it says unavailable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEGS = str(Path(sys.executable).with_name("segs-stream"))


def test_bench_quick_writes_json_chart_and_figures(
        tmp_path: Path, kafka_server: Any, postgres_server: Any) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nhand-written text stays\n")
    env = {**os.environ, "SEGS_TEST_KAFKA": kafka_server.bootstrap,
           "SEGS_TEST_POSTGRES_URL": postgres_server.url,
           "SEGS_BENCH_PEER_INSTALL": "0"}  # the peer runs only if its venv is cached
    res = subprocess.run(
        [SEGS, "bench", "--quick", "--out", str(tmp_path / "results"), "--readme", str(readme)],
        env=env, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    [path] = (tmp_path / "results").glob("*-quick.json")
    result = json.loads(path.read_text())
    assert result["errors"] == {}
    s = result["scenarios"]
    assert s["ceiling"]["read"]["readings_per_s"] > 0
    assert s["ceiling"]["read_decode"]["valid"] == result["dataset"]["readings"]
    assert [r["workers"] for r in s["pipeline"]] == [1, 2]
    assert all(r["exit_code"] == 0 and r["worker_peak_rss_mb"] for r in s["pipeline"])
    assert len(s["scaling"]) == len(result["plan"]["scaling_meters"])
    assert s["scaling_dense"]["readings_per_meter"] == 10
    # the same runs with regional aggregates off (issue 18)
    assert "regional_cost" in s["pipeline"][1] and "regional_cost" in s["scaling"][-1]
    assert s["latency"]["alert"]["count"] > 0
    assert [r["partials"] for r in s["checkpoint"]] == [1_000, 10_000]
    assert all(r["merge_rows"] >= r["partials"] for r in s["checkpoint"])  # + 15m roll-ups
    peer = s["peer"][0]
    assert peer.get("readings_per_s", 0) > 0 or peer.get("unavailable")
    assert {t["target"] for t in result["targets"]}
    assert list((tmp_path / "results").glob("*-quick.png"))
    text = readme.read_text()
    assert "hand-written text stays" in text and "figures:begin" in text and path.name in text
