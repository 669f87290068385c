"""The window-size table: each size named once, consistent with the settings and the schema."""

from __future__ import annotations

from dataclasses import fields

from segs.config import SPECS, Settings
from segs.windows.sizes import BY_SECONDS, FIFTEEN_MINUTES, ONE_MINUTE, SIZES


def test_sizes_finest_first_and_nested() -> None:
    assert [s.seconds for s in SIZES] == [60, 900]
    assert all(s.seconds % SIZES[0].seconds == 0 for s in SIZES)
    assert BY_SECONDS[60] is ONE_MINUTE and BY_SECONDS[900] is FIFTEEN_MINUTES


def test_contract_names() -> None:
    assert (ONE_MINUTE.granularity, ONE_MINUTE.table, ONE_MINUTE.type_header) == (
        "1m", "aggregates_1m", b"1m_aggregate")
    assert (FIFTEEN_MINUTES.granularity, FIFTEEN_MINUTES.table,
            FIFTEEN_MINUTES.type_header) == ("15m", "aggregates_15m", b"15m_aggregate")


def test_every_name_is_distinct() -> None:
    for attr in ("granularity", "table", "partials_table", "fresh_table", "type_header",
                 "topic_setting", "topic_field"):
        assert len({getattr(s, attr) for s in SIZES}) == len(SIZES), attr


def test_topic_setting_names_its_settings_field() -> None:
    names = {f.name for f in fields(Settings)}
    by_env = {spec.env: spec.field for spec in SPECS}
    for s in SIZES:
        assert s.topic_field in names
        assert by_env[s.topic_setting] == s.topic_field
