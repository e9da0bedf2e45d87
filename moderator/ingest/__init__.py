"""Ingest stage: the consumer group member and input-event parsing."""

from moderator.ingest.consumer import RebalanceHooks, make_consumer, subscribe
from moderator.ingest.events import CLOUDEVENTS_JSON, EventLimits, ParsedEvent, header, parse_record

__all__ = [
    "CLOUDEVENTS_JSON",
    "EventLimits",
    "ParsedEvent",
    "RebalanceHooks",
    "header",
    "make_consumer",
    "parse_record",
    "subscribe",
]
