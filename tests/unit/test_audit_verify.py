"""The audit chain's own link: ``prev_hash`` and the expected head, which the cheaper checks cannot stand in for.

The records are the daemon's own (a real AuditLog on a real RocksDB store),
sent as the Audit syscall sends them; only the client's ``verify`` is under test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from memos.audit import verify
from memos.v1 import types_pb2 as t

from memosd.governance.audit import AuditEntry, AuditLog, canonical
from memosd.store.rocks import Store
from memosd.syscalls.governance import audit_record


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[list[t.AuditRecord]]:
    """Ten records as Audit streams them."""
    store = Store(tmp_path / "store")
    try:
        log = AuditLog(store)
        for n in range(10):
            log.append(AuditEntry(method="WhoAmI", principal_id=f"p{n}"))
        yield [audit_record(r) for r in log.read()]
    finally:
        store.close()


def test_a_record_altered_and_rehashed_is_reported_at_the_next_record(chain: list[t.AuditRecord]) -> None:
    body = json.loads(chain[4].body)
    body["principal_id"] = "someone-else"
    rewritten = canonical(body)  # record 5 rewritten, and its hash recomputed to match
    forged_record = t.AuditRecord(seq=5, body=rewritten, hash=hashlib.sha256(rewritten).hexdigest())
    forged = [*chain[:4], forged_record, *chain[5:]]
    # Record 5 is self-consistent (hash, seq, and its own prev_hash), so only record 6's link shows it.
    verdict = verify(forged)
    assert not verdict.ok
    assert verdict.bad_seq == 6, verdict
    assert "does not follow record 5" in verdict.problem


def test_a_chain_truncated_at_its_end_is_caught_by_the_expected_head(chain: list[t.AuditRecord]) -> None:
    head = verify(chain)
    assert head.ok and head.head == chain[-1].hash and head.head_seq == 10
    truncated = chain[:8]
    # What is left is a valid chain on its own: without the anchor nothing is wrong with it.
    assert verify(truncated).ok
    verdict = verify(truncated, expect_head=head.head)
    assert not verdict.ok
    assert verdict.bad_seq == 8 and "expected head" in verdict.problem
    # The anchor is met by a chain that still holds it, however far it has grown since.
    assert verify(chain, expect_head=chain[5].hash).ok


def test_a_later_verify_starts_after_the_anchored_record(chain: list[t.AuditRecord]) -> None:
    assert verify(chain[6:], after_seq=6, after_hash=chain[5].hash).ok
    verdict = verify(chain[6:], after_seq=6, after_hash=chain[4].hash)
    assert not verdict.ok and verdict.bad_seq == 7
