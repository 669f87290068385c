"""The output topics can be read by kafkajs, the Kafka client of the grid system's other
services (issue 19, item 0).

kafkajs decodes only uncompressed and gzip record batches; the alert service, run as it
ships, crashed on our alerts topic when it was LZ4-compressed. The service runs over a
simulated stream with anomalies and invalid readings, so each output topic (1-minute and
15-minute aggregates, alerts, dead letters) holds messages; then ``kafkajs/read-topics.js``
reads every message of them with kafkajs itself (the version the alert service pins) and
must see exactly what confluent-kafka sees. With ``KAFKA_COMPRESSION=lz4`` (the former
setting) it must fail with ``KafkaJSNotImplemented``: the test of the test.

kafkajs is installed from npm (``package-lock.json``) into the cache folder the Kafka jars
use; without node and npm the test is skipped and says why.
"""

from __future__ import annotations

import base64
import filecmp
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from segs.tools.local_servers import cache_dir
from tests.conftest import KafkaServer, Topics
from tests.pipeline import process_all, read_topic, simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOURCE = Path(__file__).with_name("kafkajs")
FILES = ("package.json", "package-lock.json", "read-topics.js")


@pytest.fixture(scope="module")
def kafkajs_script() -> Path:
    """read-topics.js with its node_modules, installed once (again when the lock changes)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the output topics are not read with "
                    "kafkajs (apt-get install nodejs npm)")
    folder = cache_dir() / "kafkajs-check"
    folder.mkdir(parents=True, exist_ok=True)
    stale = not (folder / "node_modules" / "kafkajs" / "package.json").exists() or not (
        (folder / "package-lock.json").exists()
        and filecmp.cmp(SOURCE / "package-lock.json", folder / "package-lock.json",
                        shallow=False))
    for name in FILES:
        shutil.copyfile(SOURCE / name, folder / name)
    if stale:
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                             cwd=folder, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"npm could not install kafkajs ({last})")
    return folder / "read-topics.js"


def kafkajs_read(script: Path, bootstrap: str, topics: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(script), bootstrap, "60", *topics],
                          capture_output=True, text=True, timeout=120)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _as_seen_by_confluent(bootstrap: str, topic: str) -> set[tuple[Any, ...]]:
    return {(topic, m.partition(), m.offset(), _b64(m.key()), _b64(m.value()),
             tuple(sorted((k, _b64(v)) for k, v in (m.headers() or []))))
            for m in read_topic(bootstrap, topic)}


def _as_seen_by_kafkajs(stdout: str) -> set[tuple[Any, ...]]:
    out = set()
    for line in stdout.splitlines():
        m = json.loads(line)
        out.add((m["topic"], m["partition"], m["offset"], m["key"], m["value"],
                 tuple(sorted(m["headers"].items()))))
    return out


@pytest.mark.parametrize("compression", [None, "gzip", "lz4"],
                         ids=["default", "gzip", "lz4-unreadable"])
def test_kafkajs_reads_every_output_topic(kafkajs_script: Path, kafka_server: KafkaServer,
                                          db_url: str, topics: Topics, tmp_path: Path,
                                          compression: str | None) -> None:
    simulate(kafka_server.bootstrap, topics.input, tmp_path / "sim.jsonl", meters=60,
             count=3_000, interval_s=60, seed=11, anomaly_fraction=0.01,
             invalid_fraction=0.01)
    env = {"KAFKA_COMPRESSION": compression} if compression else {}
    process_all(kafka_server.bootstrap, db_url, topics, tmp_path / "service.log", **env)
    outputs = [topics.agg_1m, topics.agg_15m, topics.alerts, topics.dlq]
    result = kafkajs_read(kafkajs_script, kafka_server.bootstrap, outputs)
    if compression == "lz4":
        assert result.returncode == 3, result.stderr[-2000:]
        assert "KafkaJSNotImplemented: LZ4 compression not implemented" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-2000:]
    got = _as_seen_by_kafkajs(result.stdout)
    for topic in outputs:
        want = _as_seen_by_confluent(kafka_server.bootstrap, topic)
        assert want, f"{topic} is empty: the test would prove nothing"
        assert {m for m in got if m[0] == topic} == want, topic
