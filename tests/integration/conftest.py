"""Fixtures of the end-to-end pipeline tests (test_pipeline, test_duplicates)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import KafkaServer, Topics
from tests.integration.test_pipeline import Run
from tests.pipeline import Service


@pytest.fixture
def run(kafka_server: KafkaServer, db_url: str, topics: Topics, tmp_path: Path) -> Run:
    return Run(kafka_server, db_url, topics, tmp_path)


@pytest.fixture
def cleanup() -> Iterator[list[Service]]:
    services: list[Service] = []
    yield services
    for s in services:
        s.kill()
