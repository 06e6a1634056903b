"""``aviator.log.configure(json=True)``: every record, Aviator's or the standard library's,
warnings and uncaught exceptions, is one JSON object on one line of stderr."""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from aviator import log


@pytest.fixture
def json_logs() -> Iterator[None]:
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    level = logging.getLogger().level
    log.configure("debug", json=True)
    try:
        yield
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, log._Handler)]:
            root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        structlog.reset_defaults()


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line.strip()]


@pytest.mark.usefixtures("json_logs")
def test_stdlib_records_are_json_lines_with_their_logger(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.getLogger("grpc._cython.cygrpc").warning("channel %s broke", "x")
    structlog.get_logger("aviator.test").info("own line", policy="AviatorPolicy shop/web")
    first, second = _lines(capsys)
    assert first["event"] == "channel x broke"
    assert (first["logger"], first["level"]) == ("grpc._cython.cygrpc", "warning")
    assert "timestamp" in first
    assert second == {
        "event": "own line",
        "policy": "AviatorPolicy shop/web",
        "level": "info",
        "timestamp": second["timestamp"],
    }


@pytest.mark.usefixtures("json_logs")
def test_a_traceback_is_one_field_of_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        raise RuntimeError("bug\nwith a second line")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("handler failed")
        structlog.get_logger().exception("also here")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2, err
    for line in lines:
        record = json.loads(line)
        assert "Traceback" in record["exception"]
        assert "RuntimeError: bug\nwith a second line" in record["exception"]


@pytest.mark.usefixtures("json_logs")
def test_warnings_and_uncaught_exceptions_are_json(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    try:
        raise ValueError("nobody caught me")
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    thread = threading.Thread(target=lambda: 1 / 0, name="worker")
    thread.start()
    thread.join()
    warned, uncaught, in_thread = _lines(capsys)
    assert warned["logger"] == "py.warnings"
    assert "old API" in warned["event"]
    assert uncaught["event"] == "uncaught exception"
    assert "ValueError: nobody caught me" in uncaught["exception"]
    assert in_thread["thread"] == "worker"
    assert "ZeroDivisionError" in in_thread["exception"]


def test_console_format_stays_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info")
    try:
        logging.getLogger("kubernetes.client").warning("retrying")
        err = capsys.readouterr().err
        assert "retrying" in err
        assert "[warning" in err
        assert not err.lstrip().startswith("{")
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, log._Handler)]:
            root.removeHandler(handler)
        logging.captureWarnings(False)
        structlog.reset_defaults()
