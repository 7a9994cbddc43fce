"""Real services for the scale-out tests, each on 127.0.0.1 on a free port, gone afterwards.

- :func:`postgres_server` / the ``postgres`` fixture: a PostgreSQL server of its own, in a
  temporary folder (Debian's server binaries: ``/usr/lib/postgresql/<version>/bin``).
- the ``s3_endpoint`` fixture: moto's S3 server (:func:`tests.s3server.s3_server`) with test
  credentials in the environment.
- :func:`redis_server` / the ``redis`` fixture: a Redis server of its own (Debian's
  ``redis-server``), in memory only, the Celery workers' broker.

A test module uses a fixture by importing it (``from tests.services import postgres``).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3server import free_port, s3_server

#: Credentials moto accepts; set in the environment while ``s3_endpoint`` runs.
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

#: Seconds a server (Redis) may take to answer after it was started.
REDIS_START_TIMEOUT_S = 30

#: PostgreSQL refuses to run as root: as root the server runs as this system user.
POSTGRES_OS_USER = "postgres"
POSTGRES_START_TIMEOUT_S = 60


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl, postgres) on this machine."""


def postgres_bin_dir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: Debian's newest
    ``/usr/lib/postgresql/<version>/bin``, else where ``pg_ctl`` on PATH really lives.

    Raises:
        PostgresNotFound: none found, saying where it looked.
    """
    needed = ("initdb", "pg_ctl", "postgres")
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for folder in candidates:
        if all(os.access(Path(folder) / name, os.X_OK) for name in needed):
            return Path(folder)
    raise PostgresNotFound(f"looked in /usr/lib/postgresql/*/bin and for pg_ctl on PATH ({on_path or 'not found'})")


def _version_key(folder: str) -> tuple[int, ...]:
    version = Path(folder).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server: password authentication over TCP on 127.0.0.1."""

    host: str
    port: int
    user: str
    password: str
    folder: Path

    def url(self, db_name: str = "postgres") -> str:
        """A SQLAlchemy/psycopg2 URL of one database of this server."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{db_name}"

    def connect(self, db_name: str = "postgres"):  # noqa: ANN201 - a psycopg2 connection
        """A psycopg2 connection (autocommit) to one database of this server."""
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=db_name)
        connection.autocommit = True
        return connection

    def create_database(self, prefix: str = "test") -> str:
        """Create a fresh, empty database and return its name (one per test keeps them apart)."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return name


def _as_server_user(command: list[str]) -> list[str]:
    """``command`` as the user the server may run as: ourselves, or ``postgres`` when root."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", POSTGRES_OS_USER, "--", *command]


def _ensure_server_user() -> None:
    """As root: make sure the ``postgres`` system user exists (Debian's package makes it)."""
    import pwd

    try:
        pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_OS_USER],
            check=True,
            capture_output=True,
        )


def _run(command: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=POSTGRES_START_TIMEOUT_S + 30)
    if result.returncode != 0:
        server_log = log.read_text(errors="replace") if log is not None and log.exists() else ""
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{server_log}")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a PostgreSQL server in a temporary folder on 127.0.0.1 on a free port; stop it and
    remove the folder afterwards.

    The superuser ``cvops`` logs in with a password over TCP (scram-sha-256), as a deployment
    would; the Unix socket lives in the folder, never in /var/run/postgresql.

    Raises:
        PostgresNotFound: no server binaries on this machine.
    """
    bin_dir = postgres_bin_dir()
    # Under /tmp itself, not pytest's tmp_path: as root the server runs as `postgres`, which
    # cannot enter pytest's private (0700, root-owned) folders.
    folder = Path(tempfile.mkdtemp(prefix="cvops-pg-"))
    data, log, password_file = folder / "data", folder / "server.log", folder / "password"
    server = PostgresServer(host="127.0.0.1", port=free_port(), user="cvops", password=uuid.uuid4().hex, folder=folder)
    started = False
    try:
        password_file.write_text(server.password + "\n")
        if os.geteuid() == 0:
            _ensure_server_user()
            shutil.chown(folder, user=POSTGRES_OS_USER)
            shutil.chown(password_file, user=POSTGRES_OS_USER)
        _run(
            _as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "--pgdata", str(data),
                    "--username", server.user,
                    "--pwfile", str(password_file),
                    "--auth-local", "trust",
                    "--auth-host", "scram-sha-256",
                    "--encoding", "UTF8",
                    "--locale", "C",
                    "--no-sync",
                ]
            ),
            "initdb",
        )
        # fsync off: a test server, thrown away afterwards.
        options = f"-p {server.port} -k {folder} -c listen_addresses={server.host} -c fsync=off -c max_connections=200"
        _run(
            _as_server_user(
                [str(bin_dir / "pg_ctl"), "start", "--pgdata", str(data), "--log", str(log), "--wait",
                 "--timeout", str(POSTGRES_START_TIMEOUT_S), "-o", options]
            ),
            "pg_ctl start",
            log,
        )
        started = True
        yield server
    finally:
        try:
            if started:
                _run(_as_server_user([str(bin_dir / "pg_ctl"), "stop", "--pgdata", str(data), "-m", "fast", "--wait"]), "pg_ctl stop")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def stop_process(process: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if ``process`` is still there after ``timeout_s``; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the module's tests (each creates its own database); skipped,
    saying why, only where the machine has no PostgreSQL server binaries."""
    try:
        postgres_bin_dir()
    except PostgresNotFound as error:
        pytest.skip(f"no PostgreSQL server binaries (initdb/pg_ctl) on this machine: {error}")
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server with the bucket ``cvops``, test credentials in the environment; yields
    its endpoint URL."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_TEST_ENV.items():
            patch.setenv(name, value)
        with s3_server(("cvops",)) as endpoint:
            yield endpoint


class RedisNotFound(RuntimeError):
    """No ``redis-server`` binary on this machine."""


def redis_server_binary() -> Path:
    """Debian's ``/usr/bin/redis-server``, else ``redis-server`` on PATH.

    Raises:
        RedisNotFound: none found, saying where it looked.
    """
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise RedisNotFound("looked for /usr/bin/redis-server and redis-server on PATH")


@contextmanager
def redis_server() -> Iterator[str]:
    """Start a Redis server on 127.0.0.1 on a free port, in memory only (no RDB snapshot, no
    append-only file), its working folder a temporary one; yield its URL (database 0); stop it
    and remove the folder afterwards.

    Raises:
        RedisNotFound: no server binary on this machine.
        RuntimeError: it did not answer PING within :data:`REDIS_START_TIMEOUT_S` (its log shown).
    """
    import time

    import redis

    binary = redis_server_binary()
    folder = Path(tempfile.mkdtemp(prefix="cvops-redis-"))
    port = free_port()
    log = folder / "server.log"
    command = [
        str(binary), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder), "--save", "",
        "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes", "--logfile", str(log),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                detail = log.read_text(errors="replace") if log.exists() else process.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
                raise RuntimeError(f"redis-server did not answer on {url} (exit {process.poll()}):\n{detail}")
            time.sleep(0.1)
        client.close()
        yield url
    finally:
        stop_process(process, timeout_s=10)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def redis() -> Iterator[str]:
    """A Redis server for the module's tests; yields its URL. Skipped, saying why, only where the
    machine has no ``redis-server`` binary."""
    try:
        redis_server_binary()
    except RedisNotFound as error:
        pytest.skip(f"no redis-server binary on this machine (Debian: apt-get install redis-server): {error}")
    with redis_server() as url:
        yield url
