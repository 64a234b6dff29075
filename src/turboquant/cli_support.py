"""What every ``turboquant`` command shares: one-line errors with a fix and a non-zero exit, exit codes, and
``key=value`` option parsing. Commands defined above the engine (``flows.cli``) use it too."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, Callable

import typer

from turboquant.errors import ConfigError, TurboQuantError

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1
EXIT_GATE_FAILED = 3
EXIT_NOT_REPRODUCED = 4


def fail(message: str, code: int) -> None:
    typer.echo(f"turboquant: error: {message}", err=True)
    raise typer.Exit(code)


def _os_error_line(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full{where}. Fix: free space or choose another --out location."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}. Fix: choose a writable location or fix its permissions."
    return f"{e.strerror or e}{where}. Fix: check the path and try again."


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line on stderr and a non-zero exit (traceback with TURBOQUANT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TurboQuantError as e:
            if os.environ.get("TURBOQUANT_DEBUG"):
                raise
            fail(str(e), EXIT_USER_ERROR)
        except OSError as e:
            if os.environ.get("TURBOQUANT_DEBUG"):
                raise
            fail(_os_error_line(e), EXIT_USER_ERROR)
        except KeyboardInterrupt:
            fail("interrupted; no partial output was kept", 130)
        except Exception as e:  # noqa: BLE001 - the last line of defence for an unattended job
            if os.environ.get("TURBOQUANT_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            fail(f"internal error {type(e).__name__}: {first}. Fix: rerun with TURBOQUANT_DEBUG=1 and report it.",
                  EXIT_INTERNAL)

    return wrapper


#: Prefix of the progress lines a long command writes to stderr when it is not a terminal (logs, CI, cron).
PROGRESS_PREFIX = "turboquant: progress: "


@contextlib.contextmanager
def progress_lines(enabled: bool) -> Iterator[None]:
    """While enabled, the engine's ``turboquant`` INFO records (one per finished block, with elapsed time) go to
    stderr as ``turboquant: progress: …`` lines: where no progress bar can be drawn a long job still shows it is
    alive. A failure still ends with its one ``turboquant: error:`` line."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("turboquant")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ProgressFormatter())
    handler.setLevel(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _ProgressFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = PROGRESS_PREFIX if record.levelno == logging.INFO else f"turboquant: {record.levelname.lower()}: "
        return prefix + record.getMessage()


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, true/false), else kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"option '{pair}' is not key=value", "write options as --option key=value")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
    return out
