"""The meter-reading simulator: format, determinism, injected disorder, anomalies, I/O."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer
from segs.cli.simulate import simulate

from segs.detection.detector import KINDS as DETECTOR_KINDS
from segs.detection.detector import AnomalyDetector
from segs.errors import BrokerError, ConfigError
from segs.intake.decode import Decoder
from segs.intake.readings import Interner
from segs.tools.simulator import (
    ANOMALY_KINDS,
    INVALID_VARIANTS,
    KINDS,
    SimMessage,
    SimulatorOptions,
    generate,
    make_invalid,
    produce,
    read_file,
    region_names,
    write_file,
)
from segs.tools.simulator.model import Simulation, limited

START = 1_790_000_000_000  # 2026-09-21T…Z, well in the past
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = [
    "readingId",
    "meterId",
    "userId",
    "timestamp",
    "powerKw",
    "energyKwh",
    "voltage",
    "region",
    "seq",
    "status",
    "metadata",
]


def run(**kw: Any) -> list[SimMessage]:
    kw.setdefault("start_ms", START)
    return [m for batch in generate(SimulatorOptions(**kw)) for m in batch]


def ts_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def contract_valid(value: bytes, now_ms: int) -> bool:
    """The input rules of docs/contract.md part 1, written independently of segs.intake.decode."""
    try:
        obj = json.loads(value.decode("utf-8"), parse_constant=_no_constant)
    except ValueError:
        return False
    if not isinstance(obj, dict):
        return False
    for name, limit in (("meterId", 64), ("region", 100)):
        v = obj.get(name)
        if not isinstance(v, str) or not 1 <= len(v) <= limit:
            return False
    ts = obj.get("timestamp")
    if not isinstance(ts, str) or not re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", ts
    ):
        return False
    try:
        when = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return False
    if when.timestamp() * 1000 > now_ms + 300_000:
        return False
    for name, required in (("powerKw", True), ("energyKwh", False), ("voltage", False)):
        if name not in obj:
            if required:
                return False
            continue
        v = obj[name]
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        if not math.isfinite(v) or v < 0:
            return False
    return True


def decode_all(msgs: list[SimMessage], now_ms: int) -> tuple[Any, list[Any], Interner]:
    meters = Interner()
    decoder = Decoder(meters, Interner())
    values = [m.value for m in msgs]
    readings, rejects = decoder.decode(
        values, np.zeros(len(values), np.int32), np.arange(len(values), dtype=np.int64), now_ms
    )
    return readings, rejects, meters


# -- determinism and format -------------------------------------------------------------


def test_same_seed_same_messages_other_seed_others() -> None:
    kw: dict[str, Any] = {
        "meters": 50,
        "count": 3000,
        "duplicate_fraction": 0.05,
        "late_fraction": 0.05,
        "invalid_fraction": 0.05,
        "out_of_order_fraction": 0.05,
        "anomaly_fraction": 0.01,
    }
    a = run(seed=7, **kw)
    b = run(seed=7, **kw)
    c = run(seed=8, **kw)
    assert a == b
    assert len(a) == 3000
    assert [m.value for m in a] != [m.value for m in c]


def test_valid_messages_follow_the_original_format() -> None:
    interval = 2.5
    msgs = run(meters=30, regions=7, count=3000, interval_s=interval, seed=3)
    now = time.time() * 1000
    ids = set()
    per_meter: dict[str, list[float]] = defaultdict(list)
    for m in msgs:
        assert m.kind == "valid"
        obj = json.loads(m.value)
        assert list(obj) == FIELDS
        assert m.value == json.dumps(obj, separators=(",", ":")).encode()  # compact
        assert m.key == obj["meterId"].encode()
        assert re.fullmatch(r"MTR-\d{8}", obj["meterId"])
        assert obj["userId"] == "USR-" + obj["meterId"][4:]
        assert 1 <= int(obj["meterId"][4:]) <= 30
        assert uuid.UUID(obj["readingId"]).version == 4
        ids.add(obj["readingId"])
        assert ISO_MS_Z.match(obj["timestamp"])
        assert START <= ts_ms(obj["timestamp"]) <= now
        for name in ("powerKw", "energyKwh", "voltage"):  # numbers as JavaScript prints them
            assert type(obj[name]) in (int, float)
        assert obj["energyKwh"] == pytest.approx(obj["powerKw"] * interval / 3600, abs=6e-7)
        assert 220 <= obj["voltage"] <= 240
        assert obj["region"] in region_names(7)
        assert isinstance(obj["seq"], int) and obj["seq"] >= 1
        assert obj["status"] == ("anomaly" if m.anomaly else "normal")
        assert set(obj["metadata"]) == {"firmware", "signalStrength"}
        assert isinstance(obj["metadata"]["firmware"], str)
        assert isinstance(obj["metadata"]["signalStrength"], int)
        assert contract_valid(m.value, int(now))
        if m.anomaly is None:
            per_meter[obj["meterId"]].append(obj["powerKw"])
    assert len(ids) == len(msgs)
    assert len(per_meter) == 30
    for powers in per_meter.values():  # 0.8–1.2 × one base load
        assert max(powers) / min(powers) <= 1.2 / 0.8 + 1e-3


def test_region_names() -> None:
    assert region_names(7) == ["north", "south", "east", "west", "central", "region-6", "region-7"]


def test_stream_is_in_event_time_order_with_one_reading_per_meter_per_round() -> None:
    msgs = run(meters=40, count=4000, interval_s=1.0, seed=4, anomaly_fraction=0.0)
    times = [ts_ms(json.loads(m.value)["timestamp"]) for m in msgs]
    assert times == sorted(times)
    seqs: dict[bytes | None, list[int]] = defaultdict(list)
    for m in msgs:
        seqs[m.key].append(json.loads(m.value)["seq"])
    assert all(s == list(range(1, 101)) for s in seqs.values())


def test_default_start_puts_the_last_reading_near_now() -> None:
    before = time.time() * 1000
    msgs = [m for b in generate(SimulatorOptions(meters=100, count=20_000, seed=1)) for m in b]
    after = time.time() * 1000
    last = max(ts_ms(json.loads(m.value)["timestamp"]) for m in msgs)
    first = min(ts_ms(json.loads(m.value)["timestamp"]) for m in msgs)
    assert before - 5_000 <= last <= after + 3_000
    assert last - first == pytest.approx(199_000, abs=1_500)


def test_count_and_duration_stop_the_run() -> None:
    assert len(run(meters=7, count=1234, seed=1, duplicate_fraction=0.1)) == 1234
    t = time.monotonic()
    msgs = [
        m
        for b in generate(SimulatorOptions(meters=100, duration_s=0.3, seed=1, start_ms=START))
        for m in b
    ]
    assert 0.25 < time.monotonic() - t < 2.0
    assert len(msgs) > 1000


def test_endless_run_follows_the_clock() -> None:
    gen = generate(SimulatorOptions(meters=10, interval_s=0.2, seed=1))
    t = time.monotonic()
    msgs = [m for _, b in zip(range(30), gen, strict=False) for m in b]
    now = time.time() * 1000
    assert time.monotonic() - t > 2.5  # 6 s of event time, at most 3 s ahead of the clock
    assert max(ts_ms(json.loads(m.value)["timestamp"]) for m in msgs) <= now + 3_500


def test_holding_back_ends_promptly_when_stopped() -> None:
    opts = SimulatorOptions(meters=10, interval_s=60.0, seed=1)  # round 1 is ~1 min ahead
    t = time.monotonic()
    batches = list(
        limited(Simulation(opts), opts, lambda: time.monotonic() - t > 0.5)
    )
    assert 0.4 < time.monotonic() - t < 1.5
    assert [len(b) for b in batches] == [10]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("meters", 0),
        ("regions", 0),
        ("count", 0),
        ("duration_s", 0.0),
        ("rate", -1.0),
        ("interval_s", 0.0),
        ("anomaly_fraction", 1.5),
        ("invalid_fraction", math.nan),
        ("start_ms", int(time.time() * 1000) + 3_600_000),
        ("meters", True),
    ],
)
def test_bad_options_name_the_setting(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        SimulatorOptions(**{field: value})
    assert err.value.setting == field


def test_too_much_disorder_is_refused() -> None:
    with pytest.raises(ConfigError, match="too much disorder"):
        SimulatorOptions(duplicate_fraction=0.3, late_fraction=0.3)


# -- invalid messages -------------------------------------------------------------------


@pytest.mark.parametrize("variant", INVALID_VARIANTS)
def test_each_invalid_variant_breaks_the_contract(variant: str) -> None:
    valid = run(meters=5, count=5, seed=1, anomaly_fraction=0.0)
    now = int(time.time() * 1000)
    broken = []
    for pick in range(12):
        m = valid[pick % 5]
        assert contract_valid(m.value, now)
        bad = make_invalid(variant, m.value, ts_ms(json.loads(m.value)["timestamp"]), pick=pick)
        assert not contract_valid(bad, now), bad
        broken.append(SimMessage(m.key, bad, "invalid", None))
    readings, rejects, _ = decode_all(broken, now)
    assert len(readings) == 0
    assert len(rejects) == len(broken)


def test_generated_stream_is_valid_exactly_where_it_should_be() -> None:
    msgs = run(
        meters=60,
        count=20_000,
        seed=5,
        invalid_fraction=0.1,
        duplicate_fraction=0.05,
        late_fraction=0.05,
        out_of_order_fraction=0.05,
        anomaly_fraction=0.01,
    )
    now = int(time.time() * 1000)
    for m in msgs:
        assert contract_valid(m.value, now) == (m.kind != "invalid"), m
    readings, rejects, _ = decode_all(msgs, now)
    assert {r.index for r in rejects} == {i for i, m in enumerate(msgs) if m.kind == "invalid"}
    assert len(readings) == sum(m.kind != "invalid" for m in msgs)
    variants_seen = Counter(r.reason for r in rejects)
    assert len(variants_seen) >= 8  # many different rules broken


# -- disorder ---------------------------------------------------------------------------


def test_fractions_are_roughly_honoured() -> None:
    f = {
        "duplicate_fraction": 0.04,
        "late_fraction": 0.03,
        "invalid_fraction": 0.02,
        "out_of_order_fraction": 0.05,
    }
    msgs = run(meters=500, count=100_000, seed=6, **f)
    kinds = Counter(m.kind for m in msgs)
    n = len(msgs)
    assert set(kinds) <= set(KINDS)
    assert kinds["duplicate"] / n == pytest.approx(0.04, rel=0.1)
    assert kinds["late"] / n == pytest.approx(0.03, rel=0.1)
    assert kinds["invalid"] / n == pytest.approx(0.02, rel=0.15)
    assert kinds["out_of_order"] / n == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize(("rounds", "fraction"), [(150, 0.001), (3000, 0.001), (200, 0.01)])
def test_anomaly_fraction_is_roughly_honoured(rounds: int, fraction: float) -> None:
    meters = 2000 if rounds < 1000 else 100
    msgs = run(meters=meters, count=meters * rounds, seed=13, anomaly_fraction=fraction)
    expected = fraction * meters * (rounds - 12)  # nothing in the first 12 rounds
    expected = min(expected, meters * math.ceil(rounds / 600))  # one per meter per 600 s
    got = sum(m.anomaly is not None for m in msgs)
    assert got == pytest.approx(expected, rel=0.2)


def test_duplicates_late_and_out_of_order_messages_are_what_they_say() -> None:
    msgs = run(
        meters=100,
        count=30_000,
        seed=8,
        duplicate_fraction=0.05,
        late_fraction=0.05,
        out_of_order_fraction=0.05,
        anomaly_fraction=0.005,
    )
    seen: set[bytes] = set()
    latest: dict[bytes | None, int] = {}
    newest = 0
    went_back = 0
    for m in msgs:
        obj = json.loads(m.value)
        t = ts_ms(obj["timestamp"])
        if m.kind == "duplicate":
            assert m.value in seen
        else:
            assert m.value not in seen
        if m.kind == "late":
            assert 70_000 <= latest[m.key] - t <= 3_600_000
        if m.kind in ("valid", "out_of_order"):
            latest[m.key] = t
            went_back += t < newest
            newest = max(newest, t)
        if m.kind == "out_of_order":
            assert m.anomaly is None
        seen.add(m.value)
    assert went_back >= 0.9 * sum(m.kind == "out_of_order" for m in msgs)


# -- anomalies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval_s", "meters", "count"),
    [(1.0, 200, 60_000), (15.0, 200, 60_000), (60.0, 200, 60_000), (1.0, 9000, 160_000)],
)
def test_each_injected_anomaly_fires_exactly_once(
    interval_s: float, meters: int, count: int
) -> None:
    msgs = run(
        meters=meters,
        count=count,
        seed=9,
        interval_s=interval_s,
        anomaly_fraction=0.05,
        duplicate_fraction=0.03,
        late_fraction=0.03,
        invalid_fraction=0.03,
        out_of_order_fraction=0.05,
    )
    injected = {i: m.anomaly for i, m in enumerate(msgs) if m.anomaly}
    assert len(injected) > 50
    assert set(injected.values()) == set(ANOMALY_KINDS)

    now = int(time.time() * 1000)
    readings, _, _ = decode_all(msgs, now)
    detector = AnomalyDetector()
    fired: dict[int, str] = {}
    step = 5000
    for lo in range(0, len(readings), step):
        part = readings.take(np.arange(lo, min(lo + step, len(readings))))
        found = detector.check(part)
        for idx, kind in zip(found.index.tolist(), found.kind.tolist(), strict=True):
            fired[int(part.offset[idx])] = DETECTOR_KINDS[kind]
    assert fired == injected


def test_anomalies_are_spaced_and_after_warm_up() -> None:
    msgs = run(meters=50, count=100_000, seed=10, anomaly_fraction=0.05)
    last: dict[bytes | None, int] = {}
    for m in msgs:
        if m.anomaly is None:
            continue
        obj = json.loads(m.value)
        assert obj["seq"] > 12
        assert obj["status"] == "anomaly"
        t = ts_ms(obj["timestamp"])
        if m.key in last:
            assert t - last[m.key] >= 600_000
        last[m.key] = t
        base_ratio = {"spike": (3, 5), "drop": (0.25, 0.4), "outage": (0, 0)}[m.anomaly]
        if m.anomaly == "outage":
            assert obj["powerKw"] == 0.0
        else:
            assert base_ratio[0] * 1.5 * 0.999 <= obj["powerKw"] <= base_ratio[1] * 5.0 * 1.001
    assert len(last) == 50  # 2000 readings per meter at 1 s: every meter got some


# -- files and Kafka --------------------------------------------------------------------


def test_file_round_trip(tmp_path: Path) -> None:
    msgs = run(meters=20, count=3000, seed=11, invalid_fraction=0.2, anomaly_fraction=0.01)
    assert any(b"\xff" in m.value for m in msgs)  # non-UTF-8 values go as base64
    path = tmp_path / "out.jsonl"
    assert write_file(path, msgs) == len(msgs)
    assert list(read_file(path)) == msgs
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    odd = [SimMessage(None, b"x", "invalid", None), SimMessage(b"\xff", b"\xfe", "invalid", None)]
    assert write_file(tmp_path / "odd.jsonl", odd) == 2
    assert list(read_file(tmp_path / "odd.jsonl")) == odd
    assert {tuple(sorted(r)) for r in rows} <= {
        ("anomaly", "key", "kind", "value"),
        ("anomaly", "key", "kind", "value_b64"),
    }


@pytest.fixture
def mock_cluster() -> Any:
    """librdkafka's in-process mock cluster, kept alive by a producer; yields its bootstrap."""
    holder = Producer({"test.mock.num.brokers": 1, "log_level": 0})
    brokers = holder.list_topics(timeout=5).brokers
    yield ",".join(f"{b.host}:{b.port}" for b in brokers.values())
    holder.flush(1)


def test_produce_then_consume_gives_the_file(tmp_path: Path, mock_cluster: str) -> None:
    opts = SimulatorOptions(
        meters=30,
        count=2000,
        seed=12,
        start_ms=START,
        duplicate_fraction=0.05,
        invalid_fraction=0.05,
        late_fraction=0.02,
        out_of_order_fraction=0.05,
    )
    path = tmp_path / "sim.jsonl"
    summary = produce(
        opts, {"bootstrap.servers": mock_cluster}, "raw_readings", file=path, progress=False
    )
    assert summary.messages == 2000
    assert summary.delivery_errors == 0
    assert not summary.interrupted
    assert sum(summary.kinds.values()) == 2000
    written = list(read_file(path))
    assert written == run(
        **{
            k: getattr(opts, k)
            for k in (
                "meters",
                "count",
                "seed",
                "duplicate_fraction",
                "invalid_fraction",
                "late_fraction",
                "out_of_order_fraction",
            )
        }
    )
    assert summary.kinds == {k: sum(m.kind == k for m in written) for k in KINDS}

    consumer = Consumer(
        {
            "bootstrap.servers": mock_cluster,
            "group.id": "t",
            "auto.offset.reset": "earliest",
            "log_level": 0,
        }
    )
    consumer.subscribe(["raw_readings"])
    got: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + 30
    while len(got) < 2000 and time.monotonic() < deadline:
        for msg in consumer.consume(500, timeout=0.5):
            assert msg.error() is None
            got.append((msg.key(), msg.value()))
    consumer.close()
    assert len(got) == 2000
    by_key: dict[bytes | None, list[bytes]] = defaultdict(list)
    for key, value in got:
        by_key[key].append(value)
    expected: dict[bytes | None, list[bytes]] = defaultdict(list)
    for m in written:
        expected[m.key].append(m.value)
    assert by_key == expected  # same messages, same order per key (= per partition)


def test_unreachable_broker_fails_fast_with_one_line() -> None:
    t = time.monotonic()
    with pytest.raises(BrokerError, match=r"cannot reach Kafka at 127\.0\.0\.1:1") as err:
        produce(
            SimulatorOptions(count=10),
            {"bootstrap.servers": "127.0.0.1:1"},
            "t",
            progress=False,
            connect_timeout_s=1.0,
        )
    assert time.monotonic() - t < 5
    assert "\n" not in str(err.value)


# -- command line -----------------------------------------------------------------------


def test_cli_help_describes_every_option() -> None:
    result = CliRunner().invoke(simulate, ["--help"])
    assert result.exit_code == 0
    for flag in (
        "--meters",
        "--regions",
        "--count",
        "--duration",
        "--rate",
        "--interval",
        "--start",
        "--seed",
        "--anomalies",
        "--duplicates",
        "--out-of-order",
        "--late",
        "--invalid",
        "--file",
        "--topic",
        "--brokers",
        "KAFKA_BROKERS",
        "KAFKA_TOPIC_INPUT",
    ):
        assert flag in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--meters", "0"],
        ["--count", "-5"],
        ["--anomalies", "2"],
        ["--duplicates", "0.4", "--late", "0.4"],
        ["--start", "yesterday-ish"],
        ["--start", "2999-01-01T00:00:00Z"],
        ["--interval", "0"],
    ],
)
def test_cli_bad_values_are_one_line_and_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(simulate, [*args, "--no-kafka"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error:")


def test_cli_writes_a_file_without_kafka(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    result = CliRunner().invoke(
        simulate,
        [
            "--no-kafka",
            "--file",
            str(path),
            "--count",
            "500",
            "--meters",
            "10",
            "--seed",
            "3",
            "--start",
            "2026-09-21T00:00:00Z",
            "--invalid",
            "0.1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "500" in result.output
    msgs = list(read_file(path))
    assert len(msgs) == 500
    assert msgs == run(
        meters=10,
        count=500,
        seed=3,
        invalid_fraction=0.1,
        start_ms=ts_ms("2026-09-21T00:00:00.000Z"),
    )


def test_cli_unreachable_broker_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BROKERS", "127.0.0.1:1")
    t = time.monotonic()
    result = CliRunner().invoke(simulate, ["--count", "10", "--connect-timeout", "1"])
    assert time.monotonic() - t < 6
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        line for line in result.output.strip().splitlines() if line.startswith("Error:")
    ]
    assert "127.0.0.1:1" in result.output


def test_cli_produces_to_the_mock_cluster(tmp_path: Path, mock_cluster: str) -> None:
    path = tmp_path / "b.jsonl"
    result = CliRunner().invoke(
        simulate,
        [
            "--brokers",
            mock_cluster,
            "--topic",
            "x",
            "--count",
            "300",
            "--meters",
            "20",
            "--file",
            str(path),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list(read_file(path))) == 300
    assert "300" in result.output


def test_produce_is_throttled_to_the_rate(mock_cluster: str) -> None:
    opts = SimulatorOptions(meters=50, count=1000, rate=2000.0, seed=14, start_ms=START)
    t = time.monotonic()
    summary = produce(opts, {"bootstrap.servers": mock_cluster}, "throttled", progress=False)
    assert time.monotonic() - t >= 0.45
    assert summary.messages == 1000
    assert summary.rate <= 2200


def test_bad_producer_setting_is_one_line(mock_cluster: str) -> None:
    with pytest.raises(BrokerError, match=r"producer settings: .*foo\.bar"):
        produce(
            SimulatorOptions(count=10),
            {"bootstrap.servers": mock_cluster, "foo.bar": "1"},
            "t",
            progress=False,
        )


@pytest.mark.parametrize(("rate", "meters"), [(10_000.0, 100), (100.0, 1000)])
def test_default_start_of_a_throttled_run(rate: float, meters: int) -> None:
    opts = SimulatorOptions(meters=meters, count=100_000, rate=rate, seed=1)
    now = time.time() * 1000
    sim = Simulation(opts, now_ms=int(now))
    span = 100_000 / meters * 1000  # ms of event time
    run_ms = 100_000 / rate * 1000
    if run_ms < span:  # event time outruns the clock: ends at about the end of the run
        assert sim.start_ms + span == pytest.approx(now + run_ms, abs=2000)
    else:  # the clock outruns event time: starts now, never ahead
        assert sim.start_ms == pytest.approx(now, abs=10)
