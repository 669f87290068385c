"""The vectorized detector against a plain reading-by-reading reference, plus each edge."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segs.detection import detector as anomaly
from segs.detection.detector import (
    KINDS,
    SEVERITIES,
    AnomalyDetector,
    BaselineState,
    Detections,
    DetectorSettings,
)
from segs.intake.readings import Readings
from segs.times import NEVER

# -- reference ----------------------------------------------------------------------------


@dataclass
class RefMeter:
    baseline: float = 0.0
    samples: int = 0
    last: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, NEVER))
    partition: int = -1


Alert = tuple[int, str, str, float, float, float]  # index, kind, severity, baseline, power, change


class Reference:
    """The contract, one reading at a time, written as plainly as possible."""

    def __init__(self, cfg: DetectorSettings) -> None:
        self.cfg = cfg
        self.meters: dict[int, RefMeter] = {}

    def check(self, r: Readings) -> list[Alert]:
        out: list[Alert] = []
        for i in range(len(r)):
            m = self.meters.setdefault(int(r.meter[i]), RefMeter())
            power = float(r.power[i])
            ts = int(r.ts_ms[i])
            m.partition = int(r.partition[i])
            if m.samples == 0:
                m.baseline = power
                m.samples = 1
                continue
            if m.samples >= self.cfg.min_samples:
                b = m.baseline
                change = (power - b) / max(b, 0.1)
                kind = sev = None
                if power < 0.1 and b > 1.0:
                    kind, sev = "outage", "high"
                elif change > self.cfg.spike_threshold:
                    kind, sev = "spike", "high" if change > 2.0 else "medium"
                elif change < -self.cfg.drop_threshold:
                    kind, sev = "drop", "medium" if change < -0.8 else "low"
                if (
                    kind is not None
                    and sev is not None
                    and ts - m.last[kind] >= self.cfg.cooldown_ms
                ):
                    m.last[kind] = ts
                    out.append((i, kind, sev, b, power, change))
            m.baseline = 0.8 * m.baseline + 0.2 * power
            m.samples += 1
        return out


def as_alerts(d: Detections) -> list[Alert]:
    return [
        (int(i), KINDS[k], SEVERITIES[s], float(b), float(c), float(ch))
        for i, k, s, b, c, ch in zip(
            d.index, d.kind, d.severity, d.baseline, d.current, d.change, strict=True
        )
    ]


def state_dict(s: BaselineState) -> dict[int, tuple[float, int, int, int, int, int]]:
    return {
        int(m): (float(b), int(n), int(o), int(sp), int(dr), int(p))
        for m, b, n, o, sp, dr, p in zip(
            s.meter,
            s.baseline,
            s.samples,
            s.last_outage_ms,
            s.last_spike_ms,
            s.last_drop_ms,
            s.partition,
            strict=True,
        )
    }


def ref_state(ref: Reference) -> dict[int, tuple[float, int, int, int, int, int]]:
    return {
        k: (
            m.baseline,
            m.samples,
            m.last["outage"],
            m.last["spike"],
            m.last["drop"],
            m.partition,
        )
        for k, m in ref.meters.items()
    }


def readings(
    meter: list[int], power: list[float], ts: list[int], partition: list[int] | None = None
) -> Readings:
    n = len(meter)
    part = partition if partition is not None else [m % 3 for m in meter]
    return Readings(
        meter=np.array(meter, np.int32),
        region=np.zeros(n, np.int32),
        ts_ms=np.array(ts, np.int64),
        power=np.array(power, np.float64),
        energy=np.zeros(n, np.float64),
        voltage=np.full(n, np.nan),
        partition=np.array(part, np.int32),
        offset=np.arange(n, dtype=np.int64),
    )


def one_meter(powers: list[float], step_ms: int = 1000, meter: int = 0) -> Readings:
    n = len(powers)
    return readings([meter] * n, powers, [k * step_ms for k in range(n)])


def run(det: AnomalyDetector, r: Readings) -> list[Alert]:
    return as_alerts(det.check(r))


FAST = DetectorSettings(min_samples=2, cooldown_ms=3)

# -- property: batches, any split, scalar and round paths, checkpoint round trip ------------

POWERS = st.one_of(
    st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 6.0, 10.0]),
    st.floats(0.0, 20.0, allow_nan=False),
)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[DetectorSettings, Readings, list[int]]:
    n_meters = draw(st.integers(1, 6))
    n = draw(st.integers(1, 120))
    meter = draw(st.lists(st.integers(0, n_meters - 1), min_size=n, max_size=n))
    power = draw(st.lists(POWERS, min_size=n, max_size=n))
    steps = draw(st.lists(st.integers(-2, 4), min_size=n, max_size=n))
    ts = list(np.cumsum(steps) + 1_000)
    partition = [m % 2 for m in meter]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=5))))
    cfg = DetectorSettings(
        spike_threshold=draw(st.sampled_from([0.5, 1.0])),
        drop_threshold=draw(st.sampled_from([0.3, 0.5])),
        min_samples=draw(st.integers(0, 4)),
        cooldown_ms=draw(st.integers(0, 6)),
    )
    return cfg, readings(meter, power, [int(t) for t in ts], partition), cuts


def split(r: Readings, cuts: list[int]) -> list[tuple[int, Readings]]:
    bounds = [0, *[c for c in cuts if 0 < c < len(r)], len(r)]
    return [(a, r.take(np.arange(a, b))) for a, b in itertools.pairwise(bounds)]


def shift(alerts: list[Alert], by: int) -> list[Alert]:
    return [(i + by, k, s, b, c, ch) for i, k, s, b, c, ch in alerts]


@pytest.fixture(params=[1, 10_000], ids=["scalar-tail", "rounds-only"])
def scalar_below(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Force either path: 10_000 = scalar once a round has < 10k meters; 1 = rounds only."""
    value: int = request.param
    monkeypatch.setattr(anomaly, "_SCALAR_BELOW", value)
    return value


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scenario())
def test_check_equals_reference_for_any_split(
    scalar_below: int, case: tuple[DetectorSettings, Readings, list[int]]
) -> None:
    cfg, r, cuts = case
    ref = Reference(cfg)
    expected = ref.check(r)
    det = AnomalyDetector(cfg, capacity=1)
    got: list[Alert] = []
    for start, part in split(r, cuts):
        got += shift(run(det, part), start)
    assert got == expected  # exact: same float arithmetic in the same order
    assert state_dict(det.snapshot()) == ref_state(ref)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scenario())
def test_checkpoint_restore_continues_like_uninterrupted(
    scalar_below: int, case: tuple[DetectorSettings, Readings, list[int]]
) -> None:
    cfg, r, cuts = case
    parts = split(r, cuts)
    whole = AnomalyDetector(cfg)
    expected = [shift(run(whole, p), s) for s, p in parts]

    db: dict[int, BaselineState] = {}  # "table" of rows, one per slot, latest wins
    det = AnomalyDetector(cfg)
    for k, (s, p) in enumerate(parts):
        assert shift(run(det, p), s) == expected[k]
        dirty = det.take_dirty()
        for j in range(len(dirty)):
            db[int(dirty.meter[j])] = _row(dirty, j)
        assert len(det.take_dirty()) == 0
        # restart: a fresh detector loads every stored row
        det = AnomalyDetector(cfg, capacity=1)
        if db:
            det.load(_concat(list(db.values())))
    assert state_dict(det.snapshot()) == state_dict(whole.snapshot())


@settings(max_examples=60, deadline=None)
@given(scenario())
def test_rebalance_forget_then_load_continues_like_uninterrupted(
    case: tuple[DetectorSettings, Readings, list[int]],
) -> None:
    cfg, r, cuts = case
    parts = split(r, cuts)
    whole = AnomalyDetector(cfg)
    expected = [shift(run(whole, p), s) for s, p in parts]
    db: dict[int, BaselineState] = {}
    det = AnomalyDetector(cfg)
    for k, (s, p) in enumerate(parts):
        assert shift(run(det, p), s) == expected[k]
        # revoke partition 1: checkpoint it, forget it, get it back and load its rows
        dirty = det.take_dirty([1])
        for j in range(len(dirty)):
            db[int(dirty.meter[j])] = _row(dirty, j)
        det.forget_partitions({1})
        assert not (det.snapshot().partition == 1).any()
        rows = [row for row in db.values() if int(row.partition[0]) == 1]
        if rows:
            det.load(_concat(rows))
    assert state_dict(det.snapshot()) == state_dict(whole.snapshot())


def _row(s: BaselineState, j: int) -> BaselineState:
    sl = slice(j, j + 1)
    return BaselineState(
        s.meter[sl],
        s.baseline[sl],
        s.samples[sl],
        s.last_outage_ms[sl],
        s.last_spike_ms[sl],
        s.last_drop_ms[sl],
        s.partition[sl],
    )


def _concat(rows: list[BaselineState]) -> BaselineState:
    return BaselineState(
        *(np.concatenate([getattr(r, f.name) for r in rows]) for f in fields(BaselineState))
    )


def test_many_meters_many_rounds_and_a_heavy_meter_match_reference() -> None:
    rng = np.random.default_rng(7)
    n = 30_000
    meter = rng.integers(0, 3_000, n)
    meter[rng.random(n) < 0.3] = 42  # one heavy meter: ~9k readings in the batch
    power = rng.lognormal(0.5, 0.8, n)
    power[rng.random(n) < 0.02] = 0.0
    ts = np.sort(rng.integers(0, 3_600_000, n))
    r = readings(meter.tolist(), power.tolist(), ts.tolist())
    cfg = DetectorSettings(min_samples=3, cooldown_ms=60_000)
    ref = Reference(cfg)
    det = AnomalyDetector(cfg)
    for a in range(0, n, 10_000):
        part = r.take(np.arange(a, a + 10_000))
        expected = ref.check(part)
        got = run(det, part)
        assert got == expected
        assert len(got) > 100
    assert state_dict(det.snapshot()) == ref_state(ref)


# -- edges ----------------------------------------------------------------------------------

WARM = [2.0] * 10  # seed + 9 folds of 2.0: baseline stays exactly 2.0, samples = 10


def test_seeding_sets_baseline_and_is_never_checked() -> None:
    det = AnomalyDetector(DetectorSettings(min_samples=0))
    assert run(det, one_meter([5.0])) == []
    s = det.snapshot()
    assert (float(s.baseline[0]), int(s.samples[0])) == (5.0, 1)
    # second reading: samples == 1 >= max(min_samples, 1), checked against the seed 5.0
    assert [a[1] for a in run(det, readings([0], [20.0], [1]))] == ["spike"]


def test_min_samples_boundary() -> None:
    det = AnomalyDetector()
    # reading 10 (samples before = 9) is not checked, reading 11 (samples = 10) is
    assert run(det, one_meter([2.0] * 9 + [100.0])) == []
    det = AnomalyDetector()
    got = run(det, one_meter([*WARM, 100.0]))
    assert [(a[0], a[1]) for a in got] == [(10, "spike")]


def test_spike_exactly_at_threshold_is_not_a_spike_just_above_is() -> None:
    assert run(AnomalyDetector(), one_meter([*WARM, 4.0])) == []  # change == 1.0 exactly
    above = float(np.nextafter(4.0, 5.0))
    got = run(AnomalyDetector(), one_meter([*WARM, above]))
    assert [(a[1], a[2]) for a in got] == [("spike", "medium")]
    assert got[0][3:] == (2.0, above, (above - 2.0) / 2.0)


def test_spike_and_drop_severity_boundaries() -> None:
    def sev(p: float) -> list[tuple[str, str]]:
        return [(a[1], a[2]) for a in run(AnomalyDetector(), one_meter([*WARM, p]))]

    assert sev(6.0) == [("spike", "medium")]  # change == 2.0 exactly
    assert sev(float(np.nextafter(6.0, 7.0))) == [("spike", "high")]
    assert sev(1.0) == []  # change == -0.5 exactly: no drop
    assert sev(0.999_999_999_999) == [("drop", "low")]
    assert sev(0.4) == [("drop", "low")]  # (0.4 - 2.0) / 2.0 == -0.8 exactly
    assert (0.4 - 2.0) / 2.0 == -0.8
    assert sev(0.399_999_999_999) == [("drop", "medium")]


def test_outage_takes_precedence_over_drop() -> None:
    got = run(AnomalyDetector(), one_meter([*WARM, 0.05]))
    assert [(a[1], a[2]) for a in got] == [("outage", "high")]
    assert got[0][5] == (0.05 - 2.0) / 2.0
    # power 0.1 is not an outage (strict <), so it is a drop
    got = run(AnomalyDetector(), one_meter([*WARM, 0.1]))
    assert [(a[1], a[2]) for a in got] == [("drop", "medium")]
    # baseline exactly 1.0 is not > 1.0: a drop, not an outage
    got = run(AnomalyDetector(), one_meter([1.0] * 10 + [0.0]))
    assert [(a[1], a[2]) for a in got] == [("drop", "medium")]


def test_outage_in_cooldown_does_not_fall_through_to_drop() -> None:
    det = AnomalyDetector()
    got = run(det, one_meter([*WARM, 0.0, 0.0], step_ms=1000))
    # the second 0.0 is in the outage cooldown: no alert at all, not a drop
    assert [a[1] for a in got] == ["outage"]


def test_zero_baseline_uses_floor_of_0_1() -> None:
    got = run(AnomalyDetector(), one_meter([0.0] * 10 + [0.15]))
    assert [(a[1], a[2]) for a in got] == [("spike", "medium")]
    assert got[0][3] == 0.0
    assert got[0][5] == 0.15 / 0.1
    assert run(AnomalyDetector(), one_meter([0.0] * 10 + [0.1])) == []  # change == 1.0
    got = run(AnomalyDetector(), one_meter([0.0] * 10 + [0.35]))
    assert [(a[1], a[2], a[5]) for a in got] == [("spike", "high", 0.35 / 0.1)]


def test_cooldown_expires_exactly_at_cooldown_ms() -> None:
    cfg = DetectorSettings(cooldown_ms=300_000)
    base = [0] * 10
    ts = [*base, 1_000_000, 1_299_999, 1_300_000]
    det = AnomalyDetector(cfg)
    got = run(det, readings([0] * 13, [*WARM, 50.0, 50.0, 500.0], ts))
    # 2nd spike 1 ms short of cooldown: suppressed, and its ts is NOT the new reference, so
    # the 3rd, exactly cooldown_ms after the 1st, is emitted
    assert [(a[0], a[1]) for a in got] == [(10, "spike"), (12, "spike")]
    det = AnomalyDetector(cfg)
    ts = [*base, 1_000_000, 1_300_000]
    got = run(det, readings([0] * 12, [*WARM, 50.0, 500.0], ts))
    assert [(a[0], a[1]) for a in got] == [(10, "spike"), (11, "spike")]


def test_cooldown_is_per_kind() -> None:
    got = run(AnomalyDetector(), one_meter([*WARM, 50.0, 0.5]))
    assert [a[1] for a in got] == ["spike", "drop"]


def test_event_time_going_back_never_emits() -> None:
    det = AnomalyDetector(DetectorSettings(cooldown_ms=0))
    got = run(det, readings([0] * 12, [*WARM, 50.0, 500.0], [10] * 10 + [100, 99]))
    assert [a[0] for a in got] == [10]


def test_baseline_folds_with_exact_arithmetic() -> None:
    powers = [1.3, 2.7, 0.1, 9.9, 4.4]
    det = AnomalyDetector()
    det.check(one_meter(powers))
    b = powers[0]
    for p in powers[1:]:
        b = 0.8 * b + 0.2 * p
    assert float(det.snapshot().baseline[0]) == b


def test_detections_are_ordered_by_index_across_meters() -> None:
    n = 12
    meter = [0] * n + [1] * n
    power = [*WARM, 50.0, 0.0] * 2
    r = readings(meter, power, list(range(n)) * 2)
    order = np.argsort(np.tile(np.arange(n), 2), kind="stable")  # interleave the two meters
    d = AnomalyDetector().check(r.take(order))
    assert list(d.index) == sorted(d.index)
    assert len(d) == 4


# -- state ----------------------------------------------------------------------------------


def test_take_dirty_returns_changed_slots_once() -> None:
    det = AnomalyDetector()
    det.check(readings([3, 5, 3], [1.0, 2.0, 3.0], [0, 0, 1], [0, 1, 0]))
    first = det.take_dirty()
    assert sorted(first.meter.tolist()) == [3, 5]
    assert state_dict(first)[3] == (0.8 * 1.0 + 0.2 * 3.0, 2, NEVER, NEVER, NEVER, 0)
    assert len(det.take_dirty()) == 0


def test_take_dirty_by_partition() -> None:
    det = AnomalyDetector()
    det.check(readings([1, 2, 3], [1.0, 1.0, 1.0], [0, 0, 0], [0, 1, 2]))
    assert det.take_dirty([1, 2]).meter.tolist() == [2, 3]
    assert det.take_dirty().meter.tolist() == [1]


def test_forget_partitions_resets_to_never_seen_and_clean() -> None:
    det = AnomalyDetector()
    det.check(readings([1, 2], [5.0, 5.0], [0, 0], [0, 1]))
    det.forget_partitions([1])
    assert det.take_dirty().meter.tolist() == [1]
    s = state_dict(det.snapshot(np.array([2])))
    assert s[2] == (0.0, 0, NEVER, NEVER, NEVER, -1)
    # the slot seeds again
    det.check(readings([2], [7.0], [1], [1]))
    assert state_dict(det.snapshot(np.array([2])))[2][:2] == (7.0, 1)


def test_load_restores_and_is_clean() -> None:
    det = AnomalyDetector(capacity=1)
    state = BaselineState(
        meter=np.array([5000], np.int32),
        baseline=np.array([2.0]),
        samples=np.array([50], np.int64),
        last_outage_ms=np.array([NEVER], np.int64),
        last_spike_ms=np.array([1_000], np.int64),
        last_drop_ms=np.array([NEVER], np.int64),
        partition=np.array([4], np.int32),
    )
    det.load(state)
    assert len(det.take_dirty()) == 0
    # spike cooldown carried over: a spike 1 ms before expiry is suppressed, a drop is not
    got = run(det, readings([5000, 5000], [50.0, 0.5], [300_999, 301_000], [4, 4]))
    assert [a[1] for a in got] == ["drop"]


def test_empty_batch_and_settings_validation() -> None:
    det = AnomalyDetector()
    assert len(det.check(Readings.empty())) == 0
    assert len(det.take_dirty()) == 0
    with pytest.raises(ValueError, match="min_samples"):
        DetectorSettings(min_samples=-1)
    with pytest.raises(ValueError, match="spike_threshold"):
        DetectorSettings(spike_threshold=float("nan"))
    with pytest.raises(ValueError, match="cooldown_ms"):
        DetectorSettings(cooldown_ms=-5)
