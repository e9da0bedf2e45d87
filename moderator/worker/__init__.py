"""The streaming worker: the app that wires ingest -> batching -> fetch/decode ->
encode -> decide -> publish, with at-least-once commits and an ops HTTP port."""

from moderator.worker.app import Worker, WorkerStats, run_worker
from moderator.worker.offsets import OffsetTracker

__all__ = ["OffsetTracker", "Worker", "WorkerStats", "run_worker"]
