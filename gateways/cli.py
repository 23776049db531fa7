"""The `parley` command: serve, replay, simulate."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from gateways.config import Settings, load_settings
from gateways.logs import configure_logging

app = typer.Typer(help="Parley: give every IoT device an LLM agent.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
replay_app = typer.Typer(help="Replay what happened, from the log.", no_args_is_help=True)
app.add_typer(replay_app, name="replay")
console = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML settings file (default ./parley.toml).")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Where the SQLite log lives [./data].")]
DbOpt = Annotated[Optional[str], typer.Option("--database-url", help="postgresql://user@host:port/db instead of SQLite.")]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except Exception as exc:
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to bind [127.0.0.1].")] = None,
    http_port: Annotated[Optional[int], typer.Option(help="HTTP API port [3000].")] = None,
    voice_port: Annotated[Optional[int], typer.Option(help="Voice WebSocket port [3001] (reserved).")] = None,
    mqtt_url: Annotated[Optional[str], typer.Option(help="mqtt://host:port of your broker; none: built-in broker on 1883.")] = None,
    mqtt_client_id: Annotated[Optional[str], typer.Option(help="MQTT client id (default parley-<hostname>); one per process.")] = None,
    mqtt_shared_group: Annotated[Optional[str], typer.Option(help="Subscribe as $share/<group>/… so several processes split the devices' messages.")] = None,
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
    demo: Annotated[Optional[bool], typer.Option("--demo", help="Create the thermostat demo agent.")] = None,
    log_format: Annotated[Optional[str], typer.Option(help="auto, console or json.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the server: MQTT device gateway and HTTP API."""
    import trio

    from gateways.serve import main

    settings = _settings(config, host=host, http_port=http_port, voice_port=voice_port, mqtt_url=mqtt_url,
                         mqtt_client_id=mqtt_client_id, mqtt_shared_group=mqtt_shared_group,
                         database_url=database_url, data_dir=data_dir, demo=demo, log_format=log_format)
    configure_logging(settings.log_format, settings.log_level)
    try:
        trio.run(main, settings)
    except BaseException as exc:  # noqa: BLE001 - sorted below; anything unknown is re-raised
        problem = _startup_problem(exc, settings)
        if problem is None:
            raise
        console.print(f"[red]parley could not start:[/red] {problem}")
        raise typer.Exit(1) from None


def _startup_problem(exc: BaseException, settings: Settings) -> str | None:
    """A sentence for the failures a user can fix (ports, broker, database), else None."""
    from gateways.broker import BuiltinBrokerError

    leaves = [exc]
    while any(isinstance(e, BaseExceptionGroup) for e in leaves):
        leaves = [x for e in leaves for x in (e.exceptions if isinstance(e, BaseExceptionGroup) else [e])]
    for e in leaves:
        if isinstance(e, BuiltinBrokerError):
            return (f"{e}\n  Another MQTT broker may be running there: use it with "
                    f"--mqtt-url mqtt://{settings.host}:{settings.builtin_broker_port}, or move the built-in "
                    f"broker with PARLEY_BUILTIN_BROKER_PORT.")
        if isinstance(e, ConnectionError):
            return f"{e}\n  Check --mqtt-url ({settings.mqtt_url}) and that the broker is running."
        if isinstance(e, OSError) and e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            return f"{e}\n  Port {settings.http_port} is taken: choose another with --http-port."
        if type(e).__module__.startswith(("psycopg", "eventsourcing", "sqlite3")):
            return f"the event store is not usable: {e}"
    return None


def _ms(value: int | None) -> str:
    if not value:
        return "-"
    return datetime.fromtimestamp(value / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@replay_app.command("device")
def replay_device(
    device_id: Annotated[str, typer.Argument(help="The device id.")],
    product: Annotated[Optional[str], typer.Option("--product", help="Product (agent) id, if ambiguous.")] = None,
    at: Annotated[Optional[int], typer.Option("--at", help="Show the device's state at this version.")] = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A device's events as a timeline, or its state at a version."""
    from actors.device import Device
    from eventstore import EventLog, StoreConfig

    settings = _settings(config, data_dir=data_dir, database_url=database_url)
    configure_logging("console", "warning")
    store = StoreConfig.resolve(settings.data_dir, settings.database_url)
    log = EventLog(store)
    try:
        product = product or _find_product(log, device_id)
        stream = Device.create_id(product, device_id)
        if at is not None:
            device = log.load(stream, version=at)
            if device is None:
                console.print(f"[red]no events for device {device_id!r} in product {product!r}[/red]")
                raise typer.Exit(1)
            table = Table(title=f"{product}/{device_id} at version {device.version}")
            table.add_column("field")
            table.add_column("value")
            table.add_row("online", str(device.online))
            table.add_row("last seen", _ms(device.last_seen_ms))
            for k, v in sorted(device.state.items()):
                table.add_row(f"state.{k}", json.dumps(v))
            for rid, p in device.pending.items():
                table.add_row(f"pending {rid}", f"{p['command']} (timeout {p['timeout_ms']} ms)")
            console.print(table)
            return
        table = Table(title=f"{product}/{device_id}: timeline")
        # Version, time and type stay on one line each; the data takes what width is left.
        for col in ("version", "time", "type"):
            table.add_column(col, no_wrap=True)
        table.add_column("data", overflow="fold")
        n = 0
        for event in log.read_stream(stream):
            # What happened, without the envelope (ids, versions, topics) or empty fields.
            data = {k: v for k, v in vars(event).items()
                    if k not in ("originator_id", "originator_version", "timestamp", "originator_topic")
                    and v is not None}
            table.add_row(str(event.originator_version),
                          event.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                          type(event).__name__,
                          json.dumps(data, default=str, ensure_ascii=False, separators=(",", ":")))
            n += 1
        if not n:
            console.print(f"[red]no events for device {device_id!r} in product {product!r}[/red]")
            raise typer.Exit(1)
        console.print(table)
    finally:
        log.close()


def _find_product(log: Any, device_id: str) -> str:
    """Which product has this device: from the registry view, read-only."""
    from projections.db import ViewDatabase
    from projections.device_registry import DeviceRegistry

    db = ViewDatabase(log.config)
    try:
        found = DeviceRegistry(db).find(device_id)
    except Exception:
        found = []
    finally:
        db.close()
    products = sorted({d.product_id for d in found})
    if len(products) == 1:
        return products[0]
    if not products:
        console.print(f"[red]device {device_id!r} not found; pass --product to read its stream directly[/red]")
    else:
        console.print(f"[red]device {device_id!r} exists in several products ({', '.join(products)}): pass --product[/red]")
    raise typer.Exit(1)


@app.command()
def simulate(
    product: Annotated[str, typer.Option("--product", help="Product (agent) id the devices belong to.")] = "thermostat",
    devices: Annotated[int, typer.Option("--devices", min=1, help="How many virtual devices.")] = 10,
    interval: Annotated[float, typer.Option("--interval", min=0.001, help="Seconds between heartbeats.")] = 30.0,
    mqtt_url: Annotated[str, typer.Option("--mqtt-url", help="The broker Parley listens on.")] = "mqtt://127.0.0.1:1883",
    duration: Annotated[Optional[float], typer.Option("--duration", help="Stop after this many seconds [run until Ctrl-C].")] = None,
    connections: Annotated[Optional[int], typer.Option("--connections", min=1, help="Shared MQTT connections [min(devices, 20)].")] = None,
    spec_from_server: Annotated[Optional[str], typer.Option("--spec-from-server", help="http://host:port of a Parley: use its product's device_spec.")] = None,
) -> None:
    """Run virtual devices that speak the MQTT device protocol (for demos and load)."""
    import time

    from rich.live import Live

    from gateways.demo import THERMOSTAT
    from gateways.simulate import Simulator, fetch_spec

    configure_logging("console", "warning")
    if spec_from_server:
        try:
            spec = fetch_spec(spec_from_server, product)
        except Exception as exc:
            console.print(f"[red]cannot read the device spec of {product!r}:[/red] {exc}")
            raise typer.Exit(1) from None
    elif product == THERMOSTAT["agent_id"]:
        spec = THERMOSTAT["device_spec"]
    else:
        console.print(f"[red]no built-in spec for {product!r}: pass --spec-from-server[/red]")
        raise typer.Exit(2)
    sim = Simulator(spec, product, devices=devices, interval=interval, mqtt_url=mqtt_url,
                    connections=connections)

    def line() -> str:
        c = sim.counters()
        return (f"devices connected {c['connected_devices']}/{c['devices']}  messages sent {c['sent']}"
                f"  events {c['events']}  commands answered {c['answered']} (rejected {c['rejected']})"
                f"  {c['rate']:.0f} msg/s  {c['elapsed']:.0f} s")

    try:
        sim.start()
    except ConnectionError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    try:
        with Live(line(), console=console, refresh_per_second=4, transient=False) as live:
            deadline = None if duration is None else time.monotonic() + duration
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.25)
                live.update(line())
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    console.print(f"stopped: {line()}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
