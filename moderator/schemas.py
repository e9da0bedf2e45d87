"""Pydantic models for every artifact and wire format moderator reads or writes.

Kept in one module so validation, documentation and JSON schemas come from one
source. Model-directory manifest first; policy, event and decision schemas join
it as the stages that use them land.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

MANIFEST_FORMAT = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsSource(_Strict):
    """Where the exported weights came from (auditable)."""

    kind: Literal["pretrained", "checkpoint", "random"]
    pretrained_tag: str | None = None
    checkpoint_path: str | None = None
    checkpoint_sha256: str | None = None
    seed: int | None = None


class Preprocess(_Strict):
    """How an image becomes the encoder's input tensor (open_clip's eval transform)."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    # open_clip's "longest" mode and non-square "shortest" targets are not reproduced
    # (yet): export refuses them rather than serve subtly different pixels.
    resize_mode: Literal["shortest", "squash"] = "shortest"
    fill_color: int = 0

    @model_validator(mode="after")
    def _supported(self) -> "Preprocess":
        h, w = self.image_size
        if h <= 0 or w <= 0:
            raise ValueError("image_size must be positive")
        if self.resize_mode == "shortest" and h != w:
            raise ValueError("resize_mode 'shortest' needs a square image_size")
        return self


class TokenizerSpec(_Strict):
    kind: Literal["clip_bpe"] = "clip_bpe"
    file: str = "tokenizer.json"
    context_length: int
    sot_token_id: int
    eot_token_id: int
    pad_token_id: int = 0
    clean: Literal["lower", "whitespace", "canonicalize"] = "lower"


class EncoderFile(_Strict):
    file: str
    input_name: str
    output_name: str
    input_dtype: Literal["float32", "float16", "int64", "int32"]


QuantCalibration = Literal["minmax", "entropy", "percentile"]
QuantActivations = Literal["uint8", "int8"]


class Quantization(_Strict):
    """How an int8 image encoder was made from the fp32 one (``moderator export --quantize int8``).

    The fp32 encoder it came from stays in the directory as ``source_file``;
    ``image_encoder.file`` names the quantized one, which the runtime serves.
    """

    method: Literal["static_qdq_int8"] = Field(
        description="ONNX Runtime static quantization, QDQ format, int8 ranges fixed by calibration")
    source_file: str = Field(description="the fp32 image encoder that was quantized (kept)")
    source_sha256: str
    calibration_images: int = Field(ge=1, description="images the activation ranges were calibrated on")
    calibration_skipped: int = Field(default=0, ge=0,
                                     description="files in the calibration directory that did not decode")
    calibration_sha256: str = Field(description="sha256 over the sorted sha256 digests of the calibration images")
    calibrate_method: QuantCalibration
    per_channel: bool = Field(description="weights quantized per output channel (else per tensor)")
    reduce_range: bool = False
    activation_type: QuantActivations = Field(description="uint8: asymmetric (ORT CPU); int8: symmetric (TensorRT)")
    weight_type: Literal["int8"] = "int8"
    op_types: list[str] = Field(description="operator types whose inputs were quantized; the rest run in float")
    ort_preprocess: Literal["full", "onnx_shapes", "none"] = Field(
        description="onnxruntime's quant_pre_process before quantizing: with symbolic shape inference, "
                    "with ONNX shape inference only (symbolic failed), or none (both failed)")
    calibration_cosine_min: float = Field(
        description="smallest cosine between int8 and fp32 embeddings of (up to 32) calibration images")
    calibration_cosine_mean: float
    onnxruntime: str = Field(description="version of onnxruntime that quantized")
    quantized_at: str


class Manifest(_Strict):
    """``manifest.json`` of an exported model directory."""

    format: int = MANIFEST_FORMAT
    architecture: str = Field(description="open_clip model name, or the name of the custom config")
    model_config_json: dict | None = Field(
        default=None, description="the full open_clip model config used (always recorded)"
    )
    weights: WeightsSource
    precision: Literal["fp32", "fp16"] = "fp32"
    embed_dim: int
    preprocess: Preprocess
    tokenizer: TokenizerSpec
    logit_scale: float
    logit_bias: float | None = None
    image_encoder: EncoderFile
    text_encoder: EncoderFile
    files: dict[str, str] = Field(description="file name -> sha256 of every file in the directory")
    exporter: dict[str, str] = Field(description="versions of the tools that produced the export")
    created_at: str
    quantization: Quantization | None = Field(
        default=None, description="set when the image encoder is int8 (absent: float encoders only)")

    @field_validator("files")
    @classmethod
    def _hex_digests(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"files[{name!r}] is not a lowercase sha256 hex digest")
        return v

    @model_validator(mode="after")
    def _quantization_files(self) -> "Manifest":
        q = self.quantization
        if q is not None:
            if q.source_file == self.image_encoder.file:
                raise ValueError("quantization.source_file must differ from image_encoder.file")
            if q.source_file not in self.files:
                raise ValueError(f"quantization.source_file {q.source_file!r} is not listed in files")
            if self.files[q.source_file] != q.source_sha256:
                raise ValueError("quantization.source_sha256 does not match files[source_file]")
        return self


# --- policy ------------------------------------------------------------------

_ID_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


class Thresholds(_Strict):
    """Two cut points on a category's score: ``flag`` acts automatically,
    ``escalate`` sends to human review; below ``escalate`` the category allows.
    ``flag: null`` makes a review-only category that never acts on its own."""

    flag: float | None
    escalate: float

    @model_validator(mode="after")
    def _ordered(self) -> "Thresholds":
        if self.flag is not None and self.escalate > self.flag:
            raise ValueError(f"escalate ({self.escalate}) must be <= flag ({self.flag})")
        return self


class Category(_Strict):
    id: str = Field(pattern=_ID_PATTERN)
    label: str = Field(min_length=1)
    parent: str | None = Field(default=None, pattern=_ID_PATTERN)
    prompts: list[str] = Field(min_length=1)
    contrast_prompts: list[str] = Field(
        default_factory=list,
        description="benign look-alikes; when present the score is the probability of the "
                    "category against these, computed from this category's prompts alone",
    )
    templates: list[str] | None = Field(default=None, description="overrides the policy's templates")
    thresholds: Thresholds
    enabled: bool = True
    audit_sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    never_overridable: bool = Field(
        default=False,
        description="an allow-list bank match never turns this category's flag or escalate into allow")

    @field_validator("prompts", "contrast_prompts")
    @classmethod
    def _non_blank(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("prompts must not be blank")
        return v


class BankRef(_Strict):
    """A bank of image embeddings the policy matches every image against (``moderator bank``).

    ``known_bad``: a match (cosine >= ``threshold``) flags or escalates the image with reason
    ``bank:<name>``, whatever its category scores. ``allow``: a match turns a would-be flag or
    escalate into allow (reason ``allow_bank:<name>``), except for ``never_overridable``
    categories and known-bad bank matches.
    """

    name: str = Field(pattern=_ID_PATTERN)
    path: str = Field(min_length=1, description="the bank file; relative paths start at the policy file's folder")
    kind: Literal["known_bad", "allow"]
    threshold: float = Field(
        default=0.95, gt=0.0, le=1.0,
        description="cosine similarity at or above which an image matches a bank item; "
                    "calibrate it for your model (re-encodes and resizes of one image score near 1)")
    action: Literal["flag", "escalate"] = Field(default="flag", description="known_bad only: what a match does")
    match_sha256: bool = Field(
        default=True,
        description="an image whose bytes hash to a bank item's sha256 uses the item's stored embedding, "
                    "skipping the encoder (re-uploads of a banked file)")

    @model_validator(mode="after")
    def _action_for_kind(self) -> "BankRef":
        if self.kind == "allow" and "action" in self.model_fields_set:
            raise ValueError("action applies to known_bad banks only (an allow bank always allows)")
        return self


class PdqBankRef(_Strict):
    """A bank of PDQ hashes (ThreatExchange / Hasher-Matcher-Actioner interop): a CSV or TSV file
    whose rows are a 64-hex-digit PDQ hash and, optionally, an id and a label. An image whose PDQ
    hash is within ``max_distance`` bits (Hamming) of a row is a known-bad match, reason ``pdq:<name>``.
    Listing any PDQ bank makes the worker compute PDQ for every image (a per-policy cost)."""

    name: str = Field(pattern=_ID_PATTERN)
    path: str = Field(min_length=1, description="the hash file; relative paths start at the policy file's folder")
    max_distance: int = Field(default=31, ge=0, le=128, description="Hamming distance (bits of 256); 31 is HMA's")
    min_quality: int = Field(
        default=50, ge=0, le=100,
        description="PDQ quality below which an image is not matched (flat or tiny images hash unreliably)")
    action: Literal["flag", "escalate"] = "flag"


class PolicyDoc(_Strict):
    """A versioned moderation policy (YAML on disk)."""

    version: str = Field(min_length=1)
    description: str | None = None
    templates: list[str] = Field(
        default_factory=lambda: ["a photo of {}.", "an image of {}.", "a picture showing {}."],
        min_length=1,
    )
    categories: list[Category] = Field(min_length=1)
    banks: list[BankRef] = Field(default_factory=list, description="image banks matched against every image")
    pdq_banks: list[PdqBankRef] = Field(default_factory=list, description="PDQ hash banks (known-bad)")

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, v: list[str]) -> list[str]:
        for t in v:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
        return v

    @model_validator(mode="after")
    def _taxonomy(self) -> "PolicyDoc":
        ids = [c.id for c in self.categories]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"categories: duplicate category ids: {dupes}")
        known = set(ids)
        for i, c in enumerate(self.categories):
            where = f"categories[{i}](id={c.id})"
            if c.parent is not None and c.parent not in known:
                raise ValueError(f"{where}.parent: parent {c.parent!r} is not a category")
            if c.parent == c.id:
                raise ValueError(f"{where}.parent: a category cannot be its own parent")
            for t in c.templates or ():
                if t.count("{}") != 1:
                    raise ValueError(f"{where}.templates: template {t!r} must contain exactly one '{{}}'")
        # no cycles in the parent chain
        parent = {c.id: c.parent for c in self.categories}
        for start in ids:
            seen, cur = set(), start
            while cur is not None:
                if cur in seen:
                    raise ValueError(f"categories: the parent chain loops through {cur!r}")
                seen.add(cur)
                cur = parent[cur]
        if not any(c.enabled for c in self.categories):
            raise ValueError("categories: every category is disabled")
        names = [b.name for b in self.banks] + [b.name for b in self.pdq_banks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"banks: duplicate bank names (banks and pdq_banks share one namespace): {dupes}")
        return self


# --- image banks (``moderator bank``) ----------------------------------------------

BANK_FORMAT = 1


class BankManifest(_Strict):
    """The header of a bank file: which model its embeddings belong to."""

    format: int = BANK_FORMAT
    name: str = Field(pattern=_ID_PATTERN)
    model_sha256: str = Field(description="the model directory the embeddings were computed with")
    model_architecture: str
    embed_dim: int = Field(gt=0)
    count: int = Field(ge=0)
    created_at: str
    updated_at: str


class BankItem(_Strict):
    """One banked image (a line of the bank's item list)."""

    id: str = Field(min_length=1, max_length=512)
    label: str | None = Field(default=None, description="e.g. the category or case it was banked for")
    source: str | None = Field(default=None, description="where it came from (file path, case id, feed)")
    added_at: str
    sha256: str | None = Field(default=None, description="sha256 of the original file's bytes")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError("sha256 must be a lowercase hex digest")
        return v


# --- decisions ---------------------------------------------------------------

Action = Literal["allow", "escalate", "flag"]
ACTION_SEVERITY: dict[str, int] = {"allow": 0, "escalate": 1, "flag": 2}


class CategoryScore(_Strict):
    id: str
    label: str
    parent: str | None = None
    score: float
    action: Action


class BankMatch(_Strict):
    """A bank item an image matched (cosine >= the bank's threshold, or equal sha256)."""

    bank: str
    kind: Literal["known_bad", "allow"]
    method: Literal["embedding", "pdq"] = "embedding"
    item_id: str
    label: str | None = None
    similarity: float = Field(description="cosine of the embeddings; for PDQ 1 - distance / 256")
    distance: int | None = Field(default=None, description="PDQ only: Hamming distance of the hashes (bits)")
    by_sha256: bool = Field(default=False, description="the image's bytes are the banked file's")
    applied: bool = Field(description="whether the match changed or set the action "
                                      "(an allow match does not override a never_overridable category)")


class Decision(BaseModel):
    """The auditable outcome for one image (JSON on the ``decisions`` topic)."""

    model_config = ConfigDict(extra="forbid")

    event_id: str
    action: Action
    top_category: str | None = Field(description="highest-severity category, ties by score margin")
    reasons: list[str]
    categories: list[CategoryScore]
    policy_version: str
    policy_sha256: str
    model_sha256: str
    model_architecture: str
    image_sha256: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    cached: bool = False
    metadata: dict | None = None
    decided_at: str
    bank_matches: list[BankMatch] = Field(default_factory=list)
    shadow: bool = Field(default=False, description="decided by the shadow policy: never acted upon")

    # not serialised: the input record decided (topic/partition/offset), set by the worker; a replay of
    # that record after a crash or a rebalance gets the same CloudEvents id (moderator.publish)
    _input_record: str | None = PrivateAttr(default=None)

    def bind_input(self, topic: str, partition: int, offset: int) -> "Decision":
        self._input_record = f"{topic}/{partition}/{offset}"
        return self

    @property
    def input_record(self) -> str | None:
        return self._input_record


# --- streaming wire formats (the worker's input and dead letters) ---------------
#
# Decisions on the output topics are ``Decision`` above. Every model here is the
# single source of its JSON: the worker validates with it and the README's
# examples are produced from it.


class ImageSource(_Strict):
    """Where an event's image is: exactly one of ``url`` and ``data``."""

    url: str | None = Field(default=None, description="http(s) URL, fetched with SSRF defences")
    data: str | None = Field(default=None, description="the image bytes, standard base64")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageSource":
        if (self.url is None) == (self.data is None):
            raise ValueError("image must hold exactly one of 'url' and 'data'")
        return self


class InputEvent(_Strict):
    """One image to moderate: the JSON value of a record on the input topic.

    Also accepted: the same object as the ``data`` of a CloudEvents 1.0
    structured-mode envelope (``CloudEvent``), and a raw image value (record
    header ``content-type: image/*``, id from the record key).
    """

    id: str = Field(min_length=1, max_length=512, description="event id; the key of every derived record")
    image: ImageSource
    content_type: str | None = Field(
        default=None, max_length=255,
        description="the producer's idea of the format; informative only, formats are sniffed from the bytes",
    )
    metadata: dict[str, Any] | None = Field(default=None, description="opaque; copied into the decision")
    created_at: datetime | None = Field(
        default=None, description="when the event was created (RFC 3339); starts the end-to-end latency clock",
    )


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 structured-mode envelope whose ``data`` is an ``InputEvent`` (documentation).

    The worker reads CloudEvents with the official SDK (``moderator.ingest.events``), in both
    modes of the Kafka protocol binding: structured (this shape, or ``data_base64`` holding the
    image bytes with ``datacontenttype: image/*``) and binary (the attributes in ``ce_*``
    headers; the value is the ``data``: an ``InputEvent`` as JSON, or the image bytes).
    ``data.id`` defaults to the event's ``id`` and ``data.created_at`` to its ``time``;
    extension attributes (lowercase alphanumeric names) are allowed and ignored.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    datacontenttype: str | None = None
    subject: str | None = None
    time: datetime | None = None
    data: dict[str, Any]


class DeadLetterSource(_Strict):
    """Where the failed record was read."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = Field(default=None, description="the record's Kafka timestamp")
    key: str | None = Field(default=None, description="the record key (UTF-8, or base64 when it is not text)")


class OriginalValue(_Strict):
    """The failed record's value, or a pointer to it when it is too large to copy."""

    encoding: Literal["utf-8", "base64"] | None = Field(
        description="how ``value`` is written; null when the value was not copied")
    value: str | None = Field(description="the original value; null when larger than the copy limit")
    size_bytes: int
    sha256: str
    pointer: str = Field(description="``kafka://<topic>/<partition>/<offset>``: where the original stays")


class DeadLetter(_Strict):
    """A record the worker could not decide (JSON on the ``dead-letter`` topic)."""

    event_id: str | None = Field(description="null when the record had no readable id")
    reason: str = Field(description="stable reason code (the ``reason`` of moderator.errors)")
    error: str = Field(description="human-readable detail")
    source: DeadLetterSource
    original: OriginalValue
    policy_version: str | None = None
    model_sha256: str | None = None
    worker: str = Field(description="the worker instance (client id) that gave up")
    failed_at: str
