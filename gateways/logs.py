"""structlog setup: JSON lines in production (not a TTY, or --log-format json), readable
console lines at a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _Stderr:
    """Whatever sys.stderr is at the moment of writing (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    # Colours only for a terminal, and never with NO_COLOR set (no-color.org): console lines
    # sent to a file (`--log-format console 2> file`) were full of escape codes.
    colors = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=colors)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exc_info = structlog.processors.format_exc_info if json_lines else structlog.dev.set_exc_info
    structlog.configure(
        processors=[*shared, exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # Libraries that log through stdlib logging (hypercorn, amqtt, paho) are rendered the
    # same way, so that a JSON log stays one JSON object per line; `logger` names them.
    handler = logging.StreamHandler(_Stderr())  # type: ignore[arg-type]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, exc_info, renderer],
    ))
    handler.parley = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "parley", False)]:
        root.removeHandler(old)  # configured again (tests): replace ours, keep the others'
    root.addHandler(handler)
    root.setLevel(max(logging.INFO, getattr(logging, level.upper())))
