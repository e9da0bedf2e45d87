"""Record -> ``ParsedEvent``, or a named failure.

Shapes accepted (see ``moderator.schemas``):

- a JSON ``InputEvent``;
- a CloudEvents 1.0 event in the Kafka protocol binding, read with the official SDK
  (``cloudevents.core.bindings.kafka``, ``cloudevents.core.v1.event.CloudEvent``):

  - *structured mode*: header ``content-type: application/cloudevents+json``, or a JSON
    value with ``specversion``. ``data`` is an ``InputEvent`` object (its ``id`` and
    ``created_at`` default to the envelope's ``id`` and ``time``), or ``data_base64`` holds
    the image bytes (``datacontenttype: image/*``) or an ``InputEvent`` as JSON;
  - *binary mode*: header ``ce_specversion``; the attributes are ``ce_*`` headers and the
    ``content-type`` header is ``datacontenttype``. The value is an ``InputEvent`` as JSON
    (``application/json``: ``id`` and ``created_at`` default to ``ce_id`` and ``ce_time``)
    or the image bytes (``image/*``: the event id is ``ce_id``);

- a raw image: header ``content-type: image/*`` without ``ce_specversion``, the event id
  is the record key (or a ``ce_id`` header).

Checks that have a reason code of their own (missing id, both/neither image
source, bad base64, size caps, a CloudEvent without its required attributes) run
before the schema so each failure names itself; anything else the schema refuses
is ``invalid_event``.

Structured mode is parsed with one ``json.loads`` of our own (it is also what tells a
structured CloudEvent from a plain event without the header) and the attributes are
then validated by the SDK's ``CloudEvent`` class; the SDK's ``JSONFormat.read`` would
parse the value a second time and decodes ``data_base64`` without validating it
(garbage decodes to garbage bytes) or capping it. Binary mode goes through the SDK's
``from_binary`` with a data format that refuses bad JSON instead of passing it on as text.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Sequence

import pybase64
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkCloudEvent
from dateutil.parser import isoparse  # the SDK's own RFC 3339 parser (its time attributes)
from pydantic import ValidationError

from moderator.errors import (
    InputError,
    InvalidBase64,
    InvalidEvent,
    InvalidImageSource,
    MalformedJSON,
    MissingEventId,
    PayloadTooLarge,
    UnsupportedEnvelope,
)
from moderator.schemas import InputEvent

Envelope = Literal["json", "cloudevents", "raw"]
CLOUDEVENTS_MEDIA = "application/cloudevents"
CLOUDEVENTS_JSON = "application/cloudevents+json"
CE_PREFIX = "ce_"
_JSON_TYPE = JSONFormat.JSON_CONTENT_TYPE_PATTERN  # application/json, text/json, application/x+json; params


class InvalidCloudEvent(InvalidEvent):
    """A CloudEvent without its required attributes (source, type), or with one the CloudEvents
    1.0 specification refuses (a time that is not RFC 3339, an extension name that is not
    lowercase alphanumeric, a header that is not UTF-8, data and data_base64 together)."""

    reason = "invalid_cloudevent"


@dataclass(frozen=True)
class EventLimits:
    max_event_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class ParsedEvent:
    id: str
    envelope: Envelope
    data: bytes | None  # inline image bytes
    url: str | None
    content_type: str | None
    metadata: dict | None
    created_at: float | None  # unix seconds


def _fail(err: InputError, event_id: str | None) -> InputError:
    """Attach the event id (when it could be read) so the dead letter carries it."""
    err.event_id = event_id  # type: ignore[attr-defined]
    return err


def header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    for k, v in headers or ():
        if k.lower() == name:
            try:
                return (v or b"").decode("utf-8").strip()
            except UnicodeDecodeError:
                return None
    return None


def _epoch(dt: datetime | None) -> float | None:
    if dt is None:
        return None
    if dt.tzinfo is None:  # naive timestamps are read as UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "event"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (+{err.error_count() - 3} more)" if err.error_count() > 3 else ""
    return "; ".join(parts) + more


def _is_json_type(content_type: str | None) -> bool:
    """CloudEvents: no datacontenttype means application/json."""
    return content_type is None or _JSON_TYPE.match(content_type.strip().lower()) is not None


def _is_image_type(content_type: str | None) -> bool:
    return content_type is not None and content_type.strip().lower().startswith("image/")


# a \uD800-\uDFFF escape: json.loads turns an unpaired one into a lone surrogate, which no UTF-8
# writer accepts (the decision or dead letter could then never be published)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _loads(raw: bytes):
    """``json.loads``, refusing unpaired surrogates (checked only when the text has such an escape)."""
    obj = json.loads(raw)
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the JSON holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    return obj


def parse_record(value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes]] | None,
                 limits: EventLimits = EventLimits()) -> ParsedEvent:
    """Parse one Kafka record. Raises an ``InputError`` with ``.event_id`` (or None)."""
    if value is None or len(value) == 0:
        raise _fail(InvalidEvent("record has no value", reason="empty_event"), _key_id(key))
    if len(value) > limits.max_event_bytes:
        raise _fail(PayloadTooLarge(f"record value is {len(value)} bytes, over the "
                                    f"{limits.max_event_bytes} byte cap"), _key_id(key))
    ctype = (header(headers, "content-type") or "").lower()
    structured = ctype.startswith(CLOUDEVENTS_MEDIA)
    if not structured and any(k.lower() == "ce_specversion" for k, _ in headers or ()):
        return _parse_binary(value, headers, limits)  # Kafka binding: binary mode
    if ctype.startswith("image/"):
        return _parse_raw(value, key or (header(headers, "ce_id") or "").encode(), ctype, limits)
    if structured and not ctype.startswith(CLOUDEVENTS_JSON):
        raise _fail(UnsupportedEnvelope(f"CloudEvents content type {ctype!r} is not supported (only "
                                        f"{CLOUDEVENTS_JSON}, one event per record)"), _key_id(key))
    try:
        obj = _loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(MalformedJSON(f"value is not JSON: {e}"), _key_id(key)) from None
    if not isinstance(obj, dict):
        raise _fail(InvalidEvent(f"event must be a JSON object, got {type(obj).__name__}"), _key_id(key))
    if "specversion" in obj or structured:
        return _parse_structured(obj, limits)
    return _parse_event(obj, "json", limits)


def _key_id(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def _parse_raw(value: bytes, key: bytes | None, ctype: str, limits: EventLimits) -> ParsedEvent:
    event_id = _key_id(key)
    if not event_id:
        raise _fail(MissingEventId("a raw image record needs its event id as the (UTF-8) record key "
                                   "or a ce_id header"), None)
    return _image_event(event_id, "raw", value, ctype, None, limits)


def _image_event(event_id: str, envelope: Envelope, data: bytes, ctype: str, created_at: float | None,
                 limits: EventLimits) -> ParsedEvent:
    if len(data) > limits.max_image_bytes:
        raise _fail(PayloadTooLarge(f"image is {len(data)} bytes, over the {limits.max_image_bytes} "
                                    "byte cap"), event_id)
    return ParsedEvent(event_id, envelope, data, None, ctype, None, created_at)


# --- CloudEvents ----------------------------------------------------------------------------------


class _DataError(Exception):
    """Carries a named ``InputError`` out of the SDK's ``from_binary``."""

    def __init__(self, err: InputError) -> None:
        super().__init__(str(err))
        self.err = err


class _StrictData(JSONFormat):
    """The SDK's JSON event format, reading binary-mode data strictly: JSON data must parse (the
    SDK's own falls back to the text, which would surface as a vaguer error later), anything
    else stays bytes (an image)."""

    def read_data(self, body: bytes, datacontenttype: str | None) -> Any:
        if not body:
            return None
        if _is_json_type(datacontenttype):
            try:
                return _loads(body)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise _DataError(MalformedJSON(f"CloudEvent data is not JSON: {e}")) from None
        return bytes(body)


_BINARY_FORMAT = _StrictData()


def _ce_time(value: object) -> datetime:
    """A CloudEvents ``time``: ``datetime.fromisoformat`` (C, under a microsecond; RFC 3339 with ``Z`` on
    Python 3.11+), else the SDK's own parser (dateutil ``isoparse``: 15 us, and its tzinfo makes
    ``timestamp()`` cost 10 us more). Naive times are read as UTC, as before the SDK was used."""
    if not isinstance(value, str):
        raise TypeError(f"time must be a string, got {type(value).__name__}")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        t = isoparse(value)
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _parse_binary(value: bytes, headers: Sequence[tuple[str, bytes]], limits: EventLimits) -> ParsedEvent:
    """Binary mode: attributes in ``ce_*`` headers, ``content-type`` is ``datacontenttype``."""
    attrs: dict[str, bytes] = {}
    for k, v in headers:
        name = k.lower()
        if (name.startswith(CE_PREFIX) or name == "content-type") and name not in attrs:  # first one wins
            attrs[name] = v or b""
    try:
        ce_id = attrs.get("ce_id", b"").decode("utf-8") or None
    except UnicodeDecodeError:
        ce_id = None
    if ce_id is None:  # the SDK would make one up (a random UUID)
        raise _fail(MissingEventId("binary-mode CloudEvent without a (UTF-8) ce_id header"), None)
    if attrs["ce_specversion"] != b"1.0":
        raise _fail(UnsupportedEnvelope(f"CloudEvents specversion {attrs['ce_specversion'][:20]!r} is not "
                                        "supported (only 1.0)"), ce_id)
    missing = [h for h in ("ce_source", "ce_type") if not attrs.get(h)]
    if missing:
        raise _fail(InvalidCloudEvent(f"binary-mode CloudEvent without its required {', '.join(missing)} "
                                      "header(s)"), ce_id)
    created = None
    if "ce_time" in attrs:  # parsed here (see _ce_time); the SDK stamps now() on an event without one
        try:
            created = _ce_time(attrs.pop("ce_time").decode("utf-8")).timestamp()
        except (ValueError, TypeError, OverflowError) as e:
            raise _fail(InvalidCloudEvent(f"binary-mode CloudEvent: ce_time is not an RFC 3339 timestamp "
                                          f"({e})"), ce_id) from None
    try:
        event = ce_kafka.from_binary(ce_kafka.KafkaMessage(headers=attrs, key=None, value=value),
                                     _BINARY_FORMAT, SdkCloudEvent)  # key=None: not a partitionkey attribute
    except _DataError as e:
        raise _fail(e.err, ce_id) from None
    except BaseCloudEventException as e:
        raise _fail(InvalidCloudEvent(f"binary-mode CloudEvent: {e}"), ce_id) from None
    except (ValueError, TypeError, OverflowError) as e:  # a header that is not UTF-8, a time that is not RFC 3339
        raise _fail(InvalidCloudEvent(f"binary-mode CloudEvent header: {type(e).__name__}: {e}"), ce_id) from None
    return _ce_data(event, event.get_data(), created, limits)


def _parse_structured(obj: dict, limits: EventLimits) -> ParsedEvent:
    """Structured mode (``application/cloudevents+json``), from the already parsed value."""
    raw_id = obj.get("id")
    ce_id = raw_id if isinstance(raw_id, str) and raw_id else None
    if obj.get("specversion") != "1.0":
        raise _fail(UnsupportedEnvelope(f"CloudEvents specversion {str(obj.get('specversion'))[:20]!r} is not "
                                        "supported (only 1.0)"), ce_id)
    if ce_id is None:
        raise _fail(MissingEventId("CloudEvents envelope: id must be a non-empty string"), None)
    missing = [a for a in ("source", "type") if a not in obj]
    if missing:
        raise _fail(InvalidCloudEvent(f"CloudEvents envelope without its required {', '.join(missing)} "
                                      "attribute(s)"), ce_id)
    if "data" in obj and "data_base64" in obj:
        raise _fail(InvalidCloudEvent("CloudEvents envelope with both data and data_base64"), ce_id)
    attrs = {k: v for k, v in obj.items() if k != "data" and k != "data_base64"}
    created = None
    if "time" in attrs:
        try:
            attrs["time"] = _ce_time(attrs["time"])
        except (ValueError, TypeError, OverflowError) as e:
            raise _fail(InvalidCloudEvent(f"CloudEvents time {str(attrs['time'])[:40]!r} is not an RFC 3339 "
                                          f"timestamp ({e})"), ce_id) from None
        created = attrs["time"].timestamp()
    dct = attrs.get("datacontenttype")
    if "data_base64" in obj:
        data = _data_base64(obj["data_base64"], dct, ce_id, limits)
    else:
        data = obj.get("data")
        if isinstance(dct, str) and not _is_json_type(dct):
            raise _fail(UnsupportedEnvelope(f"CloudEvents datacontenttype {dct[:60]!r}: data must be JSON "
                                            "(or the image bytes in data_base64)"), ce_id)
    try:
        event = SdkCloudEvent(attrs, data)  # the SDK validates every attribute (types, names, values)
    except BaseCloudEventException as e:
        raise _fail(InvalidCloudEvent(f"CloudEvents envelope: {e}"), ce_id) from None
    return _ce_data(event, data, created, limits)


def _data_base64(encoded: object, dct: object, ce_id: str, limits: EventLimits) -> bytes:
    if not isinstance(encoded, str):
        raise _fail(InvalidCloudEvent("CloudEvents data_base64 must be a base64 string"), ce_id)
    if _is_image_type(dct if isinstance(dct, str) else None) and len(encoded) * 3 // 4 > limits.max_image_bytes + 2:
        raise _fail(PayloadTooLarge(f"data_base64 image is about {len(encoded) * 3 // 4} bytes, over the "
                                    f"{limits.max_image_bytes} byte cap"), ce_id)
    try:
        return pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _fail(InvalidBase64(f"CloudEvents data_base64 is not valid base64: {e}"), ce_id) from None


def _ce_data(event: SdkCloudEvent, data: Any, created: float | None, limits: EventLimits) -> ParsedEvent:
    """A validated CloudEvent's data: the image bytes, or an input event (bytes of JSON too)."""
    ce_id = event.get_id()
    dct = event.get_datacontenttype()
    if isinstance(data, (bytes, bytearray)):  # binary-mode value, or data_base64
        if _is_image_type(dct):
            return _image_event(ce_id, "cloudevents", bytes(data), dct.strip().lower(), created, limits)
        if not _is_json_type(dct):
            raise _fail(UnsupportedEnvelope(f"CloudEvents datacontenttype {str(dct)[:60]!r}: the data must be "
                                            "an input event (JSON) or an image (image/*)"), ce_id)
        try:
            data = _loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _fail(MalformedJSON(f"CloudEvent data is not JSON: {e}"), ce_id) from None
    if not isinstance(data, dict):
        raise _fail(InvalidEvent("CloudEvents data must be a JSON object (an input event)"), ce_id)
    merged = dict(data)
    merged.setdefault("id", ce_id)
    return _parse_event(merged, "cloudevents", limits, default_created=created, fallback_id=ce_id)


def _parse_event(obj: dict, envelope: Envelope, limits: EventLimits,
                 default_created: float | None = None, fallback_id: str | None = None) -> ParsedEvent:
    """``fallback_id``: the CloudEvent's own id, named in the dead letter when ``data.id`` is unusable."""
    raw_id = obj.get("id")
    if raw_id is None or raw_id == "":
        raise _fail(MissingEventId("event has no id"), fallback_id)
    if not isinstance(raw_id, str):
        raise _fail(InvalidEvent(f"id must be a string, got {type(raw_id).__name__}"), fallback_id)
    image = obj.get("image")
    if not isinstance(image, dict):
        raise _fail(InvalidImageSource("image must be an object with exactly one of 'url' and 'data'"),
                    raw_id)
    has_url, has_data = image.get("url") is not None, image.get("data") is not None
    if has_url == has_data:
        what = "both" if has_url else "neither of"
        raise _fail(InvalidImageSource(f"image has {what} 'url' and 'data'; exactly one is required"), raw_id)
    data = image.get("data")
    if isinstance(data, str) and len(data) * 3 // 4 > limits.max_image_bytes + 2:
        raise _fail(PayloadTooLarge(f"inline image is about {len(data) * 3 // 4} bytes, over the "
                                    f"{limits.max_image_bytes} byte cap"), raw_id)
    try:
        event = InputEvent.model_validate(obj)
    except ValidationError as e:
        raise _fail(InvalidEvent(_short(e)), raw_id) from None
    payload = None
    if event.image.data is not None:
        try:
            # pybase64: SIMD and outside the GIL, 36x the stdlib on a 230 kB photo (which held the GIL 0.36 ms)
            payload = pybase64.b64decode(event.image.data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _fail(InvalidBase64(f"image.data is not valid base64: {e}"), event.id) from None
        if len(payload) > limits.max_image_bytes:
            raise _fail(PayloadTooLarge(f"inline image is {len(payload)} bytes, over the "
                                        f"{limits.max_image_bytes} byte cap"), event.id)
    created = _epoch(event.created_at) if "created_at" in obj else default_created
    return ParsedEvent(event.id, envelope, payload, event.image.url, event.content_type,
                       event.metadata, created)
