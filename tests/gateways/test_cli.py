"""The CLI: settings precedence, and `replay device` reading a log a server wrote."""

from __future__ import annotations

import json

import pytest
import structlog
from rich.console import Console
from typer.testing import CliRunner

from actors.device import Device, DeviceActor, ReportTelemetry, SendCommand
from actors.errors import CommandTimedOut
from actors.ports import FutureReply
from gateways.cli import app
from gateways.config import load_settings
from tests.support import make_runtime, now_ms

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()  # the CLI configures logging for its process; undo that here


def test_settings_flags_beat_env_beat_toml_beat_defaults(tmp_path, monkeypatch):
    toml = tmp_path / "parley.toml"
    toml.write_text('http_port = 4000\nliveness_window = 30\nlog_format = "json"\n')
    monkeypatch.setenv("PARLEY_HTTP_PORT", "5000")
    s = load_settings(toml)
    assert (s.http_port, s.liveness_window, s.log_format, s.voice_port) == (5000, 30, "json", 3001)
    assert load_settings(toml, http_port=6000).http_port == 6000
    monkeypatch.delenv("PARLEY_HTTP_PORT")
    assert load_settings(toml).http_port == 4000


def test_a_misspelt_variable_is_refused_like_a_misspelt_toml_key(monkeypatch):
    from gateways.config import SettingsError

    monkeypatch.setenv("PARLEY_DATABSE_URL", "postgresql://x@db/parley")
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert str(exc.value).startswith("unknown setting variable PARLEY_DATABSE_URL (did you mean PARLEY_DATABASE_URL? known: ")
    monkeypatch.delenv("PARLEY_DATABSE_URL")
    monkeypatch.setenv("PARLEY_TEST_BROKER", "builtin")  # the test suite's own, not a setting
    monkeypatch.setenv("parley_http_port", "4001")  # names are not case-sensitive
    assert load_settings().http_port == 4001


def test_bad_settings_are_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("http_port = 'many'\n")
    result = runner.invoke(app, ["replay", "device", "x", "--config", str(bad)])
    assert result.exit_code == 2 and "invalid settings" in result.output
    result = runner.invoke(app, ["replay", "device", "x", "--config", str(tmp_path / "missing.toml")], terminal_width=300)
    assert result.exit_code == 2 and "not found" in " ".join(result.output.split())


def test_replay_device_timeline_and_state_at_version(tmp_path, monkeypatch):
    rt = make_runtime(tmp_path)
    rt.attach_device_link(type("Silent", (), {  # never answers
        "connected": True, "publish_command": lambda *a: None, "withdraw": lambda *a: None})())
    try:
        key = ("thermostat", "t-9")
        for state in ({"temperature": 20}, {"temperature": 25}):
            r = FutureReply()
            rt.system.tell(DeviceActor, key, ReportTelemetry("status", "online", state, None, now_ms(), reply=r))
            pos = r.get(5)
        r = FutureReply()
        rt.system.tell(DeviceActor, key, SendCommand("rq-77", "set_target_temperature", {"target_temperature": 21}, 100, reply=r))
        try:
            r.get(5)
        except CommandTimedOut:
            pass
        assert rt.projections.wait_for(pos, 5)
        # Read while the "server" is still running, as an operator would.
        result = runner.invoke(app, ["replay", "device", "t-9", "--data-dir", str(tmp_path)], terminal_width=200)
        assert result.exit_code == 0, result.output
        for word in ("Registered", "StatusReported", "CommandSent", "CommandTimedOut", "rq-77"):
            assert word in result.output
        # Not a terminal here: one tab-separated line per event, whole, so `grep` finds it.
        header, *lines = result.output.splitlines()
        assert header == "position\tversion\ttime\ttype\tdata"
        rows = [line.split("\t") for line in lines]
        assert [r[1] for r in rows] == [str(v) for v in range(1, len(rows) + 1)] and len(rows) == 5
        positions = [int(r[0]) for r in rows]  # the log's positions: what the HTTP events' `id` is
        assert positions == sorted(positions) and len(set(positions)) == 5
        sent = next(r for r in rows if r[3] == "CommandSent")
        assert json.loads(sent[4])["request_id"] == "rq-77"
        assert [lg.position for lg in rt.log.read_stream_logged(Device.create_id("thermostat", "t-9"))] == positions
        result = runner.invoke(app, ["replay", "device", "t-9", "--data-dir", str(tmp_path), "--at", "2"],
                               terminal_width=200)
        assert result.exit_code == 0, result.output
        # Piped: one tab-separated line per field, values spelt as JSON spells them.
        fields = dict(line.split("\t") for line in result.output.splitlines()[1:])
        assert result.output.startswith("field\tvalue\n")
        assert (fields["version"], fields["online"], fields["state.temperature"]) == ("2", "true", "20")
        # A version the stream does not have is named as such, not shown as another one.
        for at, exit_code, words in (("99", 2, "has versions 1 to 5, not 99"), ("0", 2, "(the timeline's 'version' column), not '0'"),
                                     ("abc", 2, "(the timeline's 'version' column), not 'abc'"),
                                     ("9" * 20, 2, f"has versions 1 to 5, not {'9' * 20}")):
            result = runner.invoke(app, ["replay", "device", "t-9", "--data-dir", str(tmp_path), "--at", at],
                                   terminal_width=200)
            assert result.exit_code == exit_code and words in " ".join(result.output.split()), result.output
        # Page by page (a long stream is never read whole): every version, once, in order.
        import gateways.cli as cli

        cli.REPLAY_PAGE, page = 2, cli.REPLAY_PAGE
        try:
            result = runner.invoke(app, ["replay", "device", "t-9", "--data-dir", str(tmp_path)], terminal_width=200)
        finally:
            cli.REPLAY_PAGE = page
        versions = [line.split("\t")[1] for line in result.output.splitlines()[1:]]
        assert versions == [str(v) for v in range(1, 6)]
        assert result.output.count("position\tversion") == 1
        # In a terminal: a table, titled once, its header once, whatever the pages.
        monkeypatch.setattr(cli, "console", Console(force_terminal=True, width=200, color_system=None))
        cli.REPLAY_PAGE = 2
        try:
            with cli.console.capture() as captured:
                result = runner.invoke(app, ["replay", "device", "t-9", "--data-dir", str(tmp_path)])
        finally:
            cli.REPLAY_PAGE = page
        assert result.exit_code == 0, result.output
        table = captured.get()
        assert table.count("t-9: timeline") == 1 and table.count("position") == 1
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")]
        assert [c[:2] for c in cells if c[0].isdigit()] == [[str(p), str(v)] for v, p in enumerate(positions, 1)]
        # A terminal of 80 columns: each event on a line of its own, its data whole below it
        # (a table left the data 10 columns and folded it over many lines).
        monkeypatch.setattr(cli, "console", Console(force_terminal=True, width=80, color_system=None))
        with cli.console.capture() as captured:
            result = runner.invoke(app, ["replay", "device", "t-9", "--data-dir", str(tmp_path)])
        lines = captured.get().splitlines()
        heads = [line.split() for line in lines[1:] if not line.startswith(" ")]
        assert [h[:2] for h in heads] == [[str(p), f"v{v}"] for v, p in enumerate(positions, 1)]
        data = [line.strip() for line in lines if line.startswith("    ")]
        assert json.loads(data[[h[3] for h in heads].index("CommandSent")])["request_id"] == "rq-77"
        # --at in a terminal: a table of the fields
        with cli.console.capture() as captured:
            runner.invoke(app, ["replay", "device", "t-9", "--data-dir", str(tmp_path), "--at", "2"])
        row = next(line for line in captured.get().splitlines() if "state.temperature" in line)
        assert row.split("│")[2].strip() == "20" and "at version 2" in captured.get()
    finally:
        rt.close()
    result = runner.invoke(app, ["replay", "device", "nobody", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "not found" in result.output


def test_serve_explains_a_taken_broker_port_instead_of_a_traceback(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        env = {**os.environ, "PARLEY_BUILTIN_BROKER_PORT": str(blocker.getsockname()[1]), "COLUMNS": "200"}
        proc = subprocess.run([sys.executable, "-m", "gateways.cli", "serve", "--http-port", "0",
                               "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    finally:
        blocker.close()
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1
    assert "parley could not start" in out and "--mqtt-url" in out
    assert "Traceback" not in out


def test_serve_takes_the_mqtt_client_id_and_shared_group_flags_as_docs_mqtt_md_says(monkeypatch):
    from tests.support import capture_serve_settings

    seen = capture_serve_settings(monkeypatch)
    monkeypatch.setenv("PARLEY_MQTT_CLIENT_ID", "from-env")
    monkeypatch.setenv("PARLEY_MQTT_SHARED_GROUP", "env-group")
    result = runner.invoke(app, ["serve", "--mqtt-client-id", "parley-a", "--mqtt-shared-group", "parley"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["serve"])  # no flags: the environment's
    assert result.exit_code == 0, result.output
    assert [(s.mqtt_client_id, s.mqtt_shared_group) for s in seen] == [("parley-a", "parley"), ("from-env", "env-group")]


async def test_serve_with_its_http_port_taken_stops_before_touching_the_broker(tmp_path, monkeypatch):
    """A second `parley serve` on a taken port used to connect to the broker first, with the
    running server's client id, and knock that server off before failing."""
    import socket

    import gateways.serve as serve_module
    from gateways.config import Settings

    made: list[object] = []
    monkeypatch.setattr(serve_module, "MqttGateway", lambda *a, **k: made.append(a))
    monkeypatch.setattr(serve_module, "BuiltinBroker", lambda *a, **k: made.append(a))
    monkeypatch.setattr(serve_module.Runtime, "start", lambda self: made.append("runtime"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(http_port=port, data_dir=tmp_path, mqtt_url="mqtt://127.0.0.1:1")
        with pytest.raises(BaseException) as caught:
            await serve_module.serve(settings)
    leaves = [caught.value]
    while any(isinstance(e, BaseExceptionGroup) for e in leaves):
        leaves = [x for e in leaves for x in (e.exceptions if isinstance(e, BaseExceptionGroup) else [e])]
    assert any(isinstance(e, OSError) and e.errno == 98 for e in leaves), leaves
    assert made == []  # neither a broker nor a gateway was started, nor the runtime (no noise)


def test_serve_with_its_broker_down_says_so_at_once_hides_the_password_and_stops_on_sigint(tmp_path):
    """A broker that refuses the connection is logged on every try (not 15 s of silence),
    the URL's password appears nowhere, and Ctrl-C stops the start at once (exit 0)."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connections are refused
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateways.cli", "serve", "--http-port", "0", "--log-format", "json",
             "--mqtt-url", f"mqtt://user:s3cret@127.0.0.1:{port}", "--data-dir", str(tmp_path / "data")],
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "mqtt.connect_failed" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    failed = next(e for e in lines if e["event"] == "mqtt.connect_failed")
    assert failed["broker"] == f"127.0.0.1:{port}" and "refused" in failed["error"].lower()
    assert failed["level"] == "warning" and failed["will_retry"] is True
    assert code == 0 and stopped_in < 5, (code, stopped_in, text[-2000:])
    assert any(e["event"] == "parley.stopping" for e in lines) and "s3cret" not in text


def test_log_level_has_a_flag_like_log_format(monkeypatch):
    from tests.support import capture_serve_settings

    seen = capture_serve_settings(monkeypatch)
    monkeypatch.setenv("PARLEY_LOG_LEVEL", "error")
    result = runner.invoke(app, ["serve", "--log-level", "warning", "--log-format", "json"])
    assert result.exit_code == 0, result.output
    assert seen[0].log_level == "warning"  # the flag beats the variable
    result = runner.invoke(app, ["serve", "--log-level", "loud"])
    assert result.exit_code == 2 and result.output == (
        "invalid settings: --log-level: input should be 'debug', 'info', 'warning' or 'error' (got 'loud')\n")


def test_the_http_port_and_the_builtin_brokers_cannot_be_the_same(monkeypatch):
    from tests.support import capture_serve_settings

    seen = capture_serve_settings(monkeypatch)
    monkeypatch.setenv("PARLEY_BUILTIN_BROKER_PORT", "18830")
    result = runner.invoke(app, ["serve", "--http-port", "18830"], terminal_width=300)
    assert result.exit_code == 2 and seen == []
    assert " ".join(result.output.split()) == (
        "invalid settings: the HTTP API and the built-in broker would both use port 18830: choose another "
        "--http-port or PARLEY_BUILTIN_BROKER_PORT")
    result = runner.invoke(app, ["serve", "--http-port", "18830", "--mqtt-url", "mqtt://127.0.0.1:1883"])
    assert result.exit_code == 0 and len(seen) == 1  # no built-in broker: no clash


def test_replay_shows_what_a_device_sent_as_text_whatever_it_holds(tmp_path, monkeypatch):
    """A device chooses its data and state keys: rich read "[/]" in them as markup (a
    MarkupError traceback), "[link=…]" made a terminal link, and --at wrote a key's newline,
    tab or escape sequence raw (an audit of the read side)."""
    import gateways.cli as cli
    from actors.device import ReportEvent

    rt = make_runtime(tmp_path)
    try:
        key = ("thermostat", "mk-1")
        state = {"label": "[b]hot[/b]", "line\nbreak": 1, "tab\tkey": 2, "\x1b]0;PWNED\x07red": "[link=http://x]y"}
        r = FutureReply()
        rt.system.tell(DeviceActor, key, ReportTelemetry("status", "online", state, None, now_ms(), reply=r))
        r.get(5)
        r = FutureReply()
        rt.system.tell(DeviceActor, key, ReportEvent("note", {"text": "see [/] here", "c1": "\x9b31m"}, None,
                                                    now_ms(), reply=r))
        assert rt.projections.wait_for(r.get(5), 5)
    finally:
        rt.close()
    for width in (200, 80):
        monkeypatch.setattr(cli, "console", Console(force_terminal=True, width=width, color_system=None))
        for extra in ([], ["--at", "2"]):
            with cli.console.capture() as captured:
                result = runner.invoke(app, ["replay", "device", "mk-1", "--data-dir", str(tmp_path), *extra])
            assert result.exit_code == 0, (width, extra, result.output)
            shown = captured.get()
            assert "\x1b" not in shown and "\x9b" not in shown and "\x07" not in shown, repr(shown)
            if extra:
                assert "[b]hot[/b]" in shown and "state.\"\\u001b]0;PWNED\\u0007red\"" in shown
            else:
                assert "see [/] here" in shown and "\\u009b31m" in shown
    # Piped --at: one line per field, the key's tab and newline escaped, not raw
    monkeypatch.setattr(cli, "console", Console(force_terminal=False))
    result = runner.invoke(app, ["replay", "device", "mk-1", "--data-dir", str(tmp_path), "--at", "2"])
    fields = [line.split("\t") for line in result.output.splitlines()[1:]]
    assert all(len(f) == 2 for f in fields), result.output
    assert ["state.\"line\\nbreak\"", "1"] in fields and ["state.\"tab\\tkey\"", "2"] in fields
