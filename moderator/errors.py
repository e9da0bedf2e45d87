"""One exception hierarchy for the whole service.

Every failure that can happen to an input carries a stable ``reason`` code; the
streaming worker turns that code into the dead-letter reason, ``moderator
classify`` prints it next to the file name.
"""

from __future__ import annotations


# Exit statuses of every ``moderator`` command (README: "Exit codes").
EXIT_OK = 0
EXIT_INPUTS_FAILED = 1  # the command ran, and some of its inputs (images, lines, events) failed
EXIT_USAGE = 2  # bad flags, settings, policy, model, labels, credentials: fix the invocation
EXIT_RUNTIME = 3  # a service stayed unreachable, the worker stopped on a fatal error, or a bug
EXIT_INTERRUPTED = 130
# reasons of errors that a retry (later, elsewhere) may fix, unlike the invocation's own mistakes
RUNTIME_REASONS = frozenset({"kafka_unreachable", "service_unreachable", "internal_error", "delivery_failed",
                             "devservice_start_failed"})


def exit_status(err: BaseException) -> int:
    """The exit status for an error that ended a command."""
    if isinstance(err, ModeratorError) and err.reason not in RUNTIME_REASONS:
        return EXIT_USAGE
    return EXIT_RUNTIME


class ModeratorError(Exception):
    """Base class of every error raised on purpose by moderator."""

    reason: str = "internal_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


# --- model artifacts -------------------------------------------------------


class ModelError(ModeratorError):
    """A model directory is missing, incomplete, tampered with or unusable."""

    reason = "model_error"


class ManifestError(ModelError):
    reason = "manifest_invalid"


class ChecksumMismatch(ModelError):
    reason = "model_checksum_mismatch"


class WeightsUnavailable(ModelError):
    """Pretrained weights could not be obtained (no network, unknown tag...)."""

    reason = "weights_unavailable"


class MissingDependency(ModeratorError):
    """An optional dependency (an extra: ``train``, ``pdq``, ``dev``, ...) is needed for this command."""

    reason = "missing_dependency"


# --- inputs ------------------------------------------------------------------


class InputError(ModeratorError):
    """Something wrong with one input; never fatal for the process."""

    reason = "bad_input"


class ImageDecodeError(InputError):
    reason = "image_decode_failed"


class EmptyImage(ImageDecodeError):
    reason = "empty_image"


class PayloadTooLarge(InputError):
    reason = "payload_too_large"


class NotAnImage(ImageDecodeError):
    reason = "not_an_image"


class UnsupportedFormat(ImageDecodeError):
    reason = "unsupported_format"


class DecompressionBomb(ImageDecodeError):
    reason = "decompression_bomb"


class TruncatedImage(ImageDecodeError):
    reason = "truncated_image"


# --- policies ------------------------------------------------------------------


class PolicyError(ModeratorError):
    """A policy file is missing or invalid; names the file, the field and the problem."""

    reason = "policy_invalid"


class BankError(PolicyError):
    """An image bank file is missing, corrupt, or built for another model."""

    reason = "bank_invalid"


class LabelsError(ModeratorError):
    """A labelled-data file for ``moderator calibrate`` is unusable (names the file and line)."""

    reason = "labels_invalid"


# --- events on the wire (ingest) ------------------------------------------------


class InvalidEvent(InputError):
    """The record is not a valid input event (schema violation)."""

    reason = "invalid_event"


class MalformedJSON(InvalidEvent):
    reason = "malformed_json"


class MissingEventId(InvalidEvent):
    reason = "missing_id"


class InvalidImageSource(InvalidEvent):
    """``image`` must hold exactly one of ``url`` and ``data``."""

    reason = "invalid_image_source"


class InvalidBase64(InvalidEvent):
    reason = "invalid_base64"


class UnsupportedEnvelope(InvalidEvent):
    """A CloudEvents envelope this worker cannot read (spec version, content type)."""

    reason = "unsupported_envelope"


# --- URL fetching -------------------------------------------------------------------


class FetchError(InputError):
    """An image URL could not be fetched (network, HTTP status, ...)."""

    reason = "fetch_failed"


class InvalidUrl(FetchError):
    reason = "url_invalid"


class UrlSchemeNotAllowed(FetchError):
    reason = "url_scheme_not_allowed"


class UrlAddressBlocked(FetchError):
    """The URL's host is, or resolves to, a non-public address (SSRF defence)."""

    reason = "url_address_blocked"


class UrlUnresolvable(FetchError):
    reason = "url_unresolvable"


class FetchTimeout(FetchError):
    reason = "fetch_timeout"


class FetchHttpStatus(FetchError):
    reason = "fetch_http_status"


class TooManyRedirects(FetchError):
    reason = "too_many_redirects"


# --- delivery (not input errors: the worker stops rather than lose data) ----------


class DeliveryError(ModeratorError):
    """A record could not be acknowledged by the broker within the delivery timeout."""

    reason = "delivery_failed"


# --- connecting to the services (at start: the worker exits with a clear message) --------------


class ServiceAccessError(ModeratorError):
    """Kafka or Redis could not be reached or would not let us in, with the settings given.

    ``reason`` says which: ``kafka_auth_failed``, ``kafka_tls_untrusted``, ``kafka_tls_failed``,
    ``kafka_tls_required``, ``kafka_unreachable``, ``redis_auth_failed``, ``redis_tls_untrusted``,
    ``redis_tls_failed`` (an unreachable Redis is not an error: the caches serve without it).
    """

    reason = "service_unreachable"


# OpenSSL reasons that retrying will not change: a certificate refused on either side, TLS spoken
# to a plaintext port, unreadable key material. EOF and syscall errors (a server restarting
# mid-handshake) are not here: those are outages, retried.
_PERMANENT_TLS_REASONS = frozenset({
    "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_ACCESS_DENIED", "TLSV1_ALERT_PROTOCOL_VERSION",
    "SSLV3_ALERT_HANDSHAKE_FAILURE", "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE",
    "PEM_LIB", "KEY_VALUES_MISMATCH", "NO_START_LINE", "CA_MD_TOO_WEAK", "EE_KEY_TOO_SMALL",
})


def exception_chain(err: BaseException | None):
    """``err``, then what it was raised from or during, and so on (each once)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def tls_failure(err: BaseException, cafile_setting: str, cafile: object) -> tuple[str, str] | None:
    """``(kind, explanation)`` when ``err`` (or an exception it wraps) is a TLS failure that retrying
    will not fix: kind ``untrusted`` (we refuse the server's certificate) or ``failed`` (it refuses
    ours, or the handshake cannot work); None for anything else, outages included."""
    import ssl  # noqa: PLC0415

    for e in exception_chain(err):
        if isinstance(e, ssl.SSLCertVerificationError):
            code, message = e.verify_code, e.verify_message or str(e)
            if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
                return "untrusted", (f"the server's certificate does not name the host we connect to ({message}); "
                                     "connect by a name or address in its subject alternative names")
            if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
                return "untrusted", f"the server's certificate has expired ({message})"
            return "untrusted", (f"the server's certificate is not trusted by {cafile or 'the system CA bundle'} "
                                 f"({message}); set {cafile_setting} to the CA that signed it")
        if isinstance(e, ssl.SSLError) and getattr(e, "reason", None) in _PERMANENT_TLS_REASONS:
            return "failed", f"{e.reason}: {e}"
    return None
