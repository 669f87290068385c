"""Real, throwaway Kafka and PostgreSQL servers on loopback for tests, demo and benchmarks.

* :class:`LocalKafka` — Apache Kafka 4.x in KRaft single-node mode (controller and broker in
  one JVM). Its jars are resolved from Maven Central with the machine's Maven into a cache
  folder (``.cache/kafka-<version>/libs``, or ``$SEGS_CACHE_DIR``), the storage is formatted
  with ``kafka.tools.StorageTool`` and the server started with ``kafka.Kafka``.
* :class:`LocalPostgres` — the machine's PostgreSQL server binaries
  (``/usr/lib/postgresql/*/bin``; the Debian package ``postgresql`` is installed when missing
  and we run as root), a cluster made with ``initdb`` in a temporary folder, owned by an
  unprivileged user when we run as root, on a free loopback port.

Both are skipped when the user names servers of their own: :func:`kafka_from_env` and
:func:`postgres_from_env` read ``SEGS_TEST_KAFKA`` and ``SEGS_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

from segs.errors import InfraError

log = logging.getLogger("segs.local_servers")

KAFKA_VERSION = "4.1.1"
_LOG4J_VERSION = "2.24.3"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InfraError(f"{what} exited with code {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise InfraError(f"{what} did not open port {port} within {timeout_s:.0f} s")


def cache_dir() -> Path:
    return Path(os.environ.get("SEGS_CACHE_DIR", ".cache")).resolve()


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------- Kafka


def kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """The folder of Kafka's runtime jars, resolved with Maven on first use."""
    home = cache_dir() / f"kafka-{version}"
    libs = home / "libs"
    marker = home / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise InfraError("Kafka needs Java 17+ and Maven on PATH (apt-get install maven)")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(
        f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>segs</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{version}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId><version>{_LOG4J_VERSION}</version></dependency>
  </dependencies>
</project>
""",
        encoding="utf-8",
    )
    log.info("resolving Apache Kafka %s jars from Maven Central into %s", version, libs)
    result = subprocess.run(
        ["mvn", "-q", "-B", "dependency:copy-dependencies", "-DincludeScope=runtime",
         f"-DoutputDirectory={libs}"],
        cwd=home, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise InfraError("Maven could not resolve Kafka: " + " | ".join(tail))
    marker.touch()
    return libs


class LocalKafka:
    """A single-node KRaft Kafka broker on a free loopback port."""

    def __init__(self, workdir: Path | None = None, *, heap_mb: int = 768) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="segs-kafka-"))
        self.heap_mb = heap_mb
        self.port = free_port()
        self.controller_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, main: str, *args: str, **popen: object) -> list[str]:
        libs = kafka_jars()
        log4j = self.workdir / "log4j2.properties"
        return [
            "java", f"-Xmx{self.heap_mb}m", "-Xms128m", "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={log4j}", "-Dkafka.logs.dir=" + str(self.workdir),
            "-cp", f"{libs}/*", main, *args,
        ]

    def _write_config(self) -> Path:
        data = self.workdir / "data"
        props = self.workdir / "server.properties"
        props.write_text(
            "\n".join([
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={data}",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=6",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                # Kafka's default: workers starting together join one first rebalance
                "group.initial.rebalance.delay.ms=3000",
                "log.flush.interval.messages=9223372036854775807",
                "message.max.bytes=10485760",
                "",
            ]),
            encoding="utf-8",
        )
        (self.workdir / "log4j2.properties").write_text(
            "rootLogger.level=WARN\nrootLogger.appenderRef.f.ref=F\n"
            "appender.f.type=File\nappender.f.name=F\n"
            f"appender.f.fileName={self.workdir}/server.log\n"
            "appender.f.layout.type=PatternLayout\n"
            "appender.f.layout.pattern=%d %p %c: %m%n\n",
            encoding="utf-8",
        )
        return props

    def start(self, timeout_s: float = 90.0) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        if not self._formatted:
            cluster_id = "-"
            while not cluster_id[0].isalnum():  # argparse would read "-…" as a flag
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            fmt = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", cluster_id,
                           "-c", str(props), "--ignore-formatted"),
                capture_output=True, text=True, check=False,
            )
            if fmt.returncode != 0:
                raise InfraError("Kafka storage format failed: " + fmt.stderr.strip()[-300:])
            self._formatted = True
        with (self.workdir / "stdout.log").open("ab") as out:  # the child keeps its own fd
            self.proc = subprocess.Popen(
                self._java("kafka.Kafka", str(props)), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_port(self.port, timeout_s, self.proc, "Kafka")
        self._wait_ready(timeout_s)
        log.info("Kafka %s up at %s", KAFKA_VERSION, self.bootstrap)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
            except Exception:  # noqa: S110 - still starting
                pass
            time.sleep(0.2)
        raise InfraError(f"Kafka at {self.bootstrap} did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        """Stop the broker, keeping its data (start() again resumes it)."""
        _stop_process(self.proc, 30)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bindir(install: bool = True) -> Path:
    """The newest installed PostgreSQL server bin folder; installs Debian's when allowed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        log.info("installing the Debian package postgresql")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env,
                       capture_output=True)
        res = subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], env=env,
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise InfraError("apt-get install postgresql failed: " + res.stderr[-300:])
        return postgres_bindir(install=False)
    raise InfraError(
        "PostgreSQL server binaries not found: install the Debian package 'postgresql' "
        "or set SEGS_TEST_POSTGRES_URL to a server of yours"
    )


def timescaledb_installed(bindir: Path | None = None) -> bool:
    """Whether the timescaledb library is installed for the server of ``bindir``."""
    bindir = bindir or postgres_bindir(install=False)
    pkglib = subprocess.run([str(bindir / "pg_config"), "--pkglibdir"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if not pkglib:
        pkglib = f"/usr/lib/postgresql/{bindir.parent.name}/lib"
    return bool(glob.glob(f"{pkglib}/timescaledb*.so"))


class LocalPostgres:
    """A throwaway PostgreSQL cluster on a free loopback port."""

    def __init__(self, workdir: Path | None = None, *, database: str = "segs",
                 preload: bool | None = None) -> None:
        """``preload``: timescaledb in ``shared_preload_libraries`` when it is installed
        (None), always (True: an error when it is not installed), never (False). It is read
        by each :meth:`start`, so a test can restart the same cluster the other way."""
        self.bindir = postgres_bindir()
        self.preload = preload
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="segs-pg-"))
        self.data = self.workdir / "data"
        self.database = database
        self.port = free_port()
        self.user = "segs"
        self._runas: str | None = None
        if os.geteuid() == 0:
            self._runas = self._unprivileged_user()

    @staticmethod
    def _unprivileged_user() -> str:
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                return name
        raise InfraError("running as root but found no unprivileged user for initdb")

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self._runas:
            cmd = ["runuser", "-u", self._runas, "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             cwd=str(self.workdir))
        if check and res.returncode != 0:
            raise InfraError(f"{Path(argv[0]).name} failed: {(res.stderr or res.stdout)[-400:]}")
        return res

    def _preload(self) -> str:
        if self.preload is False:
            return ""
        if timescaledb_installed(self.bindir):
            return "timescaledb"
        if self.preload:
            raise InfraError("timescaledb is not installed for this PostgreSQL: cannot "
                             "preload it")
        return ""

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._runas:
            shutil.chown(self.workdir, self._runas)
            os.chmod(self.workdir, 0o755)  # noqa: S103 - the server user must enter it
        if not (self.data / "PG_VERSION").exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                      "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        # wal_buffers: a checkpoint of 100,000 partials writes about 60 MB of WAL; with the
        # default (1/32 of shared_buffers, here 8 MB) the buffer filled 4,400 times per
        # checkpoint and the writers queued on WALWrite for a fifth of its time (README,
        # "Database settings").
        opts = [f"-p {self.port}", "-c listen_addresses=127.0.0.1",
                f"-k {self.workdir}", "-c max_connections=200", "-c shared_buffers=256MB",
                "-c synchronous_commit=off", "-c max_wal_size=2GB", "-c wal_buffers=64MB"]
        preload = self._preload()
        if preload:
            opts.append(f"-c shared_preload_libraries={preload}")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.workdir / "server.log"), "-o", " ".join(opts), "-w", "-t", "60",
                  "start")
        res = self._run(str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", self.user, "-d", "postgres", "-tAc",
                        f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'")
        if res.stdout.strip() != "1":
            self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                      "-U", self.user, self.database)
        log.info("PostgreSQL %s up at %s", self.bindir.parent.name, self.url)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (start() again resumes it)."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                      "stop", check=False)

    def close(self) -> None:
        self.stop("immediate")
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def kafka_from_env() -> str | None:
    """Bootstrap servers of the user's own Kafka, if ``SEGS_TEST_KAFKA`` names one."""
    return os.environ.get("SEGS_TEST_KAFKA") or None


def postgres_from_env() -> str | None:
    """URL of the user's own PostgreSQL, if ``SEGS_TEST_POSTGRES_URL`` names one."""
    return os.environ.get("SEGS_TEST_POSTGRES_URL") or None
