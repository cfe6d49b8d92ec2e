"""Checking memosd's audit log: the hash chain that ``memosctl audit verify`` walks.

Each record's ``body`` is canonical JSON holding the previous record's hash;
its ``hash`` is sha256(body). Walking the records in order, the first place the
chain breaks says what happened there: a record whose hash does not match its
body was altered; a sequence gap, or a ``prev_hash`` that does not match the
record before, means records were removed or reordered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from memosd_client.v1 import types_pb2

GENESIS = "0" * 64


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    # The chain's last hash, when ok: keep it to anchor a later check (``expect_head``).
    head: str = ""
    head_seq: int = 0
    # Where it broke, when not ok.
    bad_seq: int = 0
    problem: str = ""


def verify(records: Iterable[types_pb2.AuditRecord], *, after_seq: int = 0, after_hash: str = GENESIS,
           expect_head: str = "") -> Verdict:
    """Check the chain of ``records`` (in the order the daemon streamed them, starting after ``after_seq``,
    whose hash is ``after_hash``). With ``expect_head``, a hash seen at an earlier verify must still be in it."""
    prev_seq, prev_hash, checked, seen_head = after_seq, after_hash, 0, not expect_head
    for record in records:
        checked += 1
        if hashlib.sha256(record.body).hexdigest() != record.hash:
            return Verdict(False, checked, bad_seq=record.seq,
                           problem=f"record {record.seq} was altered: its hash does not match its content")
        try:
            body = json.loads(record.body)
        except ValueError:
            return Verdict(False, checked, bad_seq=record.seq, problem=f"record {record.seq} is not valid JSON")
        if record.seq != prev_seq + 1:
            what = (f"records {prev_seq + 1}..{record.seq - 1} were removed" if record.seq > prev_seq + 1
                    else f"record {record.seq} is out of order (after {prev_seq})")
            return Verdict(False, checked, bad_seq=record.seq, problem=what)
        if body.get("seq") != record.seq:
            return Verdict(False, checked, bad_seq=record.seq,
                           problem=f"the record stored as {record.seq} says it is {body.get('seq')}: "
                                   "records were reordered")
        if body.get("prev_hash") != prev_hash:
            return Verdict(False, checked, bad_seq=record.seq,
                           problem=f"record {record.seq} does not follow record {prev_seq}: the record before it "
                                   "was altered, removed or reordered")
        prev_seq, prev_hash = record.seq, record.hash
        seen_head = seen_head or record.hash == expect_head
    if not seen_head:
        return Verdict(False, checked, bad_seq=prev_seq,
                       problem=f"the expected head {expect_head[:16]}... is not in the chain: it was rewritten")
    return Verdict(True, checked, head=prev_hash, head_seq=prev_seq)
