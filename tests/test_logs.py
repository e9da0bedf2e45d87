"""JSON logs with ECS field names (ecs-logging's formatter), for the worker and every command."""

from __future__ import annotations

import json
import logging

import pytest

from moderator import __version__
from moderator.cli import main
from moderator.logs import json_formatter, service_fields


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _record(msg: str, exc: bool = False, **extra) -> logging.LogRecord:
    logger = logging.getLogger("moderator.worker.pipeline")
    exc_info = None
    if exc:
        try:
            raise ValueError("odd image")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, (), exc_info, extra=extra)
    return record


def test_per_event_line_has_ecs_fields_and_the_event_id():
    line = json.loads(json_formatter(service_fields("worker-1")).format(_record(
        "dead letter", event="dead_letter", event_id="img-7", reason="bad_json", source="images/0@12",
        error="not JSON")))
    assert line["log.level"] == "info" and line["message"] == "dead letter" and "@timestamp" in line
    assert line["ecs.version"] and line["log"]["logger"] == "moderator.worker.pipeline"
    assert line["event"] == {"action": "dead_letter", "id": "img-7", "reason": "bad_json"}
    assert line["error"] == {"message": "not JSON"}
    assert line["moderator"] == {"source": "images/0@12"}  # custom fields under their own namespace
    assert line["service"] == {"name": "moderator", "version": __version__, "node": {"name": "worker-1"}}


def test_exceptions_become_ecs_error_fields_without_colliding_with_extras():
    line = json.loads(json_formatter().format(_record("decode failed", exc=True, event="decode_failed",
                                                      event_id="img-9", error="also a string")))
    assert line["error"]["type"] == "ValueError" and line["error"]["message"] == "odd image"
    assert "ValueError" in line["error"]["stack_trace"] or "raise ValueError" in line["error"]["stack_trace"]
    assert line["moderator"]["error"] == "also a string" and line["event"]["id"] == "img-9"


def test_every_command_can_log_json(capsys, restore_root_logging):
    assert main(["--log-format", "json", "docs", "metrics"]) == 0
    capsys.readouterr()
    logging.getLogger("moderator.bank_tool").warning("skipped %s", "a.png", extra={"event": "skipped",
                                                                                  "event_id": "a"})
    (line,) = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert line["message"] == "skipped a.png" and line["log.level"] == "warning"
    assert line["event"] == {"action": "skipped", "id": "a"} and line["service"]["name"] == "moderator"


def test_log_format_comes_from_the_environment_too(capsys, restore_root_logging, monkeypatch):
    monkeypatch.setenv("MODERATOR_LOG_FORMAT", "json")
    assert main(["docs", "metrics"]) == 0
    capsys.readouterr()
    logging.getLogger("moderator.calibrate").warning("hello")
    assert json.loads(capsys.readouterr().err)["message"] == "hello"
