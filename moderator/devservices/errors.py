"""Errors raised while bringing up Kafka / Redis for development and tests.

They join the service-wide hierarchy (``moderator.errors.ModeratorError``) so a
caller can catch everything moderator raises on purpose in one place, but each
names what went wrong: a missing tool, a failed dependency download, a process
that would not come up. Messages carry the evidence (Maven output, the tail of
the broker log) because the person reading them usually cannot rerun the step.
"""

from __future__ import annotations

from moderator.errors import ModeratorError


class DevServiceError(ModeratorError):
    """Base class: a development service (Kafka, Redis) could not be provided."""

    reason = "devservice_error"


class ToolNotInstalledError(DevServiceError):
    """An executable the launcher needs (java, mvn, redis-server) is not on PATH."""

    reason = "devservice_tool_missing"


class KafkaLibsError(DevServiceError):
    """Resolving the Kafka broker jars with Maven failed."""

    reason = "devservice_kafka_libs"


class ServiceStartError(DevServiceError):
    """A service process exited early or did not become ready in time."""

    reason = "devservice_start_failed"
