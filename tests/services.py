"""Real services for tests and benchmarks: a private Mosquitto and throw-away PostgreSQL databases.

Deliberately free of pytest imports so benchmarks and scripts can use it directly:

    from tests.services import start_test_broker, create_database, drop_database

    broker = start_test_broker(tmpdir)          # private mosquitto, or the built-in broker
    try:
        ... broker.host, broker.port, broker.url, broker.kind ...
    finally:
        broker.stop()

tests/conftest.py wraps these in session-scoped fixtures (mqtt_broker, pg_url).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MOSQUITTO_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class ServiceUnavailable(RuntimeError):
    """A real service needed by tests could not be found or reached."""


def require_services() -> bool:
    """PARLEY_REQUIRE_SERVICES=1: missing services are failures, never skips or fallbacks."""
    return os.environ.get("PARLEY_REQUIRE_SERVICES", "").strip().lower() in {"1", "true", "yes", "on"}


def pg_admin_url() -> str:
    return os.environ.get("PARLEY_TEST_PG_ADMIN_URL") or DEFAULT_PG_ADMIN_URL


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; small reuse race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until host:port accepts TCP connections (or proc exits / timeout)."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceUnavailable(f"process exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise ServiceUnavailable(f"nothing accepted connections on {host}:{port} within {timeout}s: {last}")


# -- MQTT -----------------------------------------------------------------------


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_FALLBACK_PATHS:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def mosquitto_version(binary: str) -> str:
    """E.g. "2.0.11" (first line of `mosquitto -h`: "mosquitto version 2.0.11")."""
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].rsplit(" ", 1)[-1] if first else "unknown"


@dataclass
class BrokerHandle:
    """A running MQTT broker.  `kind` is "mosquitto" or "builtin"."""

    host: str
    port: int
    kind: str
    version: str = ""
    binary: str | None = None
    config_path: Path | None = None
    log_path: Path | None = None
    _stop: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def describe(self) -> str:
        if self.kind == "mosquitto":
            return f"private mosquitto {self.version} ({self.binary}) on {self.host}:{self.port}, log {self.log_path}"
        return f"built-in amqtt broker (gateways.broker.BuiltinBroker) on {self.host}:{self.port}"

    def stop(self) -> None:
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()


def mosquitto_config(port: int, log_path: Path, host: str = "127.0.0.1") -> str:
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        "set_tcp_nodelay true",
        "max_inflight_messages 0",  # 0 = no limit on in-flight QoS 1/2 messages per client
        "max_queued_messages 100000",
        "max_queued_bytes 0",
        f"log_dest file {log_path}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root, mosquitto 2 drops privileges to user "mosquitto", which then cannot
        # write the log file in our tmp dir.  It logs a warning about running as root.
        lines.append("user root")
    return "\n".join(lines) + "\n"


def start_private_mosquitto(
    tmpdir: str | os.PathLike[str],
    *,
    binary: str | None = None,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    attempts: int = 3,
) -> BrokerHandle:
    """Start mosquitto on a free port with a generated config in `tmpdir`; return once it listens."""
    binary = binary or find_mosquitto()
    if binary is None:
        raise ServiceUnavailable("no mosquitto binary found (PATH, " + ", ".join(MOSQUITTO_FALLBACK_PATHS) + ")")
    tmp = Path(tmpdir)
    tmp.mkdir(parents=True, exist_ok=True)
    version = mosquitto_version(binary)
    errors: list[str] = []
    for attempt in range(1, attempts + 1):  # retry: another process may grab the free port first
        port = free_port(host)
        conf = tmp / f"mosquitto-{port}.conf"
        log = tmp / f"mosquitto-{port}.log"
        out = tmp / f"mosquitto-{port}.stderr"
        conf.write_text(mosquitto_config(port, log, host))
        with open(out, "wb") as out_f:
            proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out_f, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port(host, port, timeout, proc)
        except ServiceUnavailable as exc:
            _terminate(proc)
            details = _tail(out) or _tail(log)
            errors.append(f"attempt {attempt} on port {port}: {exc}" + (f"; output: {details}" if details else ""))
            continue
        return BrokerHandle(
            host=host,
            port=port,
            kind="mosquitto",
            version=version,
            binary=binary,
            config_path=conf,
            log_path=log,
            _stop=lambda: _terminate(proc),
        )
    raise RuntimeError(f"could not start private mosquitto ({binary}): " + " | ".join(errors))


def start_builtin_broker(host: str = "127.0.0.1", timeout: float = 10.0) -> BrokerHandle:
    from gateways.broker import BuiltinBroker  # imported lazily: only needed without mosquitto

    broker = BuiltinBroker(host=host, port=0)
    port = broker.start(timeout=timeout)
    return BrokerHandle(host=host, port=port, kind="builtin", version="amqtt", _stop=broker.stop)


def forced_builtin_broker() -> bool:
    return os.environ.get("PARLEY_TEST_BROKER", "").strip().lower() == "builtin"


def start_test_broker(tmpdir: str | os.PathLike[str], *, require: bool | None = None) -> BrokerHandle:
    """Private mosquitto if a binary exists, else the built-in broker.

    With require=True (default: PARLEY_REQUIRE_SERVICES=1) a missing mosquitto binary
    raises ServiceUnavailable instead of falling back. PARLEY_TEST_BROKER=builtin takes the
    built-in broker in any case: CI runs the suite that way too, as a fresh machine would.
    """
    if forced_builtin_broker():
        return start_builtin_broker()
    if require is None:
        require = require_services()
    binary = find_mosquitto()
    if binary is not None:
        return start_private_mosquitto(tmpdir, binary=binary)
    if require:
        raise ServiceUnavailable(
            "PARLEY_REQUIRE_SERVICES=1 but no mosquitto binary was found on PATH or in "
            + ", ".join(MOSQUITTO_FALLBACK_PATHS)
            + " (install mosquitto, or unset PARLEY_REQUIRE_SERVICES to use the built-in broker)"
        )
    return start_builtin_broker()


def _terminate(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


# -- PostgreSQL -------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _database_url(admin_url: str, dbname: str) -> str:
    if admin_url.startswith(("postgresql://", "postgres://")):
        return urlunsplit(urlsplit(admin_url)._replace(path="/" + dbname))
    from psycopg.conninfo import make_conninfo  # key=value DSN

    return make_conninfo(admin_url, dbname=dbname)


def _dbname(url: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(url).get("dbname")
    if not name:
        raise ValueError(f"no database name in {redact_url(url)}")
    return str(name)


def _admin_connect(admin_url: str, connect_timeout: int = 5):
    import psycopg

    try:
        return psycopg.connect(admin_url, autocommit=True, connect_timeout=connect_timeout)
    except psycopg.OperationalError as exc:
        msg = " ".join(str(exc).split())
        raise ServiceUnavailable(f"PostgreSQL not reachable at {redact_url(admin_url)}: {msg}") from exc


def create_database(admin_url: str | None = None, prefix: str = "parley_test_", *,
                    icu_locale: str | None = None) -> str:
    """CREATE DATABASE <prefix><8 hex> and return its URL (same server/credentials as admin_url).
    `icu_locale`: its collation is that ICU locale's (PostgreSQL 15+ built with ICU)."""
    from psycopg import sql

    admin_url = admin_url or pg_admin_url()
    name = f"{prefix}{secrets.token_hex(4)}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if icu_locale is not None:
        statement += sql.SQL(" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(icu_locale))
    with _admin_connect(admin_url) as conn:
        conn.execute(statement)
    return _database_url(admin_url, name)


def drop_database(admin_url: str | None, url: str) -> None:
    """DROP DATABASE ... WITH (FORCE): disconnects lingering sessions (PostgreSQL >= 13)."""
    from psycopg import sql

    admin_url = admin_url or pg_admin_url()
    name = _dbname(url)
    if name == _dbname(admin_url):
        raise ValueError(f"refusing to drop the admin database {name!r}")
    with _admin_connect(admin_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def pg_server_version(url: str) -> str:
    with _admin_connect(url) as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0])


def find_pg_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (initdb, pg_ctl), if installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


class PrivateServer:
    """A PostgreSQL server of our own (initdb in a temporary directory, trust auth, on a free
    port) that a test may stop and start again: a database outage, which the shared server
    on 5432 must never be put through. As root, its programs run as the `postgres` user."""

    def __init__(self) -> None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise ServiceUnavailable("no PostgreSQL server programs (initdb, pg_ctl) found")
        self.bin = bin_dir
        # Not under pytest's tmp_path: its directories are root's alone, closed to `postgres`.
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        self.data = self.root / "pgdata"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def _run(self, program: str, *args: str) -> None:
        out = subprocess.run([*self._as, str(self.bin / program), *args], capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            raise ServiceUnavailable(f"{program} failed: {(out.stderr or out.stdout).strip()[-500:]}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate`: the server goes as in a crash (connections cut, no checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def _processes(self) -> list[int]:
        """The postmaster and every process it started (backends, background workers)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    # The field after the parenthesised name: state, then the parent's pid.
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue  # gone meanwhile
                if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(entry.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """A server that hangs while its host still answers TCP (SIGSTOP to all its
        processes): connections open, queries are acknowledged and never answered."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)

    def destroy(self) -> None:
        try:
            self.thaw()
        except (OSError, ValueError):
            pass  # not running
        try:
            self.stop("immediate")
        except ServiceUnavailable:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


def start_parley(data_dir: Path, broker_url: str, port: int, database_url: str | None = None, *,
                 client_id: str | None = None, timeout: float = 60.0, log_level: str = "warning") -> subprocess.Popen:
    """`parley serve --demo` as its own process on `port`; returns once /api/health answers.
    Its log goes to `data_dir/server.log`."""
    import sys
    import urllib.request

    cmd = [sys.executable, "-m", "gateways.cli", "serve", "--demo", "--host", "127.0.0.1",
           "--http-port", str(port), "--mqtt-url", broker_url, "--data-dir", str(data_dir),
           "--log-format", "json"]
    if database_url:
        cmd += ["--database-url", database_url]
    env = {**os.environ, "PARLEY_LOG_LEVEL": log_level,
           "PARLEY_MQTT_CLIENT_ID": client_id or f"parley-test-{port}"}
    log_path = Path(data_dir) / "server.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceUnavailable(f"parley serve exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    _terminate(proc)
    raise ServiceUnavailable(f"parley serve did not become healthy within {timeout} s")


def stop_parley(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (graceful shutdown), then SIGKILL if it hangs."""
    _terminate(proc, timeout)
