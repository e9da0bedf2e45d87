"""Is kafka-python checksumming records in C?

Every record batch kafka-python reads or writes is checked with CRC-32C. Without
the ``crc32c`` package it silently falls back to ``kafka/record/_crc32c.py``, a
pure-Python table loop that profiled at ~80% of the consumer thread and ~77% of
the producer's IO thread and halved the worker's throughput. The worker checks
at start (``kafka_require_native_crc32c``) instead of finding out from a profile.
"""

from __future__ import annotations

from moderator.errors import MissingDependency


def native_crc32c() -> bool:
    """True when kafka-python's record CRC-32C is the C implementation."""
    from kafka.record import _crc32c, util  # noqa: PLC0415

    bound = (util.calc_crc32c.__defaults__ or (None,))[0]  # bound at kafka-python's import time
    return bound is not None and bound is not _crc32c.crc and getattr(util, "crc32c_c", None) is not None


def check_native_crc32c(required: bool) -> bool:
    """Export the finding as ``moderator_kafka_native_crc32c``; raise when required and missing."""
    from moderator import metrics  # noqa: PLC0415

    ok = native_crc32c()
    metrics.KAFKA_NATIVE_CRC32C.set(1 if ok else 0)
    if not ok and required:
        raise MissingDependency(
            "kafka-python would checksum every record in pure Python (the `crc32c` package is missing), "
            "which halves the worker's throughput: `pip install crc32c` (a dependency of moderator), or set "
            "MODERATOR_KAFKA_REQUIRE_NATIVE_CRC32C=false to run slowly anyway")
    return ok
