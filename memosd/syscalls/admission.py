"""Admission: per-principal limits on open streams, checked before a stream does any work.

A stream counts against ``streams`` and, by its kind, against ``generations``
(Generate), ``uploads`` (ImportAdapter) or ``follows`` (Audit with follow).
Admins are limited too: a runaway admin client starves the others as surely
as any, and the limits are per principal, so it never blocks anyone else.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from memosd.config import QuotasConfig
from memosd.errors import QuotaExceeded

STREAMS, GENERATIONS, UPLOADS, FOLLOWS = "streams", "generations", "uploads", "follows"
CONFIG_KEYS = {STREAMS: "max_streams_per_principal", GENERATIONS: "max_generations_per_principal",
               UPLOADS: "max_uploads_per_principal", FOLLOWS: "max_follows_per_principal"}
_WHAT = {STREAMS: "streaming calls", GENERATIONS: "Generate streams", UPLOADS: "ImportAdapter and ImportCube uploads",
         FOLLOWS: "Audit(follow) streams"}


def stream_kinds(method: str, request: Any) -> tuple[str, ...]:
    """The limits a streaming call of ``method`` counts against (its kind's first: the refusal names it)."""
    if method == "Generate":
        return GENERATIONS, STREAMS
    if method in ("ImportAdapter", "ImportCube"):
        return UPLOADS, STREAMS
    if method == "Audit" and getattr(request, "follow", False) is True:
        return FOLLOWS, STREAMS
    return (STREAMS,)


class Slot:
    """A stream's place under its principal's limits; ``release`` (idempotent) gives it back."""

    def __init__(self, admission: Admission, principal_id: str, kinds: tuple[str, ...]) -> None:
        self._admission, self._principal_id, self._kinds = admission, principal_id, kinds
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self._principal_id, self._kinds)


class Admission:
    def __init__(self, quotas: QuotasConfig) -> None:
        self.limits = {kind: int(getattr(quotas, key)) for kind, key in CONFIG_KEYS.items()}
        self._open: Counter[tuple[str, str]] = Counter()  # (principal id, kind) -> open streams
        self._lock = threading.Lock()

    def set_quotas(self, quotas: QuotasConfig) -> None:
        """New limits for the next stream (a cluster node's cluster config changed); open streams stay open."""
        self.limits = {kind: int(getattr(quotas, key)) for kind, key in CONFIG_KEYS.items()}

    def admit(self, principal_id: str, kinds: tuple[str, ...]) -> Slot:
        """Count a new stream of ``principal_id``; raises ``QuotaExceeded`` (counting nothing) over a limit."""
        with self._lock:
            for kind in kinds:
                limit = self.limits[kind]
                if self._open[(principal_id, kind)] >= limit:
                    key = f"quotas.{CONFIG_KEYS[kind]}"
                    raise QuotaExceeded(f"this principal already has {limit} open {_WHAT[kind]}, the most {key} "
                                        "allows; end one first, or ask the operator to raise the limit",
                                        limit=key, max=limit)
            for kind in kinds:
                self._open[(principal_id, kind)] += 1
        return Slot(self, principal_id, kinds)

    def open_streams(self, principal_id: str, kind: str = STREAMS) -> int:
        with self._lock:
            return self._open[(principal_id, kind)]

    def _release(self, principal_id: str, kinds: tuple[str, ...]) -> None:
        with self._lock:
            for kind in kinds:
                self._open[(principal_id, kind)] -= 1
                if self._open[(principal_id, kind)] <= 0:
                    del self._open[(principal_id, kind)]
