"""kafka-python must checksum records with the C crc32c package, and the worker must notice when not."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from moderator.ingest.crc import check_native_crc32c, native_crc32c


def test_installed_kafka_python_uses_the_c_crc32c():
    from kafka.record import _crc32c, util

    assert native_crc32c(), "kafka-python would use its pure-Python CRC-32C: is `crc32c` installed?"
    assert util.calc_crc32c.__defaults__[0] is not _crc32c.crc
    # the C function computes the same CRC-32C as kafka's reference implementation (RFC 3720 vector)
    data = b"123456789"
    assert util.calc_crc32c(memoryview(data)) == _crc32c.crc(data) == 0xE3069283
    assert check_native_crc32c(required=True) is True


def test_pure_python_fallback_is_detected_and_refused():
    # A fresh interpreter where `import crc32c` fails, as on an install without the package.
    code = textwrap.dedent("""
        import sys
        sys.modules["crc32c"] = None  # makes `import crc32c` raise ImportError
        from moderator import metrics
        from moderator.errors import MissingDependency
        from moderator.ingest.crc import check_native_crc32c, native_crc32c
        assert native_crc32c() is False
        assert check_native_crc32c(required=False) is False
        assert metrics.KAFKA_NATIVE_CRC32C._value.get() == 0
        try:
            check_native_crc32c(required=True)
        except MissingDependency as e:
            assert "pip install crc32c" in str(e), e
            print("refused")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


@pytest.mark.parametrize("required", [True, False])
def test_worker_settings_carry_the_switch(required, monkeypatch):
    from moderator.config import WorkerSettings

    monkeypatch.setenv("MODERATOR_KAFKA_REQUIRE_NATIVE_CRC32C", str(required).lower())
    assert WorkerSettings().kafka_require_native_crc32c is required
