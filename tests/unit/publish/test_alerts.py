"""Alert messages for the ``alerts`` topic: exact JSON, stable ids, original wording."""

from __future__ import annotations

import json
import uuid

import numpy as np

from segs.detection.detector import AnomalyDetector, Detections
from segs.intake.readings import Interner, Readings
from segs.publish.alerts import (
    ALERT_ID_NAMESPACE,
    alert_message,
    encode_alerts,
    to_fixed,
)

TS = 1_795_759_217_123  # 2026-11-27T06:00:17.123Z


def batch() -> tuple[Readings, Interner, Interner]:
    meters, regions = Interner(), Interner()
    meters.slot("MTR-00000001")
    meters.slot("MTR-00000042")
    regions.slot("Pune-West")
    regions.slot("Mumbai-North")
    n = 12
    r = Readings(
        meter=np.array([1] * n, np.int32),
        region=np.array([1] * n, np.int32),
        ts_ms=np.array([TS - 11_000 + 1000 * k for k in range(n)], np.int64),
        power=np.array([2.0] * 10 + [6.62, 0.02], np.float64),
        energy=np.zeros(n),
        voltage=np.full(n, np.nan),
        partition=np.full(n, 7, np.int32),
        offset=np.arange(1000, 1000 + n, dtype=np.int64),
    )
    return r, meters, regions


def test_encoded_alert_fields_types_and_headers_are_exact() -> None:
    r, meters, regions = batch()
    det = AnomalyDetector().check(r)
    msgs = encode_alerts(det, r, meters, regions, "raw_readings")
    assert len(msgs) == 2
    key, value, headers = msgs[0]
    assert key == b"MTR-00000042"
    doc = json.loads(value)
    assert list(doc) == [
        "id",
        "type",
        "severity",
        "meter_id",
        "region",
        "message",
        "timestamp",
        "metadata",
    ]
    assert doc == {
        "id": str(uuid.uuid5(ALERT_ID_NAMESPACE, "raw_readings/7/1010/spike")),
        "type": "ANOMALY",
        "severity": "high",
        "meter_id": "MTR-00000042",
        "region": "Mumbai-North",
        "message": (
            "Sudden power consumption spike: 231.0% increase (baseline: 2.00 kW, current: 6.62 kW)"
        ),
        "timestamp": "2026-11-27T06:00:16.123Z",
        "metadata": {
            "kind": "spike",
            "baseline": 2.0,
            "current": 6.62,
            "change": (6.62 - 2.0) / 2.0 * 100.0,
        },
    }
    assert headers == [("type", b"ANOMALY"), ("severity", b"high"), ("region", b"Mumbai-North")]
    for name in ("baseline", "current", "change"):
        assert type(doc["metadata"][name]) is float

    doc2 = json.loads(msgs[1][1])
    assert doc2["metadata"]["kind"] == "outage"
    assert doc2["severity"] == "high"
    assert doc2["timestamp"] == "2026-11-27T06:00:17.123Z"
    assert doc2["message"] == (
        "Possible power outage: consumption fell to 0.02 kW (baseline: 2.92 kW)"
    )
    assert msgs[1][2][1] == ("severity", b"high")


def test_ids_are_deterministic_on_replay_and_distinct_per_source() -> None:
    r, meters, regions = batch()
    first = encode_alerts(AnomalyDetector().check(r), r, meters, regions, "raw_readings")
    again = encode_alerts(AnomalyDetector().check(r), r, meters, regions, "raw_readings")
    assert first == again  # byte-identical on replay
    other = encode_alerts(AnomalyDetector().check(r), r, meters, regions, "other_topic")
    ids = {json.loads(v)["id"] for _, v, _ in first + other}
    assert len(ids) == 4
    # the namespace is pinned: changing it would change every id
    assert uuid.uuid5(uuid.NAMESPACE_URL, "urn:segs-stream:alerts") == ALERT_ID_NAMESPACE
    pinned = uuid.uuid5(ALERT_ID_NAMESPACE, "raw_readings/0/0/spike")
    assert str(pinned) == "c488d18e-91f0-5c14-8be0-63143fc0495d"


def test_messages_in_the_original_wording() -> None:
    assert alert_message("spike", 2.1, 6.62, 2.153) == (
        "Sudden power consumption spike: 215.3% increase (baseline: 2.10 kW, current: 6.62 kW)"
    )
    assert alert_message("drop", 2.1, 0.7351, -0.65) == (
        "Sudden power consumption drop: 65.0% decrease (baseline: 2.10 kW, current: 0.74 kW)"
    )
    assert alert_message("outage", 3.1, 0.02, -0.99) == (
        "Possible power outage: consumption fell to 0.02 kW (baseline: 3.10 kW)"
    )


def test_to_fixed_rounds_like_javascript() -> None:
    assert to_fixed(0.125, 2) == "0.13"  # exact tie: half up (Python's format gives 0.12)
    assert to_fixed(1.005, 2) == "1.00"  # 1.005 is 1.00499999999999989… in binary
    assert to_fixed(215.25, 1) == "215.3"
    assert to_fixed(0.0, 2) == "0.00"
    assert to_fixed(-0.0, 2) == "0.00"
    assert to_fixed(12345.678, 1) == "12345.7"


def test_no_detections_no_messages() -> None:
    r, meters, regions = batch()
    assert encode_alerts(Detections.empty(), r, meters, regions, "raw_readings") == []
