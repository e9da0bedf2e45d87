"""Property-based fuzzing (hypothesis) of the two parsers that read hostile bytes: the Kafka
record parser and the image decoder (+ the JPEG header probe of the device path).

Each generated input must end as a parsed event / decoded image, or as a named
``InputError`` (the dead-letter reason), never as another exception. Profiles:

- ``ci`` (default): derandomized, 14,000 cases over the tests below, well under a minute;
- ``nightly``: random seeds, 20x the cases (``HYPOTHESIS_PROFILE=nightly pytest tests/test_fuzz.py``).

Inputs it found that once escaped as another exception are pinned with ``@example``.
"""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from moderator.decode import DecodeLimits, JpegProbe, decode_image, probe_jpeg
from moderator.encode.preprocess import ImagePreprocessor
from moderator.errors import InputError
from moderator.ingest.events import EventLimits, ParsedEvent, parse_record
from moderator.schemas import Preprocess
from moderator.worker.bench import gradient_photo

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nightly", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
SCALE = 20 if PROFILE == "nightly" else 1
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


def cases(n: int):
    return settings(max_examples=n * SCALE)


# every dead-letter reason an input can earn here (moderator.errors)
PARSE_REASONS = {"empty_event", "payload_too_large", "malformed_json", "invalid_event", "missing_id",
                 "invalid_image_source", "invalid_base64", "unsupported_envelope", "invalid_cloudevent"}
DECODE_REASONS = {"empty_image", "payload_too_large", "not_an_image", "unsupported_format",
                  "decompression_bomb", "truncated_image", "image_decode_failed"}
SMALL_EVENTS = EventLimits(max_event_bytes=64 * 1024, max_image_bytes=16 * 1024)


def _parse(value, key, headers, limits=SMALL_EVENTS):
    try:
        ev = parse_record(value, key, headers, limits)
    except InputError as e:
        assert e.reason in PARSE_REASONS, (e.reason, e)
        eid = getattr(e, "event_id", None)
        assert eid is None or isinstance(eid, str)
        return e
    assert isinstance(ev, ParsedEvent)
    assert isinstance(ev.id, str) and ev.id
    assert (ev.data is None) != (ev.url is None)  # exactly one image source
    if ev.data is not None:
        assert len(ev.data) <= limits.max_image_bytes
    assert ev.metadata is None or isinstance(ev.metadata, dict)
    assert ev.created_at is None or isinstance(ev.created_at, float)
    return ev


# --- the record parser --------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30)
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)
b64 = st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode())
tiny_png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
maybe = lambda s: st.one_of(st.just(None), s, json_value)  # noqa: E731
image_src = st.fixed_dictionaries({}, optional={
    "data": st.one_of(b64, st.just(tiny_png), st.text(max_size=40), st.just(tiny_png + "="), json_value),
    "url": st.one_of(st.just("https://example.com/a.png"), st.text(max_size=40), json_value),
}) | json_value
event = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.text(max_size=40), st.just(""), json_value),
    "image": image_src,
    "content_type": maybe(st.sampled_from(["image/png", "image/jpeg", "text/plain", ""])),
    "metadata": maybe(st.dictionaries(st.text(max_size=10), json_value, max_size=4)),
    "created_at": maybe(st.sampled_from(["2026-11-27T10:00:00Z", "2026-11-27T10:00:00", "yesterday",
                                         "2026-02-30T00:00:00Z", "1e400"])),
    "extra": json_value,
})
cloudevent = st.fixed_dictionaries({}, optional={
    "specversion": maybe(st.sampled_from(["1.0", "0.3", ""])),
    "id": maybe(st.text(max_size=20)),
    "source": maybe(st.text(max_size=20)),
    "type": maybe(st.text(max_size=20)),
    "datacontenttype": maybe(st.sampled_from(["application/json", "image/png", ""])),
    "time": maybe(st.sampled_from(["2026-11-27T10:00:00Z", "nope"])),
    "data": st.one_of(event, json_value),
    "data_base64": maybe(b64),
})
header_names = st.sampled_from(["content-type", "Content-Type", "ce_id", "ce_specversion", "ce_source", "ce_type",
                                "ce_time", "ce_subject", "ce_traceparent", "ce_Bad-Ext", "CE_TYPE", "x-other", ""])
header_values = st.one_of(st.sampled_from([b"image/png", b"image/jpeg", b"application/cloudevents+json",
                                           b"application/json", b"IMAGE/PNG", b"1.0", b"0.3", b"text/plain",
                                           b"2026-11-27T10:00:00Z", b"2026-11-27T10:00:00", b""]),
                          st.binary(max_size=20))
headers = st.lists(st.tuples(header_names, header_values), max_size=4)
# binary-mode CloudEvents (Kafka protocol binding): each required header present, absent or mangled
ce_header = lambda name, good: st.one_of(st.just([(name, good)]), st.just([]),  # noqa: E731
                                         st.lists(st.tuples(st.just(name), header_values), max_size=2))
binary_headers = st.tuples(
    ce_header("ce_specversion", b"1.0"), ce_header("ce_id", b"ce-1"), ce_header("ce_source", b"urn:x"),
    ce_header("ce_type", b"com.example.t"), ce_header("ce_time", b"2026-11-27T10:00:00+01:00"),
    ce_header("content-type", b"application/json"), headers,
).map(lambda parts: [h for part in parts for h in part])
keys = st.one_of(st.none(), st.binary(max_size=20), st.text(max_size=20).map(str.encode))


def _dumps(obj, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@cases(4000)
@given(obj=st.one_of(event, cloudevent, json_value), ascii_only=st.booleans(), key=keys, hdrs=headers)
@example(obj={"id": "x", "image": {"data": tiny_png + "=="}}, ascii_only=True, key=None, hdrs=[])
@example(obj={"id": "\ud800", "image": {"data": tiny_png}}, ascii_only=False, key=None, hdrs=[])
@example(obj={"specversion": "1.0", "id": "c", "data": {"id": "c", "image": {"url": "https://e/x"}}},
         ascii_only=True, key=None, hdrs=[("content-type", b"application/cloudevents+json")])
def test_json_and_cloudevents_records(obj, ascii_only, key, hdrs):
    _parse(_dumps(obj, ascii_only), key, hdrs)


@cases(2500)
@given(value=st.one_of(st.none(), st.binary(max_size=300)), key=keys, hdrs=headers)
@example(value=b"\xff\xfe{}", key=None, hdrs=[])
@example(value=b"[1e999999]", key=None, hdrs=[])
@example(value=b"9" * 5000, key=None, hdrs=[])
def test_raw_bytes_records(value, key, hdrs):
    _parse(value, key, hdrs)


@cases(2500)
@given(value=st.one_of(st.builds(lambda o, a: _dumps(o, a), st.one_of(event, cloudevent, json_value), st.booleans()),
                       st.binary(max_size=300), st.just(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)),
       key=keys, hdrs=binary_headers)
@example(value=b'{"image": {"data": "AAAA"}}', key=None,
         hdrs=[("ce_specversion", b"1.0"), ("ce_id", b"x"), ("ce_source", b"s"), ("ce_type", b"t")])
@example(value=b"\x89PNG", key=b"\xff", hdrs=[("ce_specversion", b"1.0"), ("ce_id", b"x"), ("ce_source", b"s"),
                                              ("ce_type", b"t"), ("content-type", b"image/png")])
def test_binary_mode_cloudevent_records(value, key, hdrs):
    """Binary mode: ce_* headers present, missing, duplicated or garbage, any value."""
    _parse(value, key, hdrs)


@cases(1500)
@given(data=st.data())
def test_mutated_valid_records(data):
    """A valid event's bytes with a few flips, cuts and insertions."""
    ev = {"id": data.draw(st.text(min_size=1, max_size=12)), "image": {"data": tiny_png},
          "metadata": {"user": "u1"}, "created_at": "2026-11-27T10:00:00Z"}
    value = bytearray(_dumps(ev, True))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(value) - 1)))
        if op == "flip" and value:
            value[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del value[i:i + data.draw(st.integers(1, 8))]
        else:
            value[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    _parse(bytes(value), data.draw(keys), data.draw(headers))


def test_size_caps_hold_whatever_the_envelope():
    big = b"x" * (SMALL_EVENTS.max_event_bytes + 1)
    assert _parse(big, b"k", [("content-type", b"image/png")]).reason == "payload_too_large"
    img = b"\x89PNG" + b"\0" * SMALL_EVENTS.max_image_bytes
    assert _parse(img, b"k", [("content-type", b"image/png")]).reason == "payload_too_large"
    inline = _dumps({"id": "a", "image": {"data": base64.b64encode(img).decode()}}, True)
    assert _parse(inline, None, [], EventLimits(max_image_bytes=len(img) - 1)).reason == "payload_too_large"
    ce = [("ce_specversion", b"1.0"), ("ce_id", b"c"), ("ce_source", b"s"), ("ce_type", b"t")]
    assert _parse(img, None, [*ce, ("content-type", b"image/png")]).reason == "payload_too_large"
    assert _parse(big, None, [*ce, ("content-type", b"image/png")]).reason == "payload_too_large"
    body = _dumps({"image": {"data": base64.b64encode(img).decode()}}, True)
    assert _parse(body, None, ce, EventLimits(max_image_bytes=len(img) - 1)).reason == "payload_too_large"
    structured = _dumps({"specversion": "1.0", "id": "c", "source": "s", "type": "t", "datacontenttype": "image/png",
                         "data_base64": base64.b64encode(img).decode()}, True)
    assert _parse(structured, None, []).reason == "payload_too_large"
    assert _parse(structured, None, [], EventLimits(max_image_bytes=len(img) - 1)).reason == "payload_too_large"


# --- the decoder ----------------------------------------------------------------------------------

def _encode(fmt: str, **kw) -> bytes:
    img = gradient_photo(40, 30, 1)
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


SEEDS = {
    "png": _encode("PNG"), "jpeg": _encode("JPEG", quality=80), "progressive": _encode("JPEG", progressive=True),
    "gif": _encode("GIF"), "webp": _encode("WEBP", quality=80), "tiff": _encode("TIFF"),
    "tiff-lzw": _encode("TIFF", compression="tiff_lzw"), "bmp": _encode("BMP"),
}
LIMITS = DecodeLimits(max_bytes=64 * 1024, max_pixels=2_000_000)
PRE = ImagePreprocessor(Preprocess(image_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))


def _decode(data: bytes):
    """decode_image then the preprocessing the worker applies; and probe_jpeg, which must
    fail the same way or hand the file to the device path."""
    try:
        decoded = decode_image(data, LIMITS)
    except InputError as e:
        assert e.reason in DECODE_REASONS, (e.reason, e)
        cpu = e
    else:
        w, h = decoded.image.size
        assert decoded.image.mode == "RGB" and w * h <= LIMITS.max_pixels and w > 0 and h > 0
        assert PRE.to_array(decoded.image).shape == (3, 32, 32)
        cpu = None
    try:
        probe = probe_jpeg(data, LIMITS)
    except InputError as e:  # the header checks are decode_image's own: same named failure
        assert cpu is not None and e.reason == cpu.reason, (e.reason, cpu)
    else:
        assert probe is None or isinstance(probe, JpegProbe)


def test_seed_images_decode():
    for name, seed in SEEDS.items():
        decoded = decode_image(seed, LIMITS)
        assert decoded.image.size == (40, 30), name
        _decode(seed)


@cases(3000)
@given(data=st.data())
def test_mutated_images(data):
    buf = bytearray(SEEDS[data.draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "flip", "cut", "truncate", "insert", "duplicate"]))
        i = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[i:i + data.draw(st.integers(1, 64))]
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=32))
        else:
            j = data.draw(st.integers(0, max(0, len(buf) - 1)))
            buf[i:i] = buf[j:j + data.draw(st.integers(1, 256))]
    _decode(bytes(buf))


@cases(500)
@given(header=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP",
                               b"II*\0", b"MM\0*", b"BM"]), rest=st.binary(max_size=200))
def test_magic_bytes_then_garbage(header, rest):
    _decode(header + rest)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF"])
def test_dimension_fields_claiming_huge_images_are_bombs_or_named(fmt):
    # a small file whose header claims more pixels than the cap: refused before decoding
    img = Image.new("L" if fmt != "GIF" else "P", (4000, 1000))
    buf = io.BytesIO()
    img.save(buf, fmt)
    with pytest.raises(InputError) as e:
        decode_image(buf.getvalue(), DecodeLimits(max_pixels=1_000_000))
    assert e.value.reason == "decompression_bomb"
