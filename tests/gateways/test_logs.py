"""Logging: structlog events and records of libraries that use stdlib logging (hypercorn,
amqtt) come out in the same format, one JSON object per line in production."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from gateways.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "parley", False)]:
        root.removeHandler(handler)


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_json_lines_for_structlog_and_for_stdlib_loggers(capsys):
    configure_logging("json", "info")
    structlog.get_logger("parley.test").info("parley.ready", http="http://127.0.0.1:3000")
    logging.getLogger("hypercorn.error").info("Running on %s", "http://127.0.0.1:3000")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("amqtt.broker").exception("broker failed")
    ours, hypercorn, amqtt = (json.loads(line) for line in _lines(capsys))
    assert (ours["event"], ours["http"], ours["level"]) == ("parley.ready", "http://127.0.0.1:3000", "info")
    assert (hypercorn["event"], hypercorn["logger"], hypercorn["level"]) == (
        "Running on http://127.0.0.1:3000", "hypercorn.error", "info")
    assert "timestamp" in hypercorn
    assert (amqtt["event"], amqtt["level"]) == ("broker failed", "error")
    assert "ValueError: boom" in amqtt["exception"]  # the traceback inside the JSON object


def test_configuring_again_does_not_duplicate_lines(capsys):
    configure_logging("json", "info")
    configure_logging("json", "warning")
    logging.getLogger("hypercorn.error").warning("once")
    logging.getLogger("hypercorn.error").info("filtered: below the level")
    (line,) = _lines(capsys)
    assert json.loads(line)["event"] == "once"


def test_console_format_is_one_readable_line(capsys):
    configure_logging("console", "info")
    logging.getLogger("hypercorn.error").info("Running on %s", "http://127.0.0.1:3000")
    (line,) = _lines(capsys)
    assert "Running on http://127.0.0.1:3000" in line and not line.startswith("{")


@pytest.mark.parametrize("tty, no_color, colored", [(False, "", False), (True, "1", False), (True, "", True)],
                         ids=["to a file", "NO_COLOR", "at a terminal"])
def test_console_lines_are_coloured_only_at_a_terminal_without_no_color(monkeypatch, capsys, tty, no_color,
                                                                           colored):
    monkeypatch.setattr("sys.stderr.isatty", lambda: tty)
    monkeypatch.setenv("NO_COLOR", no_color)
    configure_logging("console", "info")
    structlog.get_logger("parley.test").info("parley.ready")
    (line,) = _lines(capsys)
    assert "parley.ready" in line and ("\x1b[" in line) == colored
