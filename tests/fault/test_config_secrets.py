"""Issue 16, case 4: the installed ``segs-stream config show|check`` print no secret.

The settings an operator really writes — an empty user name, a password in the query
string, an unencoded ``@`` in the password, librdkafka secrets in ``KAFKA_EXTRA_CONFIG``,
libpq ``key=value`` strings, several hosts — go through the real command in a subprocess
(environment and ``.env`` file), and a ``migrate`` against an unreachable database shows its
error line. No output holds a secret; valid multi-host URLs are accepted. The generated
cases are in ``tests/unit/test_config_secrets.py``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.pipeline import SEGS

pytestmark = [pytest.mark.fault]

SECRETS = ["pw-9d1c", "qpw-77a0", "p@ss-3e5b", "oauth-c0ffee", "keypw-51f2", "ksp-aa11",
           "-----BEGIN PRIVATE KEY----- MIIEvQ-5e6f", "sasl-42f0"]
EXTRA = ("client.rack=r1,sasl.oauthbearer.client.secret=oauth-c0ffee,"
         "ssl.key.password=keypw-51f2,ssl.keystore.password=ksp-aa11,"
         "ssl.key.pem=-----BEGIN PRIVATE KEY----- MIIEvQ-5e6f")


def segs(*argv: str, env: dict[str, str],
         env_file: str = "/dev/null") -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEGS, "--env-file", env_file, *argv],
                          env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=60, check=False)


def leaked(out: subprocess.CompletedProcess[str]) -> list[str]:
    text = out.stdout + out.stderr
    pieces = {s for secret in SECRETS for s in (secret, *secret.split("@"), *secret.split())}
    return [p for p in pieces if len(p) >= 4 and p in text]


@pytest.mark.parametrize(("url", "code", "shown"), [
    ("postgresql://:pw-9d1c@db/segs", 0, "postgresql://:***@db/segs"),
    ("postgresql://segs:x@db/segs?sslmode=require&password=qpw-77a0",
     0, "postgresql://segs:***@db/segs?sslmode=require&password=***"),
    ("postgresql://segs:pw-9d1c@h1:5432,h2:5433/segs?sslpassword=qpw-77a0",
     0, "postgresql://segs:***@h1:5432,h2:5433/segs?sslpassword=***"),
    ("postgresql:///segs?host=h1,h2&port=5432,5433&password=pw-9d1c",
     0, "postgresql:///segs?host=h1,h2&port=5432,5433&password=***"),
    ("host=db dbname=segs password=pw-9d1c", 0, "host=db dbname=segs password=***"),
    ("postgresql://segs:p@ss-3e5b@db/segs", 2, None),
    ("postgresql://segs:pw-9d1c@db:notaport/segs", 2, None),
])
def test_config_show_and_check_never_print_a_secret(url: str, code: int, shown: str | None,
                                                     tmp_path: Path) -> None:
    env = {"POSTGRES_URL": url, "KAFKA_EXTRA_CONFIG": EXTRA, "KAFKA_SASL_PASSWORD": "sasl-42f0"}
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))
    for source in ({"env": env}, {"env": {}, "env_file": str(dotenv)}):
        show, check = segs("config", "show", **source), segs("config", "check", **source)
        for out in (show, check):
            assert out.returncode == code, out.stdout + out.stderr
            assert not leaked(out), (leaked(out), out.stdout + out.stderr)
        if code == 0:
            assert check.stdout == "configuration ok\n"
            assert f"POSTGRES_URL={shown}\n" in show.stdout
            assert ("KAFKA_EXTRA_CONFIG=client.rack=r1,sasl.oauthbearer.client.secret=***,"
                    "ssl.key.password=***,ssl.keystore.password=***,ssl.key.pem=***\n"
                    in show.stdout)
            assert "KAFKA_SASL_PASSWORD=***\n" in show.stdout
        else:
            assert len(check.stderr.strip().splitlines()) == 1
            assert check.stderr.startswith("segs-stream: error: POSTGRES_URL: ")


def test_a_failed_migrate_names_the_database_without_its_password() -> None:
    out = segs("migrate", env={"POSTGRES_URL": "postgresql://segs:pw-9d1c@127.0.0.1:1/segs"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not leaked(out), out.stderr
