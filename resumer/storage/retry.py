"""Retries with backoff for storage calls; transient failures become one TransientStorageError when exhausted.

Transient: connection resets and refusals, timeouts, HTTP 5xx, throttling (SlowDown, Throttling,
RequestLimitExceeded). Anything else (missing object, permission denied, bad request) is raised at
once: retrying it would only hide the real problem.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from resumer.core.errors import TransientStorageError

logger = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ConnectionError", "ServerDisconnectedError", "ClientOSError", "ClientConnectorError",
                    "ClientPayloadError", "IncompleteRead", "ProtocolError", "ResponseStreamingError"}


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How hard to try: attempts in all, first delay, cap, and jitter (full jitter on each delay)."""

    attempts: int = 6
    first_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.first_delay_s * 2**attempt))


DEFAULT = RetryPolicy()


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is worth retrying."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        seen += 1
        if isinstance(cur, TransientStorageError):
            return False  # already exhausted below us
        if isinstance(cur, (ConnectionError, TimeoutError)):
            return True
        if isinstance(cur, OSError) and cur.errno in _TRANSIENT_ERRNOS:
            return True
        if type(cur).__name__ in _TRANSIENT_NAMES:
            return True
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            err = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if str(err.get("Code", "")) in _TRANSIENT_CODES or int(status or 0) >= 500:
                return True
        text = str(cur)
        if any(code in text for code in ("SlowDown", "Throttl", "Service Unavailable", "InternalError")):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def call(fn: Callable[[], T], *, what: str, uri: str, policy: RetryPolicy = DEFAULT) -> T:
    """Run ``fn``; retry transient failures with backoff; raise TransientStorageError when exhausted."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified right here, re-raised when not transient
            if not is_transient(exc):
                raise
            if attempt + 1 >= policy.attempts:
                raise TransientStorageError(
                    f"{what} {uri} failed {policy.attempts} times with transient errors; last: "
                    f"{type(exc).__name__}: {str(exc)[:300]}. Storage may be down or throttling; retry later.",
                    uri=uri) from exc
            wait = policy.delay(attempt)
            logger.warning("[retry] %s %s: %s: %s; attempt %d/%d in %.2fs", what, uri, type(exc).__name__,
                           str(exc)[:200], attempt + 2, policy.attempts, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
