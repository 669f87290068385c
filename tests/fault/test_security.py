"""Security basics, shown on the real servers where it matters.

- Kafka SASL/SSL settings reach the librdkafka clients of the running workers (a worker
  configured for SASL against a plaintext broker fails its handshake, and says so) and
  librdkafka accepts every pass-through key; PostgreSQL TLS goes through the URL
  (``sslmode=require`` against a server without TLS is refused by libpq itself).
- Secrets (the SASL password, the database password) appear in no log line of a whole run
  and in no ``--help`` or ``config show`` output.
- The HTTP endpoint listens on ``HOST`` only.
- SQL that carries data is parameterized or COPY: no statement in ``segs/`` is an f-string
  or ``%``-formatted text at the call site, and hostile meter ids round-trip (see
  ``test_poison.py``; here a quote-and-semicolon id is stored unchanged).
"""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from confluent_kafka import Consumer, Producer

from segs.checkpoint.sink import Sink
from segs.config import load_settings
from segs.tools.local_servers import free_port
from tests.fault.conftest import Fault
from tests.pipeline import SEGS

pytestmark = [pytest.mark.fault]

ROOT = Path(__file__).resolve().parents[2]
SASL_SECRET = "sasl-Pa55-word-7f3e9c"
PG_SECRET = "pg-Pa55-word-41b2d8"

SECURE_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "segs",
    "KAFKA_SASL_PASSWORD": SASL_SECRET,
    "KAFKA_SSL_CA_LOCATION": "/etc/ssl/certs/ca-certificates.crt",
    "KAFKA_EXTRA_CONFIG": "ssl.endpoint.identification.algorithm=https,client.rack=r1",
}


def test_librdkafka_accepts_every_security_setting_as_passed_through() -> None:
    conf = load_settings(env=SECURE_ENV, env_file=None).kafka_common()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.password"] == SASL_SECRET
    assert conf["ssl.endpoint.identification.algorithm"] == "https"
    # the real clients take them (an unknown or malformed key would raise here)
    Consumer({**conf, "group.id": "security-check"}).close()
    Producer(conf).flush(0)


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_postgres_sslmode_goes_through_the_url(db_url: str) -> None:
    url = with_password(db_url, PG_SECRET)  # the test server trusts loopback: accepted
    settings = load_settings(env={"POSTGRES_URL": url + "?sslmode=require"}, env_file=None)
    sink = Sink(settings.postgres_url.get(), consumer_group="g", topic="t")
    sink.open()
    try:
        assert not sink.ping()  # libpq insisted on TLS, which this server does not offer
    finally:
        sink.close()
    with pytest.raises(psycopg.OperationalError, match="SSL"):
        psycopg.connect(settings.postgres_url.get(), connect_timeout=5).close()
    disabled = load_settings(env={"POSTGRES_URL": url + "?sslmode=disable"}, env_file=None)
    psycopg.connect(disabled.postgres_url.get(), connect_timeout=5).close()


def test_workers_use_the_sasl_settings_and_never_log_secrets(fault: Fault) -> None:
    env = {**SECURE_ENV, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SSL_CA_LOCATION": "",
           "KAFKA_EXTRA_CONFIG": "", "LOG_LEVEL": "debug",
           "POSTGRES_URL": with_password(fault.db_url, PG_SECRET)}
    svc = fault.service(workers=1, name="sasl", **env).start()
    fault.inject("SASL client against a plaintext broker")
    deadline = time.monotonic() + 45
    while "SASL PLAIN mechanism handshake failed" not in svc.log_text():
        assert time.monotonic() < deadline, svc.log_text()[-2000:]
        time.sleep(0.5)
    svc.stop(timeout_s=60)
    text = svc.log_text()
    assert SASL_SECRET not in text and PG_SECRET not in text


def test_a_whole_run_with_secrets_logs_none_of_them(fault: Fault) -> None:
    join = fault.stream(10_000, 0, seed=801)
    svc = fault.service(workers=2, name="secret", LOG_LEVEL="debug",
                        KAFKA_SASL_PASSWORD=SASL_SECRET,  # unused without SASL, still secret
                        POSTGRES_URL=with_password(fault.db_url, PG_SECRET)).start()
    messages = join()
    fault.verify(messages, svc)
    assert svc.stop() == 0
    text = svc.log_text()
    assert SASL_SECRET not in text and PG_SECRET not in text
    assert len(text.splitlines()) > 10


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["migrate", "--help"],
                                  ["config", "show"]])
def test_help_and_config_show_never_print_secrets(argv: list[str], db_url: str) -> None:
    env = {"PATH": "/usr/bin:/bin", **SECURE_ENV,
           "POSTGRES_URL": with_password(db_url, PG_SECRET)}
    out = subprocess.run([SEGS, "--env-file", "/dev/null", *argv], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert SASL_SECRET not in out.stdout + out.stderr
    assert PG_SECRET not in out.stdout + out.stderr


def listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (hex as in /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            addr, hexport = cols[1].rsplit(":", 1)
            if int(hexport, 16) == port and cols[3] == "0A":  # LISTEN
                found.add(addr)
    return found


def outside_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_http_endpoint_binds_to_host_only(fault: Fault) -> None:
    port = free_port()
    svc = fault.service(workers=1, name="http", HOST="127.0.0.1", PORT=str(port)).start()
    assert svc.http_port() == port
    assert listening(port) == {"0100007F"}  # 127.0.0.1, nothing else
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    other = outside_address()
    if other:
        with pytest.raises(OSError), socket.create_connection((other, port), timeout=2):
            pass
    assert svc.stop() == 0
    assert "HOST=0.0.0.0" in (ROOT / ".env.example").read_text()  # the documented default


_SQL_CALLS = {"execute", "executemany", "copy"}


def test_no_sql_statement_is_built_from_values_at_the_call_site() -> None:
    offenders = []
    for path in sorted((ROOT / "segs").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _SQL_CALLS and node.args):
                first = node.args[0]
                if isinstance(first, ast.JoinedStr) or (
                        isinstance(first, ast.BinOp) and isinstance(first.op, ast.Mod)):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"SQL text built with values: {offenders}"


def test_a_hostile_meter_id_is_stored_unchanged(fault: Fault) -> None:
    meter = "x'); DROP TABLE aggregates_1m; --\\%\n\"ü"
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 30))
    value = json.dumps({"meterId": meter, "region": "r'; --", "timestamp": ts,
                        "powerKw": 1.0}).encode()
    svc = fault.service(workers=1, name="hostile").start()
    messages = fault.produce([(meter.encode(), value, 0)])
    fault.verify(messages, svc)
    with psycopg.connect(fault.db_url) as conn:
        assert conn.execute("SELECT meter_id, region FROM aggregates_1m").fetchall() == [
            (meter, "r'; --")]
    assert svc.stop() == 0
