"""Redis clients for the caches, from one place: URL, ACL user and password, TLS files.

``redis_client(url, options, timeout_s)`` builds the client both caches use;
``options`` comes from ``RedisClientSettings.redis_options()`` (user name, a password
that need not be URL-safe, and for ``rediss://`` the CA file and an optional client
certificate). ``check_redis_access`` pings once at start: a refused login or an
untrusted certificate will not fix itself, so it ends the start with a message naming
the setting; an unreachable Redis is only logged, because Redis is optional and the
caches serve without it until it answers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from moderator.errors import ServiceAccessError, tls_failure

log = logging.getLogger(__name__)


def redis_client(url: str, options: Mapping[str, object] | None = None, *, timeout_s: float = 1.0, **kw):
    """``redis.Redis`` for ``url`` with ``options`` (user, password, TLS files) and timeouts."""
    import redis  # noqa: PLC0415

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                **dict(options or {}), **kw)


def _where(url: str) -> str:
    """``scheme://host:port/db`` without any credentials the URL may hold."""
    from urllib.parse import urlsplit  # noqa: PLC0415

    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def check_redis_access(url: str, options: Mapping[str, object] | None = None, *, timeout_s: float = 2.0) -> bool:
    """PING ``url`` once. True: it answered; False: unreachable now (logged, not fatal).

    Raises:
        ServiceAccessError: the login was refused (``redis_auth_failed``) or TLS failed
            (``redis_tls_untrusted``, ``redis_tls_failed``): settings to fix, not an outage.
    """
    import redis  # noqa: PLC0415
    from redis.exceptions import (  # noqa: PLC0415
        AuthenticationError,
        AuthenticationWrongNumberOfArgsError,
        ResponseError,
    )

    options = dict(options or {})
    client = redis_client(url, options, timeout_s=timeout_s)
    where = _where(url)
    try:
        client.ping()
        return True
    except (AuthenticationError, AuthenticationWrongNumberOfArgsError, ResponseError) as e:
        text = str(e)
        auth = isinstance(e, (AuthenticationError, AuthenticationWrongNumberOfArgsError))
        if auth or any(w in text for w in ("WRONGPASS", "NOAUTH", "NOPERM")):
            user = options.get("username") or "default"
            older = (" (a Redis before 6 has no ACL users: leave MODERATOR_REDIS_USERNAME empty)"
                     if isinstance(e, AuthenticationWrongNumberOfArgsError) else "")
            raise ServiceAccessError(
                f"Redis at {where} refused user {user!r} ({text.split(',')[0].rstrip('.')}){older}: check "
                "MODERATOR_REDIS_USERNAME and MODERATOR_REDIS_PASSWORD (and the user's ACL: it needs PING "
                "and the cache commands)",
                reason="redis_auth_failed") from None
        log.warning("Redis at %s answered PING with an error (%s); the caches serve without it until it "
                    "answers", where, e, extra={"event": "redis_unreachable_at_start"})
        return False
    except redis.ConnectionError as e:
        tls = tls_failure(e, "MODERATOR_REDIS_SSL_CA_FILE", options.get("ssl_ca_certs"))
        if tls is not None:
            raise ServiceAccessError(f"TLS to Redis at {where}: {tls[1]}",
                                     reason="redis_tls_untrusted" if tls[0] == "untrusted" else
                                     "redis_tls_failed") from None
        log.warning("Redis at %s does not answer (%s); the caches serve without it until it does", where, e,
                    extra={"event": "redis_unreachable_at_start"})
        return False
    except redis.TimeoutError as e:
        log.warning("Redis at %s timed out (%s); the caches serve without it until it answers", where, e,
                    extra={"event": "redis_unreachable_at_start"})
        return False
    finally:
        client.close()
