"""The governance syscalls: principals, grants, the audit log, and Purge (services/erasure.py does it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.errors import InvalidField
from memosd.governance.access import AccessControl, GrantView, Right
from memosd.kernel.paging import decode_token, encode_token, page_size
from memosd.park import Park
from memosd.store.records import PrincipalRecord, StoredRecord
from memosd.syscalls import convert as cv
from memosd.syscalls.gate import Call

if TYPE_CHECKING:
    from memosd.kernel.kernel import Kernel
    from memosd.services.erasure import Erasure
    from memosd.syscalls.gate import Gate

_KINDS = {t.PRINCIPAL_KIND_USER: "user", t.PRINCIPAL_KIND_AGENT: "agent"}
_RIGHTS = {getattr(t, f"RIGHT_{r.name}"): r for r in Right}
_OUTCOMES = {"ok": t.AUDIT_OUTCOME_OK, "denied": t.AUDIT_OUTCOME_DENIED, "failed": t.AUDIT_OUTCOME_FAILED}


def principal(record: PrincipalRecord) -> t.Principal:
    return t.Principal(principal_id=record.principal_id, name=record.name,
                       kind=t.PRINCIPAL_KIND_AGENT if record.kind == "agent" else t.PRINCIPAL_KIND_USER,
                       admin=record.admin, disabled=record.disabled, create_time=cv.ts(record.create_ns),
                       created_by=record.created_by)


def rights(values: list[int]) -> list[Right]:
    unknown = [v for v in values if v not in _RIGHTS]
    if unknown:
        raise InvalidField(f"rights holds {unknown}, which are not rights; use RIGHT_READ, RIGHT_WRITE, "
                           "RIGHT_ACTIVATE, RIGHT_TRAIN, RIGHT_GRANT or RIGHT_ADMIN", field="rights")
    return [_RIGHTS[v] for v in values]


def grant(view: GrantView) -> t.CubeGrant:
    message = t.CubeGrant(cube_id=view.cube_id, principal_id=view.principal_id,
                          rights=[getattr(t, f"RIGHT_{r.name}") for r in sorted(view.rights, key=list(Right).index)],
                          granted_by=view.granted_by, owner=view.owner, expired=view.expired)
    if view.update_ns:
        message.update_time.CopyFrom(cv.ts(view.update_ns))
    if view.expire_ns:
        message.expire_time.CopyFrom(cv.ts(view.expire_ns))
    return message


def audit_record(stored: StoredRecord) -> t.AuditRecord:
    record = t.AuditRecord(seq=stored.seq, body=stored.body, hash=stored.hash)
    try:
        fields = json.loads(stored.body)
    except ValueError:  # a damaged record is still sent, so verify can point at it
        return record
    record.time.CopyFrom(cv.ts(int(fields.get("time_ns", 0))))
    record.principal_id = str(fields.get("principal_id", ""))
    record.method = str(fields.get("method", ""))
    record.cube_id = str(fields.get("cube_id", ""))
    record.revision = int(fields.get("revision", 0))
    record.outcome = _OUTCOMES.get(str(fields.get("outcome")), t.AUDIT_OUTCOME_UNSPECIFIED)
    record.code = str(fields.get("code", ""))
    record.reason = str(fields.get("reason", ""))
    record.mount_id = str(fields.get("mount_id", ""))
    record.item_ids.extend(str(i) for i in fields.get("item_ids", []))
    record.artifacts.extend(str(a) for a in fields.get("artifacts", []))
    record.prev_hash = str(fields.get("prev_hash", ""))
    record.aggregate = str(fields.get("aggregate", ""))
    record.count = int(fields.get("count", 1))
    if record.aggregate:
        record.first_time.CopyFrom(cv.ts(int(fields.get("first_ns", 0))))
    return record


def _matches(record: t.AuditRecord, req: pb.AuditRequest, cube_id: str) -> bool:
    if cube_id and record.cube_id != cube_id:
        return False
    if req.principal_id and record.principal_id != req.principal_id:
        return False
    if req.method and record.method != req.method:
        return False
    if req.outcome and record.outcome != req.outcome:
        return False
    if req.HasField("time_range"):
        when = record.time.ToNanoseconds()
        if req.time_range.HasField("start") and when < req.time_range.start.ToNanoseconds():
            return False
        if req.time_range.HasField("end") and when >= req.time_range.end.ToNanoseconds():
            return False
    return True


class GovernanceHandlers:
    """Mixed into MemOSServicer; the rights each call needs are in policy.RULES."""

    kernel: Kernel
    access: AccessControl
    gate: Gate
    erasure: Erasure

    # -- principals -------------------------------------------------------------------
    def CreatePrincipal(self, req: pb.CreatePrincipalRequest, call: Call) -> pb.CreatePrincipalResponse:
        if req.kind not in _KINDS:
            raise InvalidField("kind must be PRINCIPAL_KIND_USER or PRINCIPAL_KIND_AGENT", field="kind")
        record, token = self.access.principals.create(req.name, _KINDS[req.kind], req.admin,  # type: ignore[arg-type]
                                                      call.caller.principal_id)
        call.note(artifacts=[f"principal:{record.principal_id}"])
        return pb.CreatePrincipalResponse(principal=principal(record), token=token)

    def ListPrincipals(self, req: pb.ListPrincipalsRequest, call: Call) -> pb.ListPrincipalsResponse:
        page = self.access.principals.list(req.page_size, req.page_token)
        return pb.ListPrincipalsResponse(principals=[principal(p) for p in page.entries],
                                         next_page_token=page.next_token)

    def DisablePrincipal(self, req: pb.DisablePrincipalRequest, call: Call) -> pb.DisablePrincipalResponse:
        if not req.principal:
            raise InvalidField("principal is empty; give a principal id or name", field="principal")
        if self.access.principals.get(req.principal).principal_id == call.caller.principal_id:
            raise InvalidField("a principal cannot disable itself; another admin can", field="principal")
        record = self.access.principals.disable(req.principal)
        closed = self.access.close_mounts(record.principal_id)
        call.note(artifacts=[f"principal:{record.principal_id}"])
        return pb.DisablePrincipalResponse(principal=principal(record), mounts_closed=closed)

    def WhoAmI(self, req: pb.WhoAmIRequest, call: Call) -> pb.WhoAmIResponse:
        return pb.WhoAmIResponse(principal=principal(call.caller))

    # -- grants ---------------------------------------------------------------------------
    def Grant(self, req: pb.GrantRequest, call: Call) -> pb.GrantResponse:
        expire_ns = cv.nanos(req.expire_time, "expire_time") if req.HasField("expire_time") else 0
        view = self.access.grant(call.caller, req.cube, req.principal, rights(list(req.rights)), expire_ns)
        call.note(artifacts=[f"principal:{view.principal_id}"])
        return pb.GrantResponse(header=cv.header(view.cube_id, self.kernel.head(view.cube_id)),
                                grant=grant(view))

    def Revoke(self, req: pb.RevokeRequest, call: Call) -> pb.RevokeResponse:
        view, closed = self.access.revoke(call.caller, req.cube, req.principal, rights(list(req.rights)))
        call.note(artifacts=[f"principal:{view.principal_id}"])
        return pb.RevokeResponse(header=cv.header(view.cube_id, self.kernel.head(view.cube_id)),
                                 grant=grant(view), mounts_closed=closed)

    def ListGrants(self, req: pb.ListGrantsRequest, call: Call) -> pb.ListGrantsResponse:
        # Paged in "cube id/principal id" order; the cursor is the last row's key.
        def key(v: GrantView) -> str:
            return f"{v.cube_id}/{v.principal_id}"

        scope = f"grants/{req.cube}"
        size, after = page_size(req.page_size), str(decode_token(req.page_token, scope) or "")
        rows = sorted((v for v in self.access.list_grants(call.caller, req.cube) if key(v) > after), key=key)
        page = rows[:size]
        more = len(rows) > size
        token = encode_token(scope, key(page[-1])) if more else ""
        return pb.ListGrantsResponse(grants=[grant(v) for v in page], next_page_token=token)

    # -- audit ------------------------------------------------------------------------------
    def Audit(self, req: pb.AuditRequest, call: Call) -> Iterator[pb.AuditResponse | Park]:
        cube_id = call.entry.cube_id  # resolved by the rights check (an owner must name its cube)
        for bound in ("start", "end"):  # checked before the first record, not when one is compared
            if req.time_range.HasField(bound):
                cv.nanos(getattr(req.time_range, bound), f"time_range.{bound}")
        log = self.gate.audit
        sent, after = 0, req.after_seq
        while True:
            for stored in log.read(after):
                after = stored.seq
                record = audit_record(stored)
                if _matches(record, req, cube_id):
                    yield pb.AuditResponse(record=record)
                    sent += 1
                    if req.limit and sent >= req.limit:
                        return
            if not req.follow:
                return
            # Following: wait for the next record on the event loop (no thread held); the gate ends
            # the wait when the caller cancels or the daemon stops.
            yield Park(log.beyond(after))

    # -- erasure ---------------------------------------------------------------------------
    def Purge(self, req: pb.PurgeRequest, call: Call) -> pb.PurgeResponse:
        receipt = self.erasure.erase(req.cube, list(req.item_ids), req.source, list(req.tags))
        call.note(items=receipt.item_ids, artifacts=[f"purge:{receipt.purge_id}"]
                  + [f"kv:{key}" for key in receipt.kv_caches_deleted])
        message = t.PurgeReceipt(
            purge_id=receipt.purge_id, cube_id=receipt.cube_id, time=cv.ts(receipt.time_ns),
            item_ids=receipt.item_ids, versions_removed=receipt.versions_removed,
            vectors_removed=receipt.vectors_removed, staged_removed=receipt.staged_removed,
            dense_entries_removed=receipt.dense_entries_removed,
            lexical_entries_removed=receipt.lexical_entries_removed,
            kv_caches_deleted=receipt.kv_caches_deleted,
            adapters_tainted=[t.TaintedAdapter(digest=a.digest, born_revision=a.born) for a in receipt.adapters_tainted],
            derived_item_ids=receipt.derived_item_ids)
        return pb.PurgeResponse(header=cv.header(receipt.cube_id, self.kernel.head(receipt.cube_id)), receipt=message)

