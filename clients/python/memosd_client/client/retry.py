"""How the client resends a call whose answer was lost, and how long a call may take.

Write, Ingest, Commit and ImportAdapter carry a request id, so resending the same request after a lost
answer (a deadline, a dropped connection) returns the first call's result: safe on both codes. Read-only
calls are retried when the daemon could not be reached; calls that change state without a request id are
never retried (a retry could apply them twice).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from memosd_client.errors import from_rpc_error

# The codes each kind of call is resent on.
RETRY_WITH_ID = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
RETRY_READ = frozenset({grpc.StatusCode.UNAVAILABLE})
RETRY_NEVER: frozenset[grpc.StatusCode] = frozenset()

_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """How calls whose answer was lost are retried (see ``Client``).

    ``attempts`` in all (1: never retry). Before retry n (1, 2, ...) the client waits a random time between
    half and all of ``backoff * multiplier ** (n - 1)`` seconds, at most ``max_backoff``: exponential backoff
    with jitter, so many clients that lost the daemon together do not return together."""

    attempts: int = 4
    backoff: float = 0.25
    multiplier: float = 2.0
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts is {self.attempts}; use 1 (no retries) or more")
        if self.backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy needs backoff >= 0, max_backoff >= 0 and multiplier >= 1")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        ceiling = min(self.max_backoff, self.backoff * self.multiplier ** (retry - 1))
        return random.uniform(ceiling / 2, ceiling)


NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class Deadlines:
    """How a long call's deadline grows beyond the client's ``timeout`` (the base, for every call).

    Write and Ingest get ``per_item`` seconds more per item or message (the daemon embeds them before it
    answers: about 50 ms a message on two busy cores), ImportAdapter ``per_mib`` per MiB uploaded, and a
    Generate stream ``per_token`` per token it may generate (``max_tokens``, or the daemon's default 256),
    so a long reply on a slow CPU is not cut off. Zeros make every call's deadline the base."""

    per_item: float = 0.1
    per_mib: float = 1.0
    per_token: float = 0.5


def new_request_id() -> str:
    """A fresh request id (a uuid4): what the client sends with Write, Ingest, Commit and ImportAdapter."""
    return str(uuid.uuid4())


def retrying(attempt: Callable[[], _T], retry_on: frozenset[grpc.StatusCode], policy: RetryPolicy) -> _T:
    """``attempt()``, called again after a failure whose code is in ``retry_on``, as ``policy`` allows.

    The one place a unary call's gRPC failure becomes a MemosError: the last failure is raised as one."""
    retries = 0
    while True:
        try:
            return attempt()
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            retries += 1
            if code not in retry_on or retries >= policy.attempts:
                raise from_rpc_error(e) from e
        time.sleep(policy.delay(retries))
