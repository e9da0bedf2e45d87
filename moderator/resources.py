"""Files that travel inside the package (the wheel), so an installed ``moderator`` finds them
without a checkout: the demo policy and the local Kafka broker's Maven ``pom.xml`` and log
configuration (``moderator demo``, ``bench-worker``, the test harness)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DATA_DIR = Path(str(files("moderator") / "data"))
DEMO_POLICY = DATA_DIR / "policies" / "demo.yaml"
KAFKA_BROKER_DIR = DATA_DIR / "kafka"
