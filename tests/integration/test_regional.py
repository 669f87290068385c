"""Regional 1-minute aggregates end to end: `segs-stream run --workers 2`, real servers.

Simulated readings of 2,000 meters in 10 regions (late, out-of-order, duplicate and invalid
ones included) flow through the service; every (region, window) of the reference must be
in aggregates_1m_regional, equal to the roll-up of the stored rows bit for bit and to the
reference of the simulator's file, and the latest message of each on the regional topic
must carry those figures and the reference's meter list. Late readings for a window
published long ago then re-publish it with the new values.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest

from segs.times import iso_ms
from segs.tools.simulator import SimMessage
from tests.conftest import KafkaServer, Topics
from tests.fault.conftest import produce_raw
from tests.pipeline import (
    Service,
    end_offsets,
    expected,
    latest_regional,
    service_env,
    simulate,
    wait_consumed,
    wait_regional,
)
from tests.reference import parse_reading, regional

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MINUTE_MS = 60_000
CAPS = {"north": 8_000.0, "region-7": 5_000.0}
CAPS_ENV = "north=8000,region-7=5000"


def _start_ms() -> int:
    now = int(time.time() * 1000)
    return now - now % MINUTE_MS - 20 * MINUTE_MS


def regional_reference(messages: list[SimMessage]) -> dict[tuple[str, int], object]:
    want, _ = expected(messages, int(time.time() * 1000))
    return regional(want[60], CAPS)


def late_readings(messages: list[SimMessage], window_ms: int) -> list[SimMessage]:
    """Two valid readings for a window long closed: one more for a meter of ``north`` that
    read in it (its average and the region's total change), and one for a meter never
    seen (the region's meter count and list change)."""
    now = int(time.time() * 1000)
    north = sorted({r["meter_id"] for m in messages
                    if isinstance(r := parse_reading(m.value, now), dict)
                    and r["region"] == "north" and window_ms <= r["ts_ms"] < window_ms
                    + MINUTE_MS})
    assert north
    out = []
    for meter, power in ((north[0], 4321.5), ("late-meter-1", 17.25)):
        value = json.dumps({"meterId": meter, "region": "north", "powerKw": power,
                            "timestamp": iso_ms(window_ms + 30_123)}).encode()
        out.append((meter.encode(), value, None))
    return out  # type: ignore[return-value]


def test_regional_aggregates_of_2000_meters_in_10_regions(
        kafka_server: KafkaServer, db_url: str, topics: Topics, tmp_path: Path) -> None:
    bootstrap = kafka_server.bootstrap
    svc = Service(service_env(bootstrap, db_url, topics.env(), REGION_CAPACITY_KW=CAPS_ENV),
                  tmp_path / "service.log", workers=2).start()
    try:
        messages = simulate(
            bootstrap, topics.input, tmp_path / "sim.jsonl", meters=2000, regions=10, seed=18,
            count=2000 * 15, interval_s=20, start_ms=_start_ms(), duplicate_fraction=0.01,
            out_of_order_fraction=0.01, late_fraction=0.01, invalid_fraction=0.005)
        ends = end_offsets(bootstrap, topics.input)
        wait_consumed(db_url, topics.group, topics.input, ends, service=svc)
        ref = regional_reference(messages)
        assert len({region for region, _ in ref}) == 10 and len(ref) >= 50
        assert wait_regional(db_url, bootstrap, topics.regional, ref, CAPS) == len(ref)
        before = latest_regional(bootstrap, topics.regional)

        window = max((start for region, start in ref if region == "north"),
                     key=lambda start: ref[("north", start)].meter_count)  # type: ignore[attr-defined]
        late = late_readings(messages, window)
        messages += produce_raw(bootstrap, topics.input, late)  # type: ignore[arg-type]
        wait_consumed(db_url, topics.group, topics.input, end_offsets(bootstrap, topics.input),
                      service=svc)
        ref = regional_reference(messages)
        wait_regional(db_url, bootstrap, topics.regional, ref, CAPS)
        after = latest_regional(bootstrap, topics.regional)
        key = ("north", window)
        assert after[key]["meter_count"] == before[key]["meter_count"] + 1
        assert "late-meter-1" in after[key]["active_meters"]
        assert after[key]["max_consumption"] == 4321.5
        assert after[key]["total_consumption"] > before[key]["total_consumption"]
        assert after[key]["load_percentage"] > before[key]["load_percentage"]
        others = {k: v for k, v in after.items() if k != key}
        assert others == {k: v for k, v in before.items() if k != key}
        assert svc.stop() == 0, svc.log_text()[-2000:]
    finally:
        svc.kill()


def test_regional_aggregates_off_write_and_publish_nothing(
        kafka_server: KafkaServer, db_url: str, topics: Topics, tmp_path: Path) -> None:
    bootstrap = kafka_server.bootstrap
    svc = Service(service_env(bootstrap, db_url, topics.env(), REGIONAL_AGGREGATES="off"),
                  tmp_path / "service.log", workers=1).start()
    try:
        simulate(bootstrap, topics.input, tmp_path / "sim.jsonl", meters=200, regions=3,
                 seed=3, count=2000, interval_s=20, start_ms=_start_ms())
        wait_consumed(db_url, topics.group, topics.input, end_offsets(bootstrap, topics.input),
                      service=svc)
        assert svc.stop() == 0
    finally:
        svc.kill()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM regional_dirty").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM aggregates_1m_regional").fetchone() == (0,)
    assert latest_regional(bootstrap, topics.regional) == {}
