"""Every Prometheus metric the service exports, defined in one place.

Dashboards and alert rules query these names; tests scrape a real process and
check that each name the dashboard uses exists.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

REDIS_ERRORS = Counter(
    "moderator_redis_errors_total", "Redis operations that failed (the service kept serving)", ["op"]
)
POLICY_EMBEDDING_CACHE = Counter(
    "moderator_policy_embedding_cache_total", "Policy prompt-embedding lookups", ["result"]
)
POLICY_RELOADS = Counter(
    "moderator_policy_reloads_total", "Policy reload attempts by result", ["result"]
)
POLICY_INFO = Info("moderator_policy", "Policy in force")
MODEL_INFO = Info("moderator_model", "Model in use")
TEXT_ENCODER_RUNS = Counter(
    "moderator_text_encoder_runs_total", "Times the text encoder ran to embed policy prompts"
)
DECISIONS = Counter("moderator_decisions_total", "Decisions by overall action", ["action"])
CATEGORY_ACTIONS = Counter(
    "moderator_category_actions_total", "Per-category non-allow outcomes", ["category", "action"]
)
REJOINS_FORCED = Counter(
    "moderator_rejoins_forced_total",
    "Times the consumer left and rejoined its group because a rebalance gave it no assignment in time",
)
BANK_MATCHES = Counter(
    "moderator_bank_matches_total",
    "Images that matched an image or PDQ bank, by bank, the bank's action (flag, escalate, allow) and "
    "whether it was applied (an allow match is not, under a known-bad match or a never_overridable category)",
    ["bank", "action", "applied"],
)
SHADOW_POLICY_RELOADS = Counter(
    "moderator_shadow_policy_reloads_total", "Shadow policy reload attempts by result", ["result"]
)
SHADOW_POLICY_INFO = Info("moderator_shadow_policy", "Shadow policy in force (decides, never acts)")
SHADOW_DISAGREEMENTS = Counter(
    "moderator_shadow_disagreements_total",
    "Images whose shadow-policy action differs from the live one, per category "
    "(category=_overall: the decision's action)",
    ["category", "live", "shadow"],
)
SHADOW_ERRORS = Counter(
    "moderator_shadow_errors_total",
    "Shadow decisions that failed (to decide or to publish); live decisions are unaffected",
    ["stage"],
)
POLICY_LOADED = Gauge("moderator_policy_loaded", "1 when a valid policy is in force")
SCORE_SECONDS = Histogram(
    "moderator_score_seconds", "Time to score a batch against the policy",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1),
)

# --- streaming worker (moderator run) ------------------------------------------------

# Fine below 100 ms so a 60 ms budget (p99 consume -> ack) can be read off the histogram.
_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

EVENTS_CONSUMED = Counter(
    "moderator_events_consumed_total", "Input records taken from Kafka", ["topic"]
)
EVENTS_PARSED = Counter(
    "moderator_events_parsed_total", "Input events parsed, by envelope (json, cloudevents, raw)", ["envelope"]
)
END_TO_END_SECONDS = Histogram(
    "moderator_end_to_end_latency_seconds",
    "Event created_at (clock=created_at) or consume time (clock=consumed) to every output acknowledged",
    ["clock"], buckets=_LATENCY_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "moderator_stage_seconds",
    "Per-record time in each stage: queue_wait, fetch, decode, encode (batch share), score, publish",
    ["stage"], buckets=_STAGE_BUCKETS,
)
BATCH_SIZE = Histogram(
    "moderator_batch_size", "Records per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
TRANSACTIONS = Counter(
    "moderator_transactions_total",
    "Exactly-once mode: batch transactions by result (committed, aborted: the batch is redone, fenced)",
    ["result"],
)
TRANSACTION_SECONDS = Histogram(
    "moderator_transaction_seconds", "Exactly-once mode: one batch's transaction, begin to commit",
    buckets=_STAGE_BUCKETS,
)
ENCODE_BATCH_SECONDS = Histogram(
    "moderator_encode_batch_seconds", "Image encoder time per batch", buckets=_STAGE_BUCKETS
)
DEAD_LETTERS = Counter("moderator_dead_letters_total", "Inputs sent to the dead-letter topic", ["reason"])
IMAGE_EMBEDDING_CACHE = Counter(
    "moderator_image_embedding_cache_total",
    "Image-embedding cache lookups by content hash (hit, miss, unavailable)", ["result"]
)
URL_FETCHES = Counter("moderator_url_fetches_total", "Image URL fetches by outcome (ok or reason)", ["result"])
RECORDS_PUBLISHED = Counter(
    "moderator_records_published_total", "Output records acknowledged by the broker", ["topic"]
)
PUBLISH_ERRORS = Counter(
    "moderator_publish_errors_total", "Output records the broker never acknowledged (the worker stops)", ["topic"]
)
OFFSET_COMMITS = Counter("moderator_offset_commits_total", "Offset commits by result", ["result"])
REBALANCES = Counter(
    "moderator_rebalance_partitions_total", "Partitions assigned, revoked or lost in rebalances", ["event"]
)
DROPPED_ON_REVOKE = Counter(
    "moderator_dropped_on_revoke_total",
    "In-flight records left uncommitted when their partition was revoked (the new owner redoes them)",
)
CONSUMER_LAG = Gauge(
    "moderator_consumer_lag", "Records behind the partition's high watermark", ["topic", "partition"]
)
IN_FLIGHT = Gauge("moderator_in_flight_records", "Consumed records whose outputs are not all acknowledged yet")
IN_FLIGHT_BYTES = Gauge("moderator_in_flight_bytes", "Bytes of the in-flight records' values")
CONSUMER_PAUSED = Gauge("moderator_consumer_paused", "1 while fetching is paused by back-pressure")
KAFKA_NATIVE_CRC32C = Gauge(
    "moderator_kafka_native_crc32c",
    "1 when kafka-python checksums records with the C crc32c package, 0 on its slow pure-Python fallback",
)
WORKER_READY = Gauge("moderator_worker_ready",
                     "1 when /readyz passes: encoder warmed up, consumer group joined, not stopping (the same check)")
ASSIGNED_PARTITIONS = Gauge("moderator_assigned_partitions",
                            "input-topic partitions this worker holds (0: a ready standby, e.g. more replicas "
                            "than partitions)")
WORKER_INFO = Info("moderator_worker", "Worker instance: client id, group, topics")
THREAD_CPU = Counter(
    "moderator_thread_cpu_seconds",
    "CPU time of the worker's threads by what they do (Linux): prepare (parse, hash, decode, resize), encode "
    "(the encoder's calling thread, decide, producer send calls), fetch, kafka-io (the consumer's network "
    "loop), kafka-producer, native (ONNX Runtime's and CUDA's own threads), MainThread (the poll loop), ...",
    ["thread"],
)
# the supervisor's own (``--processes N``), served beside its processes' series: registry=None
# here, registered in the supervisor's registry only (a worker process never exposes them)
WORKER_PROCESSES = Gauge("moderator_worker_processes", "worker processes the supervisor runs (--processes)",
                         registry=None)
WORKER_PROCESS_RESTARTS = Counter("moderator_worker_process_restarts",
                                  "worker processes the supervisor started again after they exited",
                                  ["process"], registry=None)
SUPERVISOR_ONLY = (WORKER_PROCESSES, WORKER_PROCESS_RESTARTS)
