"""Fetch stage: image bytes from URLs, refusing anything an attacker could aim inside."""

from moderator.fetch.fetcher import FetchLimits, UrlFetcher, system_resolver
from moderator.fetch.guard import METADATA_ADDRESSES, METADATA_HOSTS, AddressPolicy, classify

__all__ = [
    "METADATA_ADDRESSES",
    "METADATA_HOSTS",
    "AddressPolicy",
    "FetchLimits",
    "UrlFetcher",
    "classify",
    "system_resolver",
]
