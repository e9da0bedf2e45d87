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
POLICY_LOADED = Gauge("moderator_policy_loaded", "1 when a valid policy is in force")
SCORE_SECONDS = Histogram(
    "moderator_score_seconds", "Time to score a batch against the policy",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1),
)
