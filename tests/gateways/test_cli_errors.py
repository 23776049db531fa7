"""The CLI's answer to common mistakes: one sentence on stderr naming what is wrong and what
to do, a non-zero exit, no traceback; and the settings `simulate` takes its broker from."""

from __future__ import annotations

import contextlib
import json
import errno
import os
import socket
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

import gateways.serve
from gateways.cli import app, builtin_broker_url
from gateways.config import Settings
from tests.support import capture_serve_settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No parley.toml or PARLEY_* variable of the caller's; logging restored afterwards."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.upper().startswith("PARLEY_") and name.upper() not in ("PARLEY_TEST_BROKER", "PARLEY_REQUIRE_SERVICES"):
            monkeypatch.delenv(name)
    yield
    structlog.reset_defaults()


def one_sentence(result, code: int) -> str:
    """The single stderr line of a failed command (stdout empty, no traceback)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # not wrapped at 80 columns, no second line
    assert "Traceback" not in result.stderr and "╭" not in result.stderr
    return lines[0]


# -- settings ----------------------------------------------------------------------------

def test_an_unknown_key_in_parley_toml_names_the_file_the_key_and_the_known_ones(tmp_path):
    Path("parley.toml").write_text("http_prot = 3000\n")
    line = one_sentence(runner.invoke(app, ["replay", "device", "x"]), 2)
    assert line.startswith("invalid settings: parley.toml: unknown setting 'http_prot' (did you mean 'http_port'?")
    assert "known: host, http_port" in line and "pydantic" not in line and "_FromFile" not in line


def test_a_config_file_that_is_missing_or_a_directory_says_which(tmp_path):
    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--config", str(tmp_path / "nope.toml")]), 2)
    assert line == f"invalid settings: config file {tmp_path / 'nope.toml'} not found"
    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--config", str(tmp_path)]), 2)
    assert line == f"invalid settings: config file {tmp_path} is a directory, not a TOML file"


def test_simulate_refuses_a_negative_duration(tmp_path):
    result = runner.invoke(app, ["simulate", "--duration", "-5"])
    assert result.exit_code == 2 and "-5.0 is not in the range x>=0" in " ".join(result.output.split())


def test_a_toml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("http_port = \n")
    line = one_sentence(runner.invoke(app, ["serve", "--config", str(bad)]), 2)
    assert line.startswith(f"invalid settings: {bad}: not valid TOML:") and "line 1" in line


def test_a_bad_value_names_the_variable_the_flag_or_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_LOG_FORMAT", "xml")
    line = one_sentence(runner.invoke(app, ["serve"]), 2)
    assert line == "invalid settings: PARLEY_LOG_FORMAT: input should be 'auto', 'console' or 'json' (got 'xml')"
    monkeypatch.delenv("PARLEY_LOG_FORMAT")
    Path("parley.toml").write_text('log_level = "loud"\n')
    line = one_sentence(runner.invoke(app, ["serve"]), 2)
    assert line.startswith("invalid settings: parley.toml: log_level: input should be")
    line = one_sentence(runner.invoke(app, ["serve", "--log-format", "xml"]), 2)
    assert line.startswith("invalid settings: --log-format: input should be 'auto'")


@pytest.mark.parametrize("args, where", [
    (["--http-port", "99999"], "--http-port"),
    (["--voice-port", "-1"], "--voice-port"),
])
def test_ports_are_checked_in_the_settings(args, where):
    line = one_sentence(runner.invoke(app, ["serve", *args]), 2)
    assert line.startswith(f"invalid settings: {where}: ") and "is not a port: use 1-65535 (or 0 for any free port)" in line


@pytest.mark.parametrize("name, value, says", [
    ("PARLEY_LIVENESS_CHECK_INTERVAL", "0", "input should be greater than 0 (got '0')"),  # was a busy loop
    ("PARLEY_LIVENESS_WINDOW", "-5", "input should be greater than 0 (got '-5')"),
    ("PARLEY_IDLE_TIMEOUT", "inf", "input should be a finite number (got 'inf')"),
    ("PARLEY_MAX_ACTIVE_ACTORS", "0", "input should be greater than or equal to 1 (got '0')"),
])
def test_times_and_counts_that_make_no_sense_are_settings_errors(name, value, says, monkeypatch):
    monkeypatch.setenv(name, value)
    assert one_sentence(runner.invoke(app, ["serve"]), 2) == f"invalid settings: {name}: {says}"


def test_port_0_means_any_free_port_and_is_accepted(monkeypatch):
    seen = capture_serve_settings(monkeypatch)
    monkeypatch.setenv("PARLEY_BUILTIN_BROKER_PORT", "0")
    result = runner.invoke(app, ["serve", "--http-port", "0"])
    assert result.exit_code == 0, result.output
    assert (seen[0].http_port, seen[0].builtin_broker_port) == (0, 0)


@pytest.mark.parametrize("url", ["http://127.0.0.1:1883", "localhost:1884", "127.0.0.1:1884", "mqtt://:1883"])
def test_an_mqtt_url_parley_cannot_use_is_a_settings_error(url):
    line = one_sentence(runner.invoke(app, ["serve", "--mqtt-url", url]), 2)
    assert line == f"invalid settings: --mqtt-url: unsupported MQTT URL {url!r}: use mqtt://host:port"


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:99999", "mqtt://127.0.0.1:x"])
def test_an_mqtt_url_with_a_bad_port_says_so(url):
    line = one_sentence(runner.invoke(app, ["serve", "--mqtt-url", url]), 2)
    assert line == (f"invalid settings: --mqtt-url: the MQTT URL {url!r} has no valid port: use mqtt://host:port "
                    "with a port from 1 to 65535")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "notaurl"])
def test_a_database_url_parley_cannot_use_is_a_settings_error(url):
    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--database-url", url]), 2)
    assert line == (f"invalid settings: --database-url: unsupported database URL {url!r}: use "
                    "postgresql://user@host:port/database or sqlite:///path/to/file.db (or leave it out for "
                    "SQLite under the data directory)")


@pytest.mark.parametrize("command", [["serve"], ["replay", "device", "x"]])
@pytest.mark.parametrize("url, shown", [("postgresql://u:s3cret@127.0.0.1:abc/x", "postgresql://u@127.0.0.1:abc/x"),
                                        ("postgres://127.0.0.1:99999/x", "postgres://127.0.0.1:99999/x")])
def test_a_database_url_with_a_bad_port_is_a_settings_error(command, url, shown, monkeypatch):
    # It was a traceback from deep in the store ("Port could not be cast to integer value").
    line = one_sentence(runner.invoke(app, [*command, "--database-url", url]), 2)
    assert line == (f"invalid settings: --database-url: database URL {shown!r} has no valid port: use "
                    "postgresql://user@host:port/database with a port from 1 to 65535")
    monkeypatch.setenv("PARLEY_DATABASE_URL", url)
    line = one_sentence(runner.invoke(app, command), 2)
    assert line.startswith("invalid settings: PARLEY_DATABASE_URL: database URL")


@pytest.mark.parametrize("flag, url, shown", [
    ("--database-url", "postgresql+psycopg://app:s3cret@h/db", "postgresql+psycopg://app@h/db"),
    ("--mqtt-url", "ws://u:s3cret@h:1883", "ws://u@h:1883"),
    ("--mqtt-url", "mqtt://u:s3cret@h:99999", "mqtt://u@h:99999"),
])
def test_a_refused_url_is_echoed_without_its_password(flag, url, shown):
    line = one_sentence(runner.invoke(app, ["serve", flag, url]), 2)
    assert "s3cret" not in line and f"{shown!r}" in line


# -- failures at start -------------------------------------------------------------------

def _serve_failing_with(monkeypatch, exc: BaseException, *args: str):
    async def fake_main(settings):
        raise exc

    monkeypatch.setattr(gateways.serve, "main", fake_main)
    return runner.invoke(app, ["serve", *args])


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        raise outer from cause
    except BaseException as e:  # noqa: BLE001
        return e


def test_a_value_error_about_the_mqtt_url_from_the_gateway_reaches_the_user_as_a_sentence(monkeypatch):
    """gateways/mqtt.py checks the URL too (the settings should have caught it first)."""
    exc = BaseExceptionGroup("serve", [ValueError("unsupported MQTT URL '127.0.0.1:1884': use mqtt://host:port")])
    line = one_sentence(_serve_failing_with(monkeypatch, exc), 1)
    assert line == "parley could not start: unsupported MQTT URL '127.0.0.1:1884': use mqtt://host:port"


def test_an_unreachable_broker_is_named_without_the_password_of_its_url(monkeypatch):
    exc = ConnectionError("MQTT broker at 127.0.0.1:1 not reachable within 15.0 s")
    line = one_sentence(_serve_failing_with(monkeypatch, exc, "--mqtt-url", "mqtt://user:s3cret@127.0.0.1:1"), 1)
    assert line == ("parley could not start: MQTT broker at 127.0.0.1:1 not reachable within 15.0 s; check "
                    "that the broker is running, and --mqtt-url (mqtt://user@127.0.0.1:1)")


def test_an_address_not_on_this_machine_says_so_and_not_that_a_broker_runs_there(monkeypatch):
    from gateways.broker import BuiltinBrokerError

    not_here = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
    for exc in (not_here, _chained(BuiltinBrokerError("built-in MQTT broker failed to start on 10.9.9.9:1883"), not_here)):
        line = one_sentence(_serve_failing_with(monkeypatch, exc, "--host", "10.9.9.9"), 1)
        assert line.startswith("parley could not start: cannot listen on 10.9.9.9: no network interface of this machine")
        assert "--host 127.0.0.1" in line and "broker may be running" not in line


def test_a_taken_builtin_broker_port_points_to_mqtt_url_and_the_port_setting(monkeypatch):
    from gateways.broker import BuiltinBrokerError

    exc = _chained(BuiltinBrokerError("built-in MQTT broker failed to start on 127.0.0.1:1883: in use"),
                   OSError(errno.EADDRINUSE, "Address already in use"))
    line = one_sentence(_serve_failing_with(monkeypatch, exc), 1)
    assert "--mqtt-url mqtt://127.0.0.1:1883" in line and "PARLEY_BUILTIN_BROKER_PORT" in line


def test_a_taken_http_port_points_to_http_port(monkeypatch):
    line = one_sentence(_serve_failing_with(monkeypatch, OSError(errno.EADDRINUSE, "in use"), "--http-port", "3456"), 1)
    assert line == "parley could not start: port 3456 on 127.0.0.1 is taken: choose another with --http-port"


@pytest.mark.parametrize("exc_type, code", [(PermissionError, errno.EACCES), (FileNotFoundError, errno.ENOENT),
                                            (NotADirectoryError, errno.ENOTDIR)])
def test_a_data_directory_that_cannot_be_created_names_it(tmp_path, monkeypatch, exc_type, code):
    data = tmp_path / "locked" / "data"
    exc = exc_type(code, os.strerror(code), str(tmp_path / "locked"))
    line = one_sentence(_serve_failing_with(monkeypatch, exc, "--data-dir", str(data)), 1)
    assert line == (f"parley could not start: cannot use the data directory {data}: {os.strerror(code)} "
                    f"({tmp_path / 'locked'}); choose another with --data-dir or PARLEY_DATA_DIR")


def test_an_empty_data_directory_sqlite_cannot_write_says_so_not_that_its_files_are_damaged(tmp_path, monkeypatch):
    """No events.sqlite or views.sqlite there yet: the line said to check "that the files
    are whole", files that did not exist."""
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    line = one_sentence(_serve_failing_with(monkeypatch, sqlite3.OperationalError("unable to open database file"),
                                            "--data-dir", str(data)), 1)
    assert line == (f"parley could not start: cannot create the data in {data}: unable to open database file; "
                    "check that the directory is writable, or choose another with --data-dir or PARLEY_DATA_DIR")


def _run_parley(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("PARLEY_")}
    return subprocess.run([sys.executable, "-m", "gateways.cli", *args], capture_output=True, text=True,
                          timeout=90, env={**environ, **env}, cwd=Path(__file__).parents[2])


def _problem_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The last stderr line (log lines of the runtime may come before it) of a failed run."""
    assert "Traceback" not in proc.stderr and "╭" not in proc.stderr, proc.stderr
    assert proc.stdout == "", proc.stdout
    return proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("taken", ["http", "broker"])
def test_serve_whose_port_is_taken_stops_before_opening_the_store(tmp_path, taken):
    """A Mosquitto of the machine's on the built-in broker's port, or another server on the
    HTTP port: one line saying so, and no data directory or empty log left behind."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port, free = listener.getsockname()[1], _free_port()
        http, broker = (port, free) if taken == "http" else (free, port)
        proc = _run_parley("serve", "--http-port", str(http), "--data-dir", str(tmp_path / "data"),
                           PARLEY_BUILTIN_BROKER_PORT=str(broker))
    assert proc.returncode == 1
    line = _problem_line(proc)
    if taken == "http":
        assert line == f"parley could not start: port {port} on 127.0.0.1 is taken: choose another with --http-port"
    else:
        assert line.startswith(f"parley could not start: built-in MQTT broker failed to start on 127.0.0.1:{port}")
        assert f"--mqtt-url mqtt://127.0.0.1:{port}" in line
    assert not (tmp_path / "data").exists() and "runtime.started" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_its_data_dir_under_a_regular_file_says_so(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _run_parley("serve", "--mqtt-url", "mqtt://127.0.0.1:1", "--data-dir", str(tmp_path / "file" / "data"))
    assert proc.returncode == 1
    assert _problem_line(proc).startswith(f"parley could not start: cannot use the data directory {tmp_path / 'file' / 'data'}: ")


def test_serve_with_a_sqlite_url_in_a_missing_directory_names_the_directory(tmp_path):
    """SQLite said only "unable to open database file"; a --data-dir is created, the
    directory of a sqlite:/// file is not."""
    url = f"sqlite:///{tmp_path}/missing/x.db"
    proc = _run_parley("serve", "--mqtt-url", "mqtt://127.0.0.1:1", "--database-url", url,
                       "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 1
    assert _problem_line(proc) == (f"parley could not start: the event store at {url} is not usable: the "
                                   f"directory {tmp_path}/missing does not exist (SQLite creates the file, "
                                   "not its directory)")


def test_serve_on_an_address_of_another_machine_says_so(tmp_path):
    # 192.0.2.1 (TEST-NET-1) is on no machine's interface; port 0: the built-in broker's bind fails
    for extra in ([], ["--http-port", "0"]):
        proc = _run_parley("serve", "--host", "192.0.2.1", "--data-dir", str(tmp_path), *extra,
                           PARLEY_BUILTIN_BROKER_PORT="0")
        assert proc.returncode == 1, proc.stderr
        line = _problem_line(proc)
        assert line.startswith("parley could not start: cannot listen on 192.0.2.1: no network interface"), line
        assert "broker may be running" not in line


@contextlib.contextmanager
def _refused_port() -> Iterator[int]:
    """A port that refuses connections while the block runs: bound, never listening. (One
    closed again at once was taken by another listener once in CI, and `parley simulate`
    waited 15 s for a CONNACK instead of being refused.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_closed_postgresql_port_gives_the_reason_and_the_url_without_password(tmp_path):
    with _refused_port() as port:
        url = f"postgresql://postgres:secret@127.0.0.1:{port}/parley"
        line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--database-url", url]), 1)
    assert line.startswith(f"parley could not read the log: cannot use the PostgreSQL log at "
                           f"postgresql://postgres@127.0.0.1:{port}/parley: ")
    assert "refused" in line.lower() and "secret" not in line and "couldn't get a connection" not in line


@pytest.mark.postgres
def test_missing_postgresql_database_or_role_is_named(pg_url):
    from urllib.parse import urlsplit

    u = urlsplit(pg_url)
    missing_db = u._replace(path=f"/parley_missing_{uuid.uuid4().hex[:8]}").geturl()
    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--database-url", missing_db]), 1)
    name = missing_db.rsplit("/", 1)[1]
    # (serve's hint to create it is left out: replay only reads, and a new database is empty)
    assert line.endswith(f'database "{name}" does not exist') and "createdb" not in line, line
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    missing_role = u._replace(netloc=f"{role}@{u.hostname}:{u.port or 5432}").geturl()
    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--database-url", missing_role]), 1)
    assert f'role "{role}" does not exist' in line


# -- replay reads, never creates -----------------------------------------------------------

def test_replay_in_a_directory_without_data_says_so_and_creates_nothing(tmp_path):
    line = one_sentence(runner.invoke(app, ["replay", "device", "x"]), 1)
    assert line == f"parley: no Parley data in {tmp_path / 'data'} (use --data-dir or --database-url)"
    assert list(tmp_path.iterdir()) == []
    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--data-dir", "/proc/xx"]), 1)
    assert line == "parley: no Parley data in /proc/xx (use --data-dir or --database-url)"


@pytest.mark.parametrize("product", [[], ["--product", "thermostat"]], ids=["", "--product"])
def test_replay_of_a_sqlite_url_with_no_file_says_so_and_creates_no_file(tmp_path, product):
    """With --product it created an empty database file there (and said "no Parley data");
    without, it said "device not found", as if there were data."""
    missing = tmp_path / "none.db"
    line = one_sentence(runner.invoke(app, ["replay", "device", "t1", *product, "--database-url",
                                            f"sqlite:///{missing}"]), 1)
    assert line == f"parley: no Parley data in {missing} (use --database-url with an existing file, or --data-dir)"
    assert list(tmp_path.iterdir()) == []


def test_replay_of_an_empty_sqlite_file_says_so_and_creates_no_table(tmp_path):
    import sqlite3

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "events.sqlite").touch()  # e.g. left by an interrupted copy
    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--product", "p"]), 1)
    assert line == f"parley: no Parley data in {tmp_path / 'data'} (use --data-dir or --database-url)"
    with sqlite3.connect(tmp_path / "data" / "events.sqlite") as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_replay_of_an_empty_postgresql_database_says_so_and_creates_no_table(pg_database):
    import psycopg

    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--product", "p",
                                            "--database-url", pg_database]), 1)
    assert line == f"parley: no Parley data in {pg_database} (use --data-dir or --database-url)"
    # Without --product too: the same sentence (it was "device not found", as if data were there).
    line = one_sentence(runner.invoke(app, ["replay", "device", "x", "--database-url", pg_database]), 1)
    assert line == f"parley: no Parley data in {pg_database} (use --data-dir or --database-url)"
    with psycopg.connect(pg_database) as conn:
        assert conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall() == []


def test_replay_of_an_unknown_device_names_the_store_it_read(tmp_path):
    from eventstore import EventLog, StoreConfig

    data = tmp_path / "elsewhere"
    EventLog(StoreConfig.resolve(data, None)).close()  # a log, no views yet
    line = one_sentence(runner.invoke(app, ["replay", "device", "nobody", "--data-dir", str(data)]), 1)
    assert line.startswith(f"parley: device 'nobody' not found in {data}; ")
    assert not (data / "views.sqlite").exists()  # asking did not create the views


def test_replay_whose_views_cannot_be_read_says_why_not_device_not_found(tmp_path):
    """The views say which product a device is in; views that cannot be read (here a
    damaged file; a read-only directory is alike: SQLite cannot open its shared memory)
    were taken for "no views yet", and replay said the device was not found."""
    from eventstore import EventLog, StoreConfig

    data = tmp_path / "data"
    EventLog(StoreConfig.resolve(data, None)).close()
    (data / "views.sqlite").write_bytes(b"not a database, " * 512)
    line = one_sentence(runner.invoke(app, ["replay", "device", "d-1", "--data-dir", str(data)]), 1)
    assert line == (f"parley could not read the log: the data in {data} (events.sqlite, views.sqlite) is "
                    f"not usable: file is not a database; check that the directory is writable (SQLite "
                    f"writes its shared-memory files there, also to read) and that the files are whole"), line
    assert "not found" not in line


# -- simulate takes its broker from the settings -----------------------------------------

class FakeSimulator:
    made: list[str] = []

    def __init__(self, spec, product, *, mqtt_url, **kw):
        FakeSimulator.made.append(mqtt_url)

    def start(self):
        pass

    def stop(self):
        pass

    def counters(self):
        return {"connected_devices": 1, "devices": 1, "sent": 59, "events": 0, "answered": 0, "rejected": 0,
                "rate": 1.0, "elapsed": 59.0}


@pytest.fixture
def fake_simulator(monkeypatch):
    import gateways.simulate

    FakeSimulator.made = []
    monkeypatch.setattr(gateways.simulate, "Simulator", FakeSimulator)
    return FakeSimulator.made


def test_simulate_uses_the_broker_serve_would(tmp_path, monkeypatch, fake_simulator):
    def run(*args: str) -> None:
        result = runner.invoke(app, ["simulate", "--duration", "0", *args])
        assert result.exit_code == 0, result.output

    run()
    monkeypatch.setenv("PARLEY_BUILTIN_BROKER_PORT", "18833")
    run()
    Path("parley.toml").write_text('mqtt_url = "mqtt://broker.example:1884"\n')
    run()
    monkeypatch.setenv("PARLEY_MQTT_URL", "mqtt://10.0.0.5:1885")
    run()
    run("--mqtt-url", "mqtt://127.0.0.1:1886")
    assert fake_simulator == ["mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:18833", "mqtt://broker.example:1884",
                              "mqtt://10.0.0.5:1885", "mqtt://127.0.0.1:1886"]


def test_builtin_broker_url_from_the_bind_address():
    assert builtin_broker_url(Settings(host="0.0.0.0", builtin_broker_port=1900)) == "mqtt://127.0.0.1:1900"
    assert builtin_broker_url(Settings(host="::", builtin_broker_port=1900)) == "mqtt://[::1]:1900"
    assert builtin_broker_url(Settings(host="192.168.1.4")) == "mqtt://192.168.1.4:1883"


@pytest.mark.parametrize("host", ["::1", "::"])
def test_serve_on_an_ipv6_host_reaches_its_own_builtin_broker(tmp_path, host):
    """`--host ::1` started the built-in broker, then could not connect to it: `mqtt://::1:port`
    is no URL ("unsupported MQTT URL", a URL the user never typed)."""
    import urllib.request

    from tests.services import free_port

    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("PARLEY_")}
    environ["PARLEY_BUILTIN_BROKER_PORT"] = str(free_port())
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateways.cli", "serve", "--host", host, "--http-port", str(http_port),
         "--data-dir", str(tmp_path), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environ, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline and proc.poll() is None and health is None:
            try:
                with urllib.request.urlopen(f"http://[::1]:{http_port}/api/health", timeout=1) as r:
                    health = json.loads(r.read())
            except OSError:
                time.sleep(0.1)
        assert health is not None, proc.stderr.read() if proc.poll() is not None else "no answer in 30 s"
        assert health["mqttConnected"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    started = [json.loads(line) for line in err.splitlines() if '"broker.builtin_started"' in line]
    assert [line["url"] for line in started] == [f"mqtt://[::1]:{environ['PARLEY_BUILTIN_BROKER_PORT']}"]


def test_simulate_output_to_a_file_has_one_line_each(fake_simulator):
    result = runner.invoke(app, ["simulate", "--duration", "0.3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "simulating 10 'thermostat' devices on mqtt://127.0.0.1:1883"
    assert lines[-1].startswith("stopped: devices 1  messages sent 59") and lines[-1].endswith("59 s")
    assert "sstopped" not in result.stdout


def test_simulate_warns_when_the_server_lacks_the_product(tmp_path, monkeypatch, mqtt_broker, fake_simulator):
    """A `parley serve` without --demo drops every message of `parley simulate`'s thermostats
    as an unknown product, a warning in the server's log only: simulate says so itself."""
    import httpx

    from gateways.simulate import fetch_spec
    from tests.services import free_port, start_parley, stop_parley

    port = free_port()
    proc = start_parley(tmp_path, mqtt_broker.url, port)
    try:
        monkeypatch.setenv("PARLEY_HTTP_PORT", str(port))
        result = runner.invoke(app, ["simulate", "--duration", "0"])
        assert result.exit_code == 0, result.output
        assert "warning" not in result.stderr  # --demo made the thermostat agent
        # --spec-from-server: the spec; a wrong base URL is said to be one, not a missing product
        server = f"http://127.0.0.1:{port}"
        assert "set_target_temperature" in fetch_spec(server, "thermostat")["commands"]
        with pytest.raises(LookupError) as wrong:
            fetch_spec(server + "/api", "thermostat")
        assert str(wrong.value) == (f"no Parley API at {server}/api (GET {server}/api/api/agents/thermostat is "
                                    "404): give the server's base URL, such as http://127.0.0.1:3000")

        assert httpx.delete(f"http://127.0.0.1:{port}/api/agents/thermostat").status_code == 200
        with pytest.raises(LookupError, match=f"product 'thermostat' not found at {server}$"):
            fetch_spec(server, "thermostat")
        result = runner.invoke(app, ["simulate", "--duration", "0"])
        assert result.exit_code == 0, result.output
        assert " ".join(result.stderr.split()) == (
            f"warning: the Parley at http://127.0.0.1:{port} has no agent 'thermostat': it drops these "
            "devices' messages (start it with --demo, or create the agent: POST /api/agents)")
        assert len(fake_simulator) == 2  # a warning, not a refusal: the server may get the agent later
    finally:
        stop_parley(proc)
    # Nothing answers there now: nothing is known, nothing said.
    result = runner.invoke(app, ["simulate", "--duration", "0"])
    assert result.exit_code == 0 and result.stderr == "", result.output


def test_simulate_with_a_bad_mqtt_url_is_a_settings_error(monkeypatch, fake_simulator):
    monkeypatch.setenv("PARLEY_MQTT_URL", "localhost:1884")
    line = one_sentence(runner.invoke(app, ["simulate", "--duration", "0"]), 2)
    assert line == "invalid settings: PARLEY_MQTT_URL: unsupported MQTT URL 'localhost:1884': use mqtt://host:port"
    assert fake_simulator == []


@pytest.mark.mosquitto
def test_simulate_finds_a_moved_builtin_broker_port(mqtt_broker):
    """PARLEY_BUILTIN_BROKER_PORT moves `parley serve`'s broker; simulate must follow it."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    got = threading.Event()
    subscribed = threading.Event()
    observer = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"obs-{uuid.uuid4().hex[:8]}")
    observer.on_message = lambda *a: got.set()
    observer.on_subscribe = lambda *a: subscribed.set()
    observer.connect(mqtt_broker.host, mqtt_broker.port)
    observer.loop_start()
    try:
        observer.subscribe("v1/thermostat/+/telemetry")
        assert subscribed.wait(5)
        proc = _run_parley("simulate", "--devices", "1", "--interval", "1", "--duration", "1",
                           PARLEY_HOST=mqtt_broker.host, PARLEY_BUILTIN_BROKER_PORT=str(mqtt_broker.port))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert got.wait(5)
        assert proc.stdout.splitlines()[0].endswith(f"on mqtt://{mqtt_broker.host}:{mqtt_broker.port}")
        assert proc.stdout.splitlines()[-1].startswith("stopped: ")
    finally:
        observer.disconnect()
        observer.loop_stop()


def test_simulate_without_a_broker_says_so_at_once():
    """Refused: said straight away (not after 15 s of paho's quiet retries), as one line."""
    with _refused_port() as port:
        proc = _run_parley("simulate", "--duration", "3", "--mqtt-url", f"mqtt://127.0.0.1:{port}")
    assert proc.returncode == 1
    assert _problem_line(proc) == (f"parley simulate: MQTT broker at 127.0.0.1:{port}: Connection refused; is "
                                   "`parley serve` running with this broker? (--mqtt-url, PARLEY_MQTT_URL or "
                                   "PARLEY_BUILTIN_BROKER_PORT)")


@pytest.mark.mosquitto
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_simulate_stops_cleanly_on_a_signal_even_started_in_the_background(mqtt_broker, signum):
    """A script's `parley simulate &` inherits SIGINT ignored; SIGTERM (a supervisor, kill)
    and SIGINT must both stop it with its final line, and exit 0."""
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("PARLEY_")}
    environ["PYTHONFAULTHANDLER"] = "1"  # SIGABRT (below) dumps every thread's stack
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateways.cli", "simulate", "--devices", "2", "--interval", "0.2",
         "--mqtt-url", f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
        cwd=Path(__file__).parents[2], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        first = proc.stdout.readline()  # printed once the devices are connected
        assert first.startswith("simulating 2 'thermostat' devices"), first + proc.stderr.read()
        proc.send_signal(signum)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # where it hangs, for the failure message
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"simulate did not stop within 20 s of {signum.name}:\n{err[-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    last = out.splitlines()[-1]
    assert last.startswith("stopped: devices ") and "messages sent 0 " not in last, out
    assert "Traceback" not in err, err


# -- help ------------------------------------------------------------------------------

def _commands():
    import typer.main

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        subs = getattr(cmd, "commands", None)
        if subs:
            yield from (([name, sub], sub_cmd) for sub, sub_cmd in subs.items())
        else:
            yield [name], cmd


@pytest.mark.parametrize("path", [p for p, _ in _commands()], ids=" ".join)
def test_help_shows_every_help_text_whole_and_flags_without_a_value(path):
    cmd = dict((tuple(p), c) for p, c in _commands())[tuple(path)]
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    for param in cmd.params:
        if param.help:
            assert param.help.replace("\\[", "[") in out, (param.name, param.help)
    for line in out.splitlines():
        if "--demo" in line or "--help" in line:
            assert "<bool>" not in line and "BOOLEAN" not in line, line
    if path == ["simulate"]:
        assert "[run until Ctrl-C]" in out and "[min(devices, 20)]" in out


def test_demo_is_a_flag(monkeypatch):
    seen = capture_serve_settings(monkeypatch)
    assert runner.invoke(app, ["serve", "--demo"]).exit_code == 0
    assert runner.invoke(app, ["serve"]).exit_code == 0
    assert runner.invoke(app, ["serve", "--demo", "true"]).exit_code == 2  # a flag takes no value
    assert [s.demo for s in seen] == [True, False]
