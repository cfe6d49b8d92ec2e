"""Per-principal quotas: open mounts and staged bytes, counted as they change, never recomputed per call.

The kernel tells ``Quotas`` about every mount it opens or closes and every change to a mount's staging
(Write, Forget, Commit, Unmount, FreeCube, Purge of staged copies, and the mounts loaded at start), so a
check is a dict lookup. A staged change is counted as its text's UTF-8 bytes plus its vector's bytes: what
staging holds in memory until the commit. Because it sees every open and close, it also keeps each cube's
open mount count (StatCube).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from memosd.config import QuotasConfig
from memosd.errors import QuotaExceeded
from memosd.store.records import StagedRecord


def staged_bytes(staged: StagedRecord | None, vector: np.ndarray | None) -> int:
    """What one staged change counts against its principal's staged-bytes quota."""
    if staged is None:
        return 0
    return len(staged.text.encode()) + (int(vector.nbytes) if vector is not None else 0)


class Quotas:
    def __init__(self, config: QuotasConfig) -> None:
        self.config = config
        self._lock = threading.Lock()  # writes to different mounts of one principal run concurrently
        self._mounts: Counter[str] = Counter()  # principal id -> open mounts
        self._staged: Counter[str] = Counter()  # principal id -> staged bytes
        self._cube_mounts: Counter[str] = Counter()  # cube id -> open mounts

    # -- what is held -------------------------------------------------------------
    def mounts_of(self, principal: str) -> int:
        return self._mounts[principal]

    def staged_of(self, principal: str) -> int:
        return self._staged[principal]

    def cube_mounts(self, cube_id: str) -> int:
        return self._cube_mounts[cube_id]

    # -- mounts -------------------------------------------------------------------
    def check_mount(self, principal: str) -> None:
        """Refuse one more mount for ``principal`` when it holds its quota (call under the kernel's lock,
        with ``opened`` after, so two Mounts cannot both pass)."""
        limit = self.config.max_mounts_per_principal
        held = self._mounts[principal]
        if limit and held >= limit:
            raise QuotaExceeded(
                f"principal {principal or 'anonymous'!r} holds {held} open mounts; the limit is {limit} "
                "(quotas.max_mounts_per_principal). Unmount mounts it no longer uses, or ask the operator to "
                "raise the limit", quota="max_mounts_per_principal", key="quotas.max_mounts_per_principal",
                limit=limit, used=held, principal=principal)

    def opened(self, principal: str, cube_id: str, staged: int = 0) -> None:
        with self._lock:
            self._mounts[principal] += 1
            self._cube_mounts[cube_id] += 1
            self._staged[principal] += staged

    def closed(self, principal: str, cube_id: str, staged: int) -> None:
        """A mount went (Unmount, FreeCube, Revoke, DisablePrincipal), with ``staged`` bytes of staging."""
        with self._lock:
            _take(self._mounts, principal, 1)
            _take(self._cube_mounts, cube_id, 1)
            _take(self._staged, principal, staged)

    # -- staging ------------------------------------------------------------------
    def check_staged(self, principal: str, delta: int) -> None:
        """Refuse a change that would grow the principal's staged bytes past the limit."""
        limit = self.config.max_staged_bytes_per_principal
        held = self._staged[principal]
        if delta > 0 and limit and held + delta > limit:
            raise QuotaExceeded(
                f"principal {principal or 'anonymous'!r} has {held} bytes staged across its mounts; this change "
                f"adds {delta} and the limit is {limit} (quotas.max_staged_bytes_per_principal). Commit or "
                "Unmount first, or ask the operator to raise the limit",
                quota="max_staged_bytes_per_principal", key="quotas.max_staged_bytes_per_principal",
                limit=limit, used=held, requested=delta, principal=principal)

    @contextmanager
    def staging(self, principal: str, delta: int) -> Iterator[None]:
        """Reserve ``delta`` more staged bytes (negative: freed) for the body, which writes them: refused
        (check_staged) before the body runs, handed back if it fails."""
        with self._lock:
            self.check_staged(principal, delta)
            self._staged[principal] += delta
        try:
            yield
        except BaseException:
            with self._lock:
                self._staged[principal] -= delta
            raise

    def unstaged(self, principal: str, freed: int) -> None:
        """Staged changes went without a write of the mount's own (Commit, Purge of staged copies)."""
        with self._lock:
            _take(self._staged, principal, freed)


def _take(counter: Counter[str], key: str, amount: int) -> None:
    left = counter[key] - amount
    if left > 0:
        counter[key] = left
    else:
        del counter[key]  # no key stays behind for a principal or cube that holds nothing
