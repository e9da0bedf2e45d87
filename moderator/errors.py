"""One exception hierarchy for the whole service.

Every failure that can happen to an input carries a stable ``reason`` code; the
streaming worker turns that code into the dead-letter reason, ``moderator
classify`` prints it next to the file name.
"""

from __future__ import annotations


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
    """An optional dependency (the ``train`` extra) is needed for this command."""

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
    ``kafka_tls_required``, ``kafka_unreachable``, ``redis_auth_failed``, ``redis_tls_failed``,
    ``redis_unreachable``.
    """

    reason = "service_unreachable"
