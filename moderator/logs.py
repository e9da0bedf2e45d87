"""Logs of every ``moderator`` command: plain text on a terminal, or one JSON object per line
with Elastic Common Schema (ECS) field names, written by Elastic's ``ecs-logging`` formatter.

ECS fields used: ``@timestamp``, ``log.level``, ``log.logger``, ``message``, ``ecs.version``,
``service.name`` / ``service.version`` / ``service.node.name`` (the worker's client id),
``process.*``, ``error.type`` / ``error.message`` / ``error.stack_trace`` (exceptions), and for
the records our code logs with ``extra=``: ``event.action`` (what happened: ``started``,
``dead_letter``, ``assigned``, ...), ``event.id`` (the input event's id: on every line about
one event), ``event.reason`` (a dead-letter or fatal reason code). Every other extra field
goes under ``moderator.*`` (ECS's rule for custom fields), so nothing collides with ECS.
"""

from __future__ import annotations

import logging
import sys

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# our extra= keys -> ECS fields; anything else -> moderator.<key>
_ECS_NAMES = {"event": "event.action", "event_id": "event.id", "reason": "event.reason"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _ecs_formatter_class():
    import ecs_logging  # noqa: PLC0415

    class EcsFormatter(ecs_logging.StdlibFormatter):
        """ECS JSON lines; our ``extra=`` fields renamed to ECS names or ``moderator.*``."""

        def __init__(self, static: dict | None = None) -> None:
            super().__init__(exclude_fields=["log.original", "log.origin"])
            self.static = static or {}

        def format(self, record: logging.LogRecord) -> str:
            r = logging.makeLogRecord(record.__dict__)
            for key in [k for k in vars(r) if k not in _STANDARD and not k.startswith("_") and "." not in k]:
                value = r.__dict__.pop(key)
                name = _ECS_NAMES.get(key)
                if key == "error" and isinstance(value, str) and not record.exc_info:
                    name = "error.message"
                r.__dict__[name or f"moderator.{key}"] = value
            r.__dict__.update(self.static)
            return super().format(r)

    return EcsFormatter


def json_formatter(static: dict | None = None) -> logging.Formatter:
    """The ECS JSON formatter; ``static`` fields (dotted ECS names) go on every line."""
    return _ecs_formatter_class()(static)


def service_fields(node: str | None = None) -> dict:
    from moderator import __version__  # noqa: PLC0415

    return {"service.name": "moderator", "service.version": __version__,
            **({"service.node.name": node} if node else {})}


def configure_logging(level: str = "INFO", json_logs: bool = True, static: dict | None = None) -> None:
    """Replace the root handlers: ECS JSON (or plain text) lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter(static) if json_logs else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # kafka-python is chatty at INFO (every connection, every rebalance step).
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
