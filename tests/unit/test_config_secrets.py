"""No secret in any output of ``config show`` and ``config check``, whatever the settings.

The real CLI (click's runner, the same code as the installed command) is driven with
generated database URLs — empty or odd user names, passwords of any printable characters
(``@ : / ? # %`` and spaces included), raw or percent-encoded, several hosts, query
parameters, libpq ``key=value`` strings — and ``KAFKA_EXTRA_CONFIG`` values that carry a
secret under a secret key. Every secret is built from words that start with ``Qj``, which
nothing else in the output contains, so any leaked piece of one shows.

Asserted: no such word (nor ``Qj``) in stdout or stderr of either command, and in no log
line of the shared mask; a well-formed URL (percent-encoded password) is accepted and its
password shows as ``***`` only.
"""

from __future__ import annotations

import io
import logging
from urllib.parse import quote

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segs.cli.main import main

from segs.ops.logs import setup_logging

MARK = "Qj"
SPECIALS = "@:/?#%&=,;' \"\\+!$*()[]{}<>|~^`"
SECRET_KEYS = ["sasl.password", "sasl.oauthbearer.client.secret", "ssl.key.password",
               "ssl.keystore.password", "ssl.key.pem", "sasl.oauthbearer.config",
               "sasl.oauthbearer.assertion.private.key.passphrase"]

words = st.text("0123456789abcdefghij", min_size=2, max_size=6).map(lambda t: MARK + t)
secret_parts = st.lists(st.one_of(words, st.sampled_from(SPECIALS)), min_size=1, max_size=6)
secrets = st.tuples(words, secret_parts).map(lambda t: t[0] + "".join(t[1]))
names = st.text("abcdefghklmnoprstuvwxyz", min_size=1, max_size=8)  # no j, no Q
ports = st.integers(1, 65535).map(str)
hosts = st.lists(st.tuples(names, st.one_of(st.just(""), ports)), min_size=1, max_size=3)
SAFE_PARAMS = ["sslmode=require", "application_name=segs", "connect_timeout=5",
               "target_session_attrs=read-write"]


def run(env: dict[str, str], *command: str) -> Result:
    return CliRunner().invoke(main, ["--env-file", "/dev/null", "config", *command], env=env)


def text_of(result: Result) -> str:
    """Everything the command printed: click's runner mixes stdout and stderr here."""
    return result.output


def assert_hidden(out: str, *secret: str) -> None:
    assert MARK not in out, out
    for s in secret:
        assert s not in out


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, list[str], bool]:
    """(URL, its secrets, well formed?)."""
    password = draw(secrets)
    encoded = draw(st.booleans())
    user = draw(st.one_of(st.just(""), names))
    netloc = ",".join(f"{h}:{p}" if p else h for h, p in draw(hosts))
    pw = quote(password, safe="") if encoded else password
    url = f"{draw(st.sampled_from(['postgresql', 'postgres']))}://{user}:{pw}@{netloc}"
    url += draw(st.sampled_from(["", "/segs", "/"]))
    params = draw(st.lists(st.sampled_from(SAFE_PARAMS), max_size=2, unique=True))
    found = [password]
    if draw(st.booleans()):
        query_secret = draw(secrets)
        key = draw(st.sampled_from(["password", "sslpassword"]))
        params.append(f"{key}={quote(query_secret, safe='')}")
        found.append(query_secret)
    if params:
        url += "?" + "&".join(params)
    return url, found, encoded


@given(urls())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_database_url_never_shows_its_secrets(case: tuple[str, list[str], bool]) -> None:
    url, found, well_formed = case
    env = {"POSTGRES_URL": url}
    show, check = run(env, "show"), run(env, "check")
    for result in (show, check):
        assert_hidden(text_of(result), *found)
        assert "Traceback" not in text_of(result)
        assert result.exit_code in (0, 2)
    if well_formed:
        assert check.exit_code == 0, text_of(check)
        assert check.stdout == "configuration ok\n" and not check.stderr
        line = next(x for x in show.output.splitlines() if x.startswith("POSTGRES_URL="))
        assert ":***@" in line
        assert line.count("***") == len(found), line
    else:
        assert show.exit_code == check.exit_code
        if check.exit_code == 2:
            lines = text_of(check).strip().splitlines()
            assert len(lines) == 1 and "POSTGRES_URL" in lines[0], lines


@given(urls())
@settings(max_examples=100, deadline=None)
def test_the_log_filter_masks_the_same_urls(case: tuple[str, list[str], bool]) -> None:
    url, found, well_formed = case
    if not well_formed:  # a raw password may hold white space: free text cannot tell
        return
    stream = io.StringIO()
    setup_logging("info", json_lines=True, stream=stream)
    try:
        logging.getLogger("segs.test").warning("connecting to %s failed", url)
        logging.getLogger("segs.test").warning("retry", extra={"url": url, "dsn": url})
    finally:
        logging.getLogger().handlers.clear()
    assert_hidden(stream.getvalue(), *found)
    assert ":***@" in stream.getvalue()


@st.composite
def extra_configs(draw: st.DrawFn) -> tuple[str, list[str]]:
    """(KAFKA_EXTRA_CONFIG with secrets under secret keys, those secrets)."""
    pairs = [f"client.rack={draw(names)}"]
    found = []
    for key in draw(st.lists(st.sampled_from(SECRET_KEYS), min_size=1, max_size=3)):
        value = draw(secrets).replace(",", "")  # a value cannot hold the pair separator
        pairs.append(f"{key}={value}")
        found.append(value)
    if draw(st.booleans()):
        pairs.append(f"socket.keepalive.enable={draw(st.sampled_from(['true', 'false']))}")
    return ",".join(draw(st.permutations(pairs))), found


@given(extra_configs(), st.booleans())
@settings(max_examples=200, deadline=None)
def test_kafka_extra_config_never_shows_its_secrets(case: tuple[str, list[str]],
                                                    broken: bool) -> None:
    extra, found = case
    if broken:  # a secret value with a comma in it: the piece after the comma is no setting
        extra = extra.replace(f"={found[0]}", f"={found[0]},{found[0]}", 1)
    env = {"KAFKA_EXTRA_CONFIG": extra, "KAFKA_SASL_PASSWORD": found[0]}
    show, check = run(env, "show"), run(env, "check")
    for result in (show, check):
        assert_hidden(text_of(result), *found)
    if broken:
        assert check.exit_code == 2 and show.exit_code == 2
        assert text_of(check).startswith("segs-stream: error: KAFKA_EXTRA_CONFIG: item ")
        return
    assert check.exit_code == 0, text_of(check)
    line = next(x for x in show.output.splitlines() if x.startswith("KAFKA_EXTRA_CONFIG="))
    assert line.count("=***") == len(found), line
    assert "client.rack=" in line


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://:Qjpw@db/segs", "postgresql://:***@db/segs"),
    ("postgresql://u:p@h1:5432,h2:5432/segs", "postgresql://u:***@h1:5432,h2:5432/segs"),
    ("postgresql://u:Qj%40x@h/segs?password=Qj2&sslpassword=Qj3&sslmode=require",
     "postgresql://u:***@h/segs?password=***&sslpassword=***&sslmode=require"),
    ("postgresql:///segs?host=h1,h2&port=5432,5433&user=u&password=Qj4",
     "postgresql:///segs?host=h1,h2&port=5432,5433&user=u&password=***"),
    ("host=db user=u password=Qj5 dbname=segs", "host=db user=u password=*** dbname=segs"),
    ("host=db password='Qj6 \\' Qj7' dbname=segs", "host=db password='***' dbname=segs"),
])
def test_accepted_urls_show_masked(url: str, shown: str) -> None:
    result = run({"POSTGRES_URL": url}, "show")
    assert result.exit_code == 0, text_of(result)
    assert f"POSTGRES_URL={shown}\n" in result.output
    assert MARK not in text_of(result)


@pytest.mark.parametrize("url", [
    "postgresql://segs:p@ssQj8@db/segs",  # an unencoded '@': libpq would take host "ss…@db"
    "postgresql://u:Qj9/x@h/segs",  # an unencoded '/': libpq would take port "Qj9"
    "postgresql://u:Qj1 0@h/segs",  # a space: libpq refuses, quoting the password
    "postgresql://u:Qj1%zz@h/segs",  # a bad escape: libpq refuses, quoting it
    "host=db password=Qj1 nokey",
    "mysql://u:Qj1@h/db",
    "postgresql://u:Qj1@h:99999/db",
])
def test_rejected_urls_are_one_line_without_the_secret(url: str) -> None:
    for command in ("show", "check"):
        result = run({"POSTGRES_URL": url}, command)
        assert result.exit_code == 2, text_of(result)
        lines = text_of(result).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("segs-stream: error: POSTGRES_URL: ")
        assert MARK not in lines[0]
