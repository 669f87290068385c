"""Alerts of the detector as Kafka messages for the ``alerts`` topic.

One message per detection: key = meter id (UTF-8), headers ``type``, ``severity``,
``region``, value (JSON, fields in this order)::

    {"id": "<uuid>", "type": "ANOMALY", "severity": "low"|"medium"|"high",
     "meter_id": ..., "region": ..., "message": ..., "timestamp": "2026-11-27T06:00:17.000Z",
     "metadata": {"kind": "outage"|"spike"|"drop", "baseline": kW, "current": kW,
                  "change": percent}}

Everything is a function of the source message, so a replay publishes byte-identical
alerts: ``id`` is a UUID5 of ``"{source_topic}/{partition}/{offset}/{kind}"`` in
:data:`ALERT_ID_NAMESPACE`, and ``timestamp`` is the reading's event time (UTC, ms, ``Z``).

As in the original service, ``metadata.change`` is the size of the change in percent
(``abs(change) * 100``, e.g. ``215.3…`` for a spike to 3.153× the baseline), the kind telling
its direction, and message numbers are rounded like JavaScript's ``toFixed`` (half up).
"""

from __future__ import annotations

import uuid
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

import msgspec

from segs.detection.detector import KINDS, SEVERITIES, Detections
from segs.intake.readings import Interner, Readings
from segs.publish.outputs import Message
from segs.times import iso_ms

ALERT_ID_NAMESPACE: Final = uuid.UUID("da9fb15b-ce3c-5890-97be-649371a0ddf8")
"""``uuid5(NAMESPACE_URL, "urn:segs-stream:alerts")``; never change it (ids must be stable)."""

class AlertMetadata(msgspec.Struct):
    kind: str
    baseline: float
    current: float
    change: float  # percent, absolute


class Alert(msgspec.Struct):
    id: str
    type: str
    severity: str
    meter_id: str
    region: str
    message: str
    timestamp: str
    metadata: AlertMetadata


_encode = msgspec.json.Encoder().encode


def encode_alerts(
    det: Detections, r: Readings, meters: Interner, regions: Interner, source_topic: str
) -> list[Message]:
    """Kafka messages (key, value, headers) for the detections ``det`` of batch ``r``."""
    out: list[Message] = []
    meter_names = meters.names
    region_names = regions.names
    for i, k, s, baseline, current, change in zip(
        det.index.tolist(),
        det.kind.tolist(),
        det.severity.tolist(),
        det.baseline.tolist(),
        det.current.tolist(),
        det.change.tolist(),
        strict=True,
    ):
        kind = KINDS[k]
        severity = SEVERITIES[s]
        meter_id = meter_names[int(r.meter[i])]
        region = region_names[int(r.region[i])]
        source = f"{source_topic}/{int(r.partition[i])}/{int(r.offset[i])}/{kind}"
        alert = Alert(
            id=str(uuid.uuid5(ALERT_ID_NAMESPACE, source)),
            type="ANOMALY",
            severity=severity,
            meter_id=meter_id,
            region=region,
            message=alert_message(kind, baseline, current, change),
            timestamp=iso_ms(int(r.ts_ms[i])),
            metadata=AlertMetadata(
                kind=kind, baseline=baseline, current=current, change=abs(change) * 100.0
            ),
        )
        headers = [
            ("type", b"ANOMALY"),
            ("severity", severity.encode()),
            ("region", region.encode()),
        ]
        out.append((meter_id.encode(), _encode(alert), headers))
    return out


def alert_message(kind: str, baseline: float, current: float, change: float) -> str:
    """The human-readable line, in the original service's wording."""
    if kind == "outage":
        return (
            f"Possible power outage: consumption fell to {to_fixed(current, 2)} kW"
            f" (baseline: {to_fixed(baseline, 2)} kW)"
        )
    direction = "increase" if kind == "spike" else "decrease"
    return (
        f"Sudden power consumption {kind}: {to_fixed(abs(change) * 100.0, 1)}% {direction}"
        f" (baseline: {to_fixed(baseline, 2)} kW, current: {to_fixed(current, 2)} kW)"
    )


def to_fixed(x: float, digits: int) -> str:
    """``x.toFixed(digits)`` of JavaScript for finite ``x`` below 1e21: the exact binary
    value rounded half away from zero (Python's format rounds exact ties to even), and
    ``-0.0`` printed as ``0``."""
    return str(Decimal(x + 0.0).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))
