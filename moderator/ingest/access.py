"""Can this process reach Kafka, with these settings? A bounded check with a clear answer.

kafka-python retries a failed bootstrap until its timeout and then says only "Unable to
bootstrap"; the cause (a refused SASL login, a certificate the CA file does not trust, a
refused TCP connection) goes to its log. ``check_kafka_access`` listens to that log while
it bootstraps an admin client, and turns a failure into a ``ServiceAccessError`` that names
the cause and the setting to look at. A wrong password or an untrusted certificate fails
after one attempt; a broker that is not up yet is retried until ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Mapping

from moderator.errors import ServiceAccessError, exception_chain, tls_failure

log = logging.getLogger(__name__)

_ATTEMPT_S = 5.0


class _Causes(logging.Handler):
    """Collects the exceptions kafka-python logs while it (fails to) connect."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        self.errors.extend(a for a in args if isinstance(a, BaseException))
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _listening():
    """Collect what kafka-python logs during the check instead of printing it: its tracebacks
    of a refused handshake are the causes this check names in one line."""
    logger = logging.getLogger("kafka")
    handler = _Causes()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)  # the causes are logged at WARNING and ERROR
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def explain(errors: list[BaseException], bootstrap: str, security: Mapping[str, object]) -> ServiceAccessError | None:
    """The first cause among ``errors`` that retrying will not fix, as a ``ServiceAccessError``."""
    from kafka.errors import (  # noqa: PLC0415
        AuthorizationError,
        IllegalSaslStateError,
        InvalidReceiveError,
        SaslAuthenticationFailedError,
        UnsupportedSaslMechanismError,
    )

    for err in errors:
        for e in exception_chain(err):
            if isinstance(e, (UnsupportedSaslMechanismError, IllegalSaslStateError)):
                return ServiceAccessError(
                    f"Kafka at {bootstrap} does not accept the SASL mechanism "
                    f"{security.get('sasl_mechanism')}: check MODERATOR_KAFKA_SASL_MECHANISM (broker: {e})",
                    reason="kafka_auth_failed")
            if isinstance(e, SaslAuthenticationFailedError):
                return ServiceAccessError(
                    f"Kafka at {bootstrap} refused the {security.get('sasl_mechanism')} login of user "
                    f"{security.get('sasl_plain_username')!r}: check MODERATOR_KAFKA_SASL_USERNAME, "
                    f"MODERATOR_KAFKA_SASL_PASSWORD and MODERATOR_KAFKA_SASL_MECHANISM (broker: {e})",
                    reason="kafka_auth_failed")
            if isinstance(e, AuthorizationError):
                return ServiceAccessError(f"Kafka at {bootstrap} denied access: {e}", reason="kafka_auth_failed")
            if isinstance(e, InvalidReceiveError) and _tls_record(e):
                return ServiceAccessError(
                    f"Kafka at {bootstrap} answered a plaintext request with a TLS record: it is a TLS "
                    "listener; set MODERATOR_KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL (and "
                    "MODERATOR_KAFKA_SSL_CAFILE)", reason="kafka_tls_required")
        tls = tls_failure(err, "MODERATOR_KAFKA_SSL_CAFILE", security.get("ssl_cafile"))  # walks the chain too
        if tls is not None and tls[0] == "untrusted":
            return ServiceAccessError(f"TLS to Kafka at {bootstrap}: {tls[1]}", reason="kafka_tls_untrusted")
        if tls is not None:
            hint = (" (the broker may require a client certificate: MODERATOR_KAFKA_SSL_CERTFILE and "
                    "MODERATOR_KAFKA_SSL_KEYFILE)" if not security.get("ssl_certfile") else
                    " (is the client certificate signed by a CA the broker trusts?)")
            return ServiceAccessError(f"TLS to Kafka at {bootstrap} failed: {tls[1]}{hint}",
                                      reason="kafka_tls_failed")
    return None


def _mechanism_refusal(bootstrap: str, security: Mapping[str, object], timeout_s: float) -> ServiceAccessError | None:
    """Ask one bootstrap broker which SASL mechanisms it enables, on a blocking socket.

    kafka-python (3.0.12) drops a response that arrives in the same read as the broker's close
    of the connection, and a broker answers a SaslHandshake for a mechanism it does not enable
    and closes at once: on a busy machine the client then sees only "socket disconnected" on
    every try. A blocking read of the one response does not lose it. Returns the refusal, or
    None when the mechanism is enabled or the question got no answer (the caller goes on).
    """
    from kafka.protocol.parser import KafkaProtocol  # noqa: PLC0415
    from kafka.protocol.sasl import SaslHandshakeRequest  # noqa: PLC0415

    mechanism = str(security.get("sasl_mechanism") or "PLAIN")
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    host = host.strip("[]")
    parser = KafkaProtocol(client_id="moderator-access-check")
    request = SaslHandshakeRequest(mechanism=mechanism, version=1)
    parser.send_request(request)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw:
            sock: socket.socket = raw
            if security.get("security_protocol") == "SASL_SSL":
                context = ssl.create_default_context(cafile=str(security["ssl_cafile"]) if security.get("ssl_cafile")
                                                     else None)
                context.check_hostname = bool(security.get("ssl_check_hostname", True))
                if security.get("ssl_certfile"):
                    context.load_cert_chain(str(security["ssl_certfile"]), str(security.get("ssl_keyfile") or "")
                                            or None)
                sock = context.wrap_socket(raw, server_hostname=host)
            sock.sendall(parser.send_bytes())
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack(">i", data[:4])[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
        responses = parser.receive_bytes(data)
    except Exception as e:  # noqa: BLE001 - a probe: no answer means no verdict
        log.debug("SASL mechanism probe of %s: %s", bootstrap, e)
        return None
    if not responses:
        return None
    enabled = list(getattr(responses[0][1], "mechanisms", None) or [])
    if mechanism in enabled or not enabled:
        return None
    return ServiceAccessError(
        f"Kafka at {bootstrap} does not accept the SASL mechanism {mechanism}: check "
        f"MODERATOR_KAFKA_SASL_MECHANISM (the broker enables {', '.join(enabled)})", reason="kafka_auth_failed")


def _tls_record(e: BaseException) -> bool:
    """kafka-python read a TLS record header (content type 21 or 22, version 3.x) as a frame size."""
    match = re.search(r"frame length: (\d+)", str(e))
    return bool(match) and (int(match.group(1)) >> 16) in (0x1503, 0x1603)


def check_kafka_access(bootstrap_servers: str, security: Mapping[str, object], *, timeout_s: float = 30.0,
                       client_id: str = "moderator-access-check", stop: threading.Event | None = None) -> float:
    """Bootstrap an admin client and ask for the cluster's brokers; returns the seconds it took.
    ``stop`` (set by SIGTERM) ends the waiting between attempts.

    Raises:
        ServiceAccessError: the login or the TLS handshake failed (after one attempt), or no
            broker answered within ``timeout_s``; the message names the cause and the settings.
    """
    from kafka import KafkaAdminClient  # noqa: PLC0415

    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = security.get(key)
        if path and not os.access(str(path), os.R_OK):
            raise ServiceAccessError(f"MODERATOR_KAFKA_{key.upper()}={path}: no such file, or not readable",
                                     reason="kafka_tls_failed")
    started = time.monotonic()
    deadline = started + timeout_s
    last: list[BaseException] = []
    with _listening() as causes:
        while True:
            attempt_ms = int(1000 * max(0.5, min(_ATTEMPT_S, deadline - time.monotonic())))
            admin = None
            try:
                admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id=client_id,
                                         bootstrap_timeout_ms=attempt_ms, request_timeout_ms=attempt_ms,
                                         **dict(security))
                admin.describe_cluster()
                return time.monotonic() - started
            except Exception as e:  # noqa: BLE001 - classified below
                last = [*causes.errors, e]
            finally:
                if admin is not None:
                    with contextlib.suppress(Exception):
                        admin.close()
            known = explain(last, bootstrap_servers, security)
            if (known is None and str(security.get("security_protocol", "")).startswith("SASL")
                    and not (stop is not None and stop.is_set())):
                left = deadline - time.monotonic()
                known = _mechanism_refusal(bootstrap_servers, security, max(0.5, min(_ATTEMPT_S, left)))
            if known is not None:
                raise known
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                break
            causes.errors.clear()
            pause = min(1.0, max(0.0, deadline - time.monotonic()))
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
    detail = "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in last[-4:]))
    raise ServiceAccessError(f"no Kafka broker answered at {bootstrap_servers} within {timeout_s:.0f} s "
                             f"(security protocol {security.get('security_protocol', 'PLAINTEXT')}): {detail}",
                             reason="kafka_unreachable")
