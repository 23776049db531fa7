"""The `parley` command: serve, replay, simulate."""

from __future__ import annotations

import errno
import json
import re
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gateways.config import Settings, SettingsError, load_settings, reachable_mqtt_url, reachable_url, shown_url
from gateways.logs import configure_logging

app = typer.Typer(help="Parley: give every IoT device an LLM agent.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
replay_app = typer.Typer(help="Replay what happened, from the log.", no_args_is_help=True)
app.add_typer(replay_app, name="replay")
console = Console()  # results: tables, progress
# Problems: one sentence each, on stderr, never wrapped (a log file or `2>&1 | grep` gets it whole).
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def _h(text: str) -> str:
    """Help text as written: typer renders help as Rich markup, which swallows a
    bracketed default like "[run until Ctrl-C]"."""
    return escape(text)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help=_h("TOML settings file [./parley.toml if present]."))]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help=_h("Where the SQLite log lives [./data]."))]
DbOpt = Annotated[Optional[str], typer.Option("--database-url", help=_h("postgresql://user@host:port/db instead of SQLite."))]


def _fail(what: str, problem: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]{escape(what)}:[/red] {escape(problem)}")
    raise typer.Exit(code)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        _fail("invalid settings", str(exc), 2)
    except Exception as exc:  # noqa: BLE001 - anything else pydantic-settings may raise
        _fail("invalid settings", " ".join(str(exc).split()), 2)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help=_h("Address to bind [127.0.0.1]."))] = None,
    http_port: Annotated[Optional[int], typer.Option(help=_h("HTTP API port, 0 for any free one [3000]."))] = None,
    voice_port: Annotated[Optional[int], typer.Option(help=_h("Voice WebSocket port [3001] (reserved)."))] = None,
    mqtt_url: Annotated[Optional[str], typer.Option(help=_h("mqtt://host:port of your broker [none: a built-in broker on port 1883, or PARLEY_BUILTIN_BROKER_PORT]."))] = None,
    mqtt_client_id: Annotated[Optional[str], typer.Option(help=_h("MQTT client id, one per process [parley-<hostname>-<hash of the store>]."))] = None,
    mqtt_shared_group: Annotated[Optional[str], typer.Option(help=_h("Subscribe as $share/<group>/… so several processes split the devices' messages."))] = None,
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
    demo: Annotated[Optional[bool], typer.Option("--demo", help=_h("Create the thermostat demo agent."))] = None,
    log_format: Annotated[Optional[str], typer.Option(help=_h("auto, console or json [auto]."))] = None,
    log_level: Annotated[Optional[str], typer.Option(help=_h("debug, info, warning or error [info]."))] = None,
    access_log: Annotated[Optional[bool], typer.Option("--access-log", help=_h(
        "Log every HTTP request (http.request: method, path, status, ms)."))] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the server: MQTT device gateway and HTTP API."""
    import trio

    from gateways.serve import main

    settings = _settings(config, host=host, http_port=http_port, voice_port=voice_port, mqtt_url=mqtt_url,
                         mqtt_client_id=mqtt_client_id, mqtt_shared_group=mqtt_shared_group,
                         database_url=database_url, data_dir=data_dir, demo=demo, log_format=log_format,
                         log_level=log_level, access_log=access_log)
    if not settings.mqtt_url and settings.http_port and settings.http_port == settings.builtin_broker_port:
        # Else "port N is taken: choose another with --http-port", taken by our own broker.
        _fail("invalid settings", f"the HTTP API and the built-in broker would both use port {settings.http_port}: "
              "choose another --http-port or PARLEY_BUILTIN_BROKER_PORT", 2)
    configure_logging(settings.log_format, settings.log_level)
    try:
        trio.run(main, settings)
    except BaseException as exc:  # noqa: BLE001 - sorted below; anything unknown is re-raised
        problem = _startup_problem(exc, settings)
        if problem is None:
            raise
        _fail("parley could not start", problem)


_ADDRESS_NOT_HERE = {errno.EADDRNOTAVAIL}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM}
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EEXIST, errno.EROFS, errno.ENOSPC}


def _leaves(exc: BaseException) -> list[BaseException]:
    leaves = [exc]
    while any(isinstance(e, BaseExceptionGroup) for e in leaves):
        leaves = [x for e in leaves for x in (e.exceptions if isinstance(e, BaseExceptionGroup) else [e])]
    return leaves


def _no_table(exc: BaseException | None) -> bool:
    """Whether the database said a table does not exist, behind `exc` (eventsourcing wraps
    it): PostgreSQL's UndefinedTable, SQLite's "no such table"."""
    for _ in range(10):
        if exc is None:
            return False
        if type(exc).__name__ == "UndefinedTable" or str(exc).startswith("no such table"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _os_cause(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or its __cause__/__context__ chain)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _store_where(settings: Settings) -> str:
    from eventstore import StoreConfig

    if settings.database_url:
        return StoreConfig(settings.database_url).display_url
    return str(Path(settings.data_dir).expanduser().resolve() / "events.sqlite")


def _address_problem(host: str, err: OSError) -> str:
    if isinstance(err, socket.gaierror):
        return (f"cannot listen on {host!r}: {err.strerror or err}; give --host an address of this "
                f"machine (127.0.0.1 for this machine only, 0.0.0.0 for all its interfaces)")
    return (f"cannot listen on {host}: no network interface of this machine has that address; use --host "
            f"127.0.0.1 (this machine only) or 0.0.0.0 (all its interfaces)")


def _startup_problem(exc: BaseException, settings: Settings) -> str | None:
    """One sentence for a failure the user can fix (ports, addresses, broker, database, data
    directory): what is wrong and what to do. None for anything else (a bug: traceback)."""
    from eventstore import StoreUnavailable
    from gateways.broker import BuiltinBrokerError

    data_dir = Path(settings.data_dir).expanduser().resolve()
    for e in _leaves(exc):
        if isinstance(e, StoreUnavailable):
            return str(e)
        if isinstance(e, BuiltinBrokerError):
            cause = _os_cause(e.__cause__) if e.__cause__ else None
            if cause is not None and (cause.errno in _ADDRESS_NOT_HERE or isinstance(cause, socket.gaierror)):
                return _address_problem(settings.host, cause)
            if cause is not None and cause.errno == errno.EADDRINUSE:
                return (f"{e}: another MQTT broker may be running there; use it with --mqtt-url "
                        f"mqtt://{settings.host}:{settings.builtin_broker_port}, or move the built-in broker "
                        f"to a free port with PARLEY_BUILTIN_BROKER_PORT=<port>")
            return str(e)
        if isinstance(e, ValueError) and ("MQTT URL" in str(e) or "database URL" in str(e)):
            return str(e)  # the settings check these first; this is in case they let one through
        if isinstance(e, ConnectionError) and e.errno is None:  # the MQTT gateway's: no broker there
            return (f"{e}; check that the broker is running, and --mqtt-url "
                    f"({shown_url(settings.mqtt_url) if settings.mqtt_url else 'none: the built-in broker'})")
        if isinstance(e, OSError) and e.filename is None:
            if e.errno == errno.EADDRINUSE:
                return f"port {settings.http_port} on {settings.host} is taken: choose another with --http-port"
            if e.errno in _ADDRESS_NOT_HERE or isinstance(e, socket.gaierror):
                return _address_problem(settings.host, e)
            if e.errno in _NOT_ALLOWED:
                return (f"not allowed to listen on {settings.host}:{settings.http_port} (ports below 1024 "
                        f"need root): choose another with --http-port")
        if isinstance(e, OSError) and e.filename is not None and e.errno in _PATH_ERRNOS:
            path = Path(str(e.filename))
            if path == data_dir or data_dir.is_relative_to(path) or path.is_relative_to(data_dir):
                why = "a file is in the way" if e.errno == errno.EEXIST else e.strerror
                at = "" if path == data_dir else f" ({path})"
                return (f"cannot use the data directory {data_dir}: {why}{at}; choose another "
                        f"with --data-dir or PARLEY_DATA_DIR")
            return f"{e.strerror}: {path}"
        if type(e).__module__.startswith(("psycopg", "eventsourcing", "sqlite3")):
            if settings.database_url:
                folder = _missing_sqlite_folder(settings.database_url)
                if folder is not None:
                    return (f"the event store at {_store_where(settings)} is not usable: the directory "
                            f"{folder} does not exist (SQLite creates the file, not its directory)")
                return f"the event store at {_store_where(settings)} is not usable: {e}"
            if not any((data_dir / name).exists() for name in ("events.sqlite", "views.sqlite")):
                return (f"cannot create the data in {data_dir}: {e}; check that the directory is "
                        f"writable, or choose another with --data-dir or PARLEY_DATA_DIR")
            # SQLite's errors do not say which file: the log or the views.
            return (f"the data in {data_dir} (events.sqlite, views.sqlite) is not usable: {e}; check "
                    f"that the directory is writable (SQLite writes its shared-memory files there, "
                    f"also to read) and that the files are whole")
    return None


def _missing_sqlite_folder(url: str) -> Path | None:
    """The directory of a sqlite:/// URL's file, if it does not exist."""
    from eventstore import StoreConfig

    if not url.startswith("sqlite:///"):
        return None
    folder = Path("/" + StoreConfig(url).sqlite_path.lstrip("/")).parent  # sqlite:////abs: path "//abs"
    return None if folder.is_dir() else folder


def _ms(value: int | None) -> str:
    if not value:
        return "-"
    return datetime.fromtimestamp(value / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _version_arg(raw: str) -> int:
    """--at: a version of the device's stream, 1 or more ("'abc' is not a valid int range"
    was click's word for a non-number)."""
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise typer.BadParameter(f"takes a version of the device's stream, an integer from 1 (the timeline's "
                                 f"'version' column), not {raw!r}")
    return int(text)


@replay_app.command("device")
def replay_device(
    device_id: Annotated[str, typer.Argument(help=_h("The device id."))],
    product: Annotated[Optional[str], typer.Option("--product", help=_h("Product (agent) id, if ambiguous."))] = None,
    at: Annotated[Optional[int], typer.Option("--at", parser=_version_arg, metavar="VERSION", help=_h(
        "Show the device's state at this version (1 is its first event; the timeline lists them)."))] = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A device's events as a timeline, or its state at a version."""
    settings = _settings(config, data_dir=data_dir, database_url=database_url)
    configure_logging(settings.log_format, "warning")  # JSON lines unless a terminal, as serve
    store = _existing_store(settings)
    try:
        _replay(store, device_id, product, at)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - sorted by _startup_problem; anything unknown is re-raised
        if any(_no_table(e) for e in _leaves(exc)):  # PostgreSQL: no log in that database
            _fail("parley", f"no Parley data in {_where(store)} (use --data-dir or --database-url)")
        problem = _startup_problem(exc, settings)
        if problem is None:
            raise
        _fail("parley could not read the log", problem)


def _existing_store(settings: Settings) -> Any:
    """The store to read, without creating one: a read-only command run from the wrong
    directory must not leave an empty ./data behind and then report "not found"."""
    from eventstore import StoreConfig

    if settings.database_url:
        store = StoreConfig(settings.database_url, create_tables=False)
        if store.is_postgres:
            return store
        # sqlite:///path: opening it would create an empty file there (sqlite:////abs: "//abs").
        path = Path("/" + store.sqlite_path.lstrip("/"))
        where, hint = path, "use --database-url with an existing file, or --data-dir"
    else:
        data_dir = Path(settings.data_dir).expanduser().resolve()
        path, where, hint = data_dir / "events.sqlite", data_dir, "use --data-dir or --database-url"
        store = StoreConfig(f"sqlite:///{path}", create_tables=False)
    try:
        found = path.is_file()
    except OSError:
        found = False
    if not found:
        _fail("parley", f"no Parley data in {where} ({hint})")
    return store


# Characters a terminal acts on (a newline, a tab, ESC starting a sequence that retitles or
# recolours it); a device chooses its id, state keys and values. json escapes those below
# 0x20 itself, not DEL and the C1 range (0x9b is a terminal's CSI too).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOT_ESCAPED_BY_JSON = re.compile(r"[\x7f-\x9f]")


def _json(value: Any, **kw: Any) -> str:
    """JSON for the terminal: non-ASCII text as it is, every control character escaped."""
    text = json.dumps(value, default=str, ensure_ascii=False, **kw)
    return _NOT_ESCAPED_BY_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _shown(text: str) -> str:
    """A device's string for the terminal or a tab-separated line: as it is, or JSON-quoted
    (escapes visible) if it holds control characters."""
    return _json(text) if _CONTROL.search(text) else text


def _where(store: Any) -> str:
    """The store, as the user named it: the data directory or the URL (no password)."""
    if store.is_postgres:
        return store.display_url
    return str(Path("/" + store.sqlite_path.lstrip("/")).parent)  # sqlite:////abs: path "//abs"


def _replay(store: Any, device_id: str, product: str | None, at: int | None) -> None:
    from actors.device import Device
    from eventstore import EventLog

    log = EventLog(store)
    try:
        product = product or _find_product(log, device_id)
        stream = Device.create_id(product, device_id)
        shown = _shown(f"{product}/{device_id}")
        no_events = f"no events for device {device_id!r} in product {product!r} in {_where(store)}"
        if at is not None:
            # A version past any stream's is still only "past the end" (SQLite would
            # refuse a number beyond 64 bits with an OverflowError).
            device = log.load(stream, version=min(at, MAX_VERSION))
            if device is None:
                _fail("parley", no_events)
            if device.version < at:  # the load stops at the last version there is
                _fail("parley", f"device {device_id!r} in product {product!r} has versions 1 to "
                                f"{device.version}, not {at}", 2)
            # Values as JSON spells them (true, "auto"), like the timeline's data.
            fields = [("version", str(device.version)), ("online", json.dumps(device.online)),
                      ("last seen", _ms(device.last_seen_ms))]
            fields += [(f"state.{_shown(k)}", _json(v))
                       for k, v in sorted(device.state.items())]
            fields += [(f"pending {_shown(rid)}", f"{_shown(p['command'])} (timeout {p['timeout_ms']} ms)")
                       for rid, p in device.pending.items()]
            if console.is_terminal:
                # Text, not markup: a device's "[/]" crashed rich, its "[link=…]" made a link.
                table = Table(title=Text(f"{shown} at version {device.version}"))
                table.add_column("field")
                table.add_column("value", overflow="fold")
                for row in fields:
                    table.add_row(*map(Text, row))
                console.print(table)
            else:  # piped: one tab-separated line per field, as the timeline's rows
                print("field\tvalue")
                print("\n".join("\t".join(row) for row in fields))
            return
        # Page by page: a device may have millions of events; reading them all first (and
        # holding one table of them) took 2 GB for 290k events.
        version = 0
        while True:
            page = log.read_stream_logged(stream, gt=version, limit=REPLAY_PAGE)
            if not page:
                break
            rows = [_timeline_row(logged) for logged in page]
            if console.is_terminal and console.width < WIDE:
                # Narrow: a table left the data some 10 columns at 80, and folded each
                # event's JSON over 5-10 lines. Each event's header line, its data below.
                if not version:
                    console.print(Text.assemble((f"{shown}: timeline", "bold"),
                                                f" ({', '.join(TIMELINE_COLUMNS[:-1])}; data below each)"))
                for position, v, at_time, kind, data in rows:
                    console.print(Text.assemble((position, "bold"), f"  v{v}  {at_time}  ", (kind, "cyan")))
                    # Not folded by rich: the terminal wraps it, and a copy of it stays one line.
                    console.print(f"    {data}", markup=False, highlight=False, soft_wrap=True)
            elif console.is_terminal:
                table = Table(title=Text(f"{shown}: timeline") if not version else None,
                              show_header=not version)
                # Position, version, time and type stay on one line each; the data takes
                # what width is left.
                for col in TIMELINE_COLUMNS[:-1]:
                    table.add_column(col, no_wrap=True)
                table.add_column(TIMELINE_COLUMNS[-1], overflow="fold")
                for row in rows:
                    table.add_row(*map(Text, row))
                console.print(table)
            else:
                # Piped or redirected: one line per event, tab-separated, whole (a table
                # folds long data over many lines at 80 columns, and `grep` finds nothing).
                if not version:
                    print("\t".join(TIMELINE_COLUMNS))
                print("\n".join("\t".join(row) for row in rows))
            version = page[-1].version
        if not version:
            _fail("parley", no_events)
    finally:
        log.close()


# `position` is the event's place in the whole log: the `id` GET /api/devices/:id/events
# gives; `version` its place in the device's stream: what --at takes.
TIMELINE_COLUMNS = ("position", "version", "time", "type", "data")
WIDE = 120  # terminal columns from which the timeline is a table
MAX_VERSION = 2**63 - 1  # the largest version the log can hold (a 64-bit integer)


def _timeline_row(logged: Any) -> tuple[str, ...]:
    event = logged.event
    # What happened, without the envelope (ids, versions, topics) or empty fields. JSON
    # escapes tabs and newlines, so a row stays one line.
    data = {k: v for k, v in vars(event).items()
            if k not in ("originator_id", "originator_version", "timestamp", "originator_topic")
            and v is not None}
    return (str(logged.position), str(logged.version),
            event.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            type(event).__name__,
            _json(data, separators=(",", ":")))


REPLAY_PAGE = 1000  # events read and printed at a time


def _find_product(log: Any, device_id: str) -> str:
    """Which product has this device: from the registry view, read-only."""
    from projections.db import ViewDatabase
    from projections.device_registry import DeviceRegistry

    found = []
    # No views yet (a log no server has projected): do not create views.sqlite by asking.
    if log.config.is_postgres or Path(log.config.sqlite_path).with_name("views.sqlite").is_file():
        db = ViewDatabase(log.config, log.breaker)
        try:
            found = DeviceRegistry(db).find(device_id)
        except Exception as exc:
            if not any(_no_table(e) for e in _leaves(exc)):
                # Not "no views yet" but views that cannot be read (a read-only directory,
                # a locked or damaged file): said as such by replay_device, not "not found".
                raise
            if log.config.is_postgres and not log.max_position():
                _fail("parley", f"no Parley data in {_where(log.config)} (use --data-dir or --database-url)")
            found = []  # a log without views (yet): found nowhere
        finally:
            db.close()
    products = sorted({d.product_id for d in found})
    if len(products) == 1:
        return products[0]
    if not products:
        _fail("parley", f"device {device_id!r} not found in {_where(log.config)}; check --data-dir / "
                        f"--database-url, or pass --product to read its stream directly")
    _fail("parley", f"device {device_id!r} exists in several products ({', '.join(products)}): pass --product")


@app.command()
def simulate(
    product: Annotated[str, typer.Option("--product", help=_h("Product (agent) id the devices belong to."))] = "thermostat",
    devices: Annotated[int, typer.Option("--devices", min=1, help=_h("How many virtual devices."))] = 10,
    interval: Annotated[float, typer.Option("--interval", min=0.001, help=_h("Seconds between heartbeats."))] = 30.0,
    mqtt_url: Annotated[Optional[str], typer.Option("--mqtt-url", help=_h(
        "The broker Parley listens on [PARLEY_MQTT_URL or mqtt_url in parley.toml, else the built-in "
        "broker's host and port: 127.0.0.1:1883 or PARLEY_BUILTIN_BROKER_PORT]."))] = None,
    duration: Annotated[Optional[float], typer.Option("--duration", min=0, help=_h("Stop after this many seconds [run until Ctrl-C]."))] = None,
    connections: Annotated[Optional[int], typer.Option("--connections", min=1, help=_h("Shared MQTT connections [min(devices, 20)]."))] = None,
    spec_from_server: Annotated[Optional[str], typer.Option("--spec-from-server", help=_h("http://host:port of a Parley: use its product's device_spec."))] = None,
    config: ConfigOpt = None,
) -> None:
    """Run virtual devices that speak the MQTT device protocol (for demos and load)."""
    import signal
    import threading
    import time

    from rich.live import Live

    from gateways.demo import THERMOSTAT
    from gateways.simulate import Simulator, fetch_spec, lacks_product

    # The broker `parley serve` uses, from the same flags, PARLEY_* variables and parley.toml.
    settings = _settings(config, mqtt_url=mqtt_url)
    if not settings.mqtt_url and not settings.builtin_broker_port:
        _fail("parley simulate", "the built-in broker's port is 0 (any free port), so it is unknown here: "
                                 "pass --mqtt-url with the URL `parley serve` logged (broker.builtin_started)", 2)
    url = settings.mqtt_url or builtin_broker_url(settings)
    configure_logging(settings.log_format, "warning")  # JSON lines unless a terminal, as serve
    if spec_from_server:
        try:
            spec = fetch_spec(spec_from_server, product)
        except Exception as exc:
            _fail(f"cannot read the device spec of {product!r}", " ".join(str(exc).split()))
    elif product == THERMOSTAT["agent_id"]:
        spec = THERMOSTAT["device_spec"]
    else:
        _fail("parley", f"no built-in spec for {product!r}: pass --spec-from-server", 2)
    if not spec_from_server and settings.http_port:
        # A server without this product drops every message of these devices (a warning in
        # its log, nothing here): a `parley serve` started without --demo, say. Ask the one
        # these settings describe, if it runs on this machine.
        server = reachable_url("http", settings.host, settings.http_port)
        if lacks_product(server, product):
            err_console.print(f"[yellow]warning:[/yellow] the Parley at {server} has no agent {product!r}: it "
                              "drops these devices' messages (start it with --demo, or create the agent: "
                              "POST /api/agents)")
    sim = Simulator(spec, product, devices=devices, interval=interval, mqtt_url=url,
                    connections=connections)

    def line(stopped: bool = False) -> str:
        c = sim.counters()
        # Once stopped, every device has disconnected: "connected 0/5" read as if none had.
        devices = f"devices {c['devices']}" if stopped else f"devices connected {c['connected_devices']}/{c['devices']}"
        return (f"{devices}  messages sent {c['sent']}"
                f"  events {c['events']}  commands answered {c['answered']} (rejected {c['rejected']})"
                f"  {c['rate']:.0f} msg/s  {c['elapsed']:.0f} s")

    try:
        sim.start()
    except ConnectionError as exc:
        _fail("parley simulate", f"{exc}; is `parley serve` running with this broker? (--mqtt-url, "
                                 f"PARLEY_MQTT_URL or PARLEY_BUILTIN_BROKER_PORT)")
    deadline = None if duration is None else time.monotonic() + duration
    # SIGTERM (a supervisor, `kill`, a benchmark) stops it as cleanly as Ctrl-C does; so does
    # SIGINT sent to a simulator started in the background by a script, which inherits
    # SIGINT ignored and would otherwise never stop.
    stopping = threading.Event()
    before = {signum: signal.signal(signum, lambda *_: stopping.set())
              for signum in (signal.SIGTERM, signal.SIGINT)}
    console.print(f"simulating {devices} {product!r} device{'s' if devices != 1 else ''} on {shown_url(url)}",
                  soft_wrap=True)

    def running() -> bool:
        return not stopping.wait(0.25) and (deadline is None or time.monotonic() < deadline)

    try:
        if console.is_terminal:
            with Live(line(), console=console, refresh_per_second=4, transient=False) as live:
                while running():
                    live.update(line())
        else:  # a file or a pipe: a line every 10 s, each ending in a newline
            next_line = time.monotonic() + 10
            while running():
                if time.monotonic() >= next_line:
                    console.print(line(), soft_wrap=True)
                    next_line += 10
    finally:
        sim.stop()
        for signum, handler in before.items():
            signal.signal(signum, handler)
    console.print(f"stopped: {line(stopped=True)}", soft_wrap=True)


def builtin_broker_url(settings: Settings) -> str:
    """Where `parley serve` with these settings starts its built-in broker, as a client
    reaches it (a wildcard bind address means this machine)."""
    return reachable_mqtt_url(settings.host, settings.builtin_broker_port)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
