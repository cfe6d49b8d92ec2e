"""A small etcd v3 client over etcd's JSON gateway (etcd 3.4: ``/v3/kv/*``, ``/v3/lease/*``, ``/v3/watch``).

Why the gateway and the stdlib: the ``etcd3`` package pins protobuf 3 (memosd needs protobuf 7), and the
gRPC API would put grpc under the wire line (docs/ARCHITECTURE.md, rule 2). The gateway speaks the same
protocol as JSON: keys and values base64, 64-bit integers as strings, a field at its zero value omitted.

Failover: the client holds several endpoints and starts each call at the last one that answered. A call
that did not reach a server (connection refused, connect timeout) moves to the next endpoint. A call that
reached one and then failed (a read timeout, a dropped connection, etcd's "no leader" / "request timed
out") moves on only if repeating it is harmless: every call but ``txn`` (a put repeats the same value; a
range, a delete, a keepalive, a revoke are idempotent). A txn whose outcome is unknown raises
``EtcdUnavailable`` at once, saying so: repeating it could apply it twice, or report its own first write
as a failed compare. When no endpoint answers, or the cluster has no quorum (every member left says so
or times out), the call raises ``EtcdUnavailable``. Any other refusal from etcd is an ``EtcdError`` with
etcd's gRPC code and message. A failed compare is no error: ``txn`` returns ``succeeded=False``.

Each call opens its own HTTP connection (loopback or LAN, a few calls a second): the client is then safe
to share between threads with no lock around a connection.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import queue
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_TIMEOUT = 2.0  # seconds per endpoint and call: a healthy etcd answers on loopback in milliseconds

# etcd's gRPC codes (the gateway's "code"): the ones that mean "try another member / no quorum".
_UNAVAILABLE = 14
_DEADLINE_EXCEEDED = 4
_NOT_FOUND = 5


class EtcdError(Exception):
    """etcd refused a call (a bad request, an unknown lease): ``code`` is etcd's gRPC code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered, or the etcd cluster has no quorum: nothing was (or is known to be) changed,
    except where the message says the outcome is unknown (a txn cut off after it was sent)."""


class LeaseNotFound(EtcdError):
    """The lease has expired or was revoked."""


Key = str | bytes


def _b(value: Key) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _enc(value: Key) -> str:
    return base64.b64encode(_b(value)).decode("ascii")


def _dec(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _int(value: object) -> int:
    return int(value) if value is not None else 0  # type: ignore[call-overload]


def prefix_end(prefix: Key) -> bytes:
    """The range end that makes ``[prefix, end)`` every key starting with ``prefix`` (etcd's rule: add one
    to the last byte below 0xff, dropping the 0xff bytes after it; all 0xff or empty -> every key)."""
    raw = bytearray(_b(prefix))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int  # how many times the key was written since it was created
    lease: int  # 0: none

    @staticmethod
    def from_json(doc: dict[str, Any]) -> KeyValue:
        return KeyValue(_dec(doc.get("key")), _dec(doc.get("value")), _int(doc.get("create_revision")),
                        _int(doc.get("mod_revision")), _int(doc.get("version")), _int(doc.get("lease")))

    def json(self) -> Any:
        """The value read as JSON (the cluster room stores its records as JSON)."""
        return json.loads(self.value)


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KeyValue]
    count: int  # every key in the range, even past a limit
    more: bool  # the limit cut the answer short
    revision: int  # the store's revision the answer was read at


@dataclass(frozen=True)
class PutResult:
    revision: int
    prev: KeyValue | None = None


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    revision: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool  # every compare held, so the success ops ran (else the failure ops)
    revision: int
    responses: list[RangeResult | PutResult | DeleteResult]


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int  # seconds


CompareTarget = Literal["version", "create_revision", "mod_revision", "value", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]
_TARGETS = {"version": "VERSION", "create_revision": "CREATE", "mod_revision": "MOD", "value": "VALUE",
            "lease": "LEASE"}
_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


@dataclass(frozen=True)
class Compare:
    """One condition of a txn: ``key``'s ``target`` ``op`` ``operand``. A missing key has version,
    create_revision and mod_revision 0, so ``Compare.create_revision(k, "==", 0)`` means "k is absent"."""

    key: Key
    target: CompareTarget
    op: CompareOp
    operand: int | Key

    @staticmethod
    def version(key: Key, op: CompareOp, operand: int) -> Compare:
        return Compare(key, "version", op, operand)

    @staticmethod
    def create_revision(key: Key, op: CompareOp, operand: int) -> Compare:
        return Compare(key, "create_revision", op, operand)

    @staticmethod
    def mod_revision(key: Key, op: CompareOp, operand: int) -> Compare:
        return Compare(key, "mod_revision", op, operand)

    @staticmethod
    def value(key: Key, op: CompareOp, operand: Key) -> Compare:
        return Compare(key, "value", op, operand)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": _enc(self.key), "target": _TARGETS[self.target], "result": _RESULTS[self.op]}
        if self.target == "value":
            if isinstance(self.operand, int):
                raise TypeError("a value compare takes bytes or str")
            doc["value"] = _enc(self.operand)
        else:
            if not isinstance(self.operand, int):
                raise TypeError(f"a {self.target} compare takes an int")
            doc[self.target] = str(self.operand)
        return doc


@dataclass(frozen=True)
class Get:
    key: Key
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_range": _range_request(self.key, self.prefix)}


@dataclass(frozen=True)
class Put:
    key: Key
    value: Key
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"request_put": _put_request(self.key, self.value, self.lease)}


@dataclass(frozen=True)
class Delete:
    key: Key
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": _delete_request(self.key, self.prefix)}


Op = Get | Put | Delete


def _range_request(key: Key, prefix: bool, *, limit: int = 0, serializable: bool = False,
                   range_end: Key | None = None, keys_only: bool = False,
                   min_mod_revision: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = {"key": _enc(key)}
    if keys_only:
        doc["keys_only"] = True
    if min_mod_revision:
        doc["min_mod_revision"] = str(min_mod_revision)
    if prefix:
        doc["range_end"] = _enc(prefix_end(key))
    elif range_end is not None:
        doc["range_end"] = _enc(range_end)
    if limit:
        doc["limit"] = str(limit)
    if serializable:
        doc["serializable"] = True
    return doc


def _put_request(key: Key, value: Key, lease: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"key": _enc(key), "value": _enc(value)}
    if lease:
        doc["lease"] = str(lease)
    return doc


def _delete_request(key: Key, prefix: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {"key": _enc(key)}
    if prefix:
        doc["range_end"] = _enc(prefix_end(key))
    return doc


def _range_result(doc: dict[str, Any]) -> RangeResult:
    kvs = [KeyValue.from_json(kv) for kv in doc.get("kvs", ())]
    return RangeResult(kvs, _int(doc.get("count")), bool(doc.get("more")), _revision(doc))


def _revision(doc: dict[str, Any]) -> int:
    return _int(doc.get("header", {}).get("revision"))


def _txn_response(doc: dict[str, Any]) -> RangeResult | PutResult | DeleteResult:
    if "response_range" in doc:
        return _range_result(doc["response_range"])
    if "response_put" in doc:
        put = doc["response_put"]
        prev = put.get("prev_kv")
        return PutResult(_revision(put), KeyValue.from_json(prev) if prev else None)
    if "response_delete_range" in doc:
        deleted = doc["response_delete_range"]
        return DeleteResult(_int(deleted.get("deleted")), _revision(deleted))
    raise EtcdError(f"an unknown txn response from etcd: {sorted(doc)}")


def _endpoint(address: str) -> tuple[str, int]:
    """``host:port`` or ``http://host:port`` -> (host, port). TLS to etcd is not built yet."""
    rest = address.strip()
    if rest.startswith("https://"):
        raise ValueError(f"etcd endpoint {address!r}: https is not supported yet (use http:// on a trusted network)")
    rest = rest.removeprefix("http://").rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in rest:
        raise ValueError(f"etcd endpoint {address!r}: expected host:port or http://host:port")
    return host.strip("[]"), int(port)


class _NotSent(Exception):
    """The request never reached a server (it could not connect): any call may go to the next endpoint."""


class _Failed(Exception):
    """The request reached a server, which failed it or was cut off: the outcome may be unknown."""


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue  # a DELETE carries only the key and the revision of the deletion (mod_revision)


class EtcdClient:
    def __init__(self, endpoints: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("an etcd client needs at least one endpoint")
        self.endpoints = [_endpoint(e) for e in endpoints]
        self.timeout = timeout
        self._preferred = 0  # the endpoint that answered last; a plain int, so no lock is needed

    # -- kv --------------------------------------------------------------------------------------------

    def get(self, key: Key, *, serializable: bool = False) -> KeyValue | None:
        found = self.range(key, serializable=serializable).kvs
        return found[0] if found else None

    def range(self, key: Key, *, prefix: bool = False, range_end: Key | None = None, limit: int = 0,
              serializable: bool = False, keys_only: bool = False, min_mod_revision: int = 0) -> RangeResult:
        """The keys ``key`` (or every key under the prefix ``key``, or ``[key, range_end)``) in key order.
        ``serializable`` reads the answering member's copy without asking the leader: it works without
        quorum, and may be stale. ``keys_only`` leaves the values out; ``min_mod_revision`` keeps only
        keys changed at or after it (``count`` still counts every key in the range)."""
        doc = self._call("/v3/kv/range", _range_request(key, prefix, limit=limit, serializable=serializable,
                                                       range_end=range_end, keys_only=keys_only,
                                                       min_mod_revision=min_mod_revision))
        return _range_result(doc)

    def put(self, key: Key, value: Key, *, lease: int = 0) -> int:
        """Write ``key``; with ``lease`` it is deleted when the lease ends. Returns the new revision."""
        return _revision(self._call("/v3/kv/put", _put_request(key, value, lease)))

    def delete(self, key: Key, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many were deleted."""
        return _int(self._call("/v3/kv/deleterange", _delete_request(key, prefix)).get("deleted"))

    def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """If every compare holds, run ``success``, else ``failure``: atomically, at one revision."""
        body = {"compare": [c.to_json() for c in compare], "success": [op.to_json() for op in success],
                "failure": [op.to_json() for op in failure]}
        doc = self._call("/v3/kv/txn", body, repeatable=False)
        return TxnResult(bool(doc.get("succeeded")), _revision(doc),
                         [_txn_response(r) for r in doc.get("responses", ())])

    # -- leases ----------------------------------------------------------------------------------------

    def grant(self, ttl: int) -> Lease:
        # Repeatable: a lease granted by a lost first attempt is never kept alive and simply expires.
        doc = self._call("/v3/lease/grant", {"TTL": str(ttl)})
        if doc.get("error"):
            raise EtcdError(f"etcd refused a lease of {ttl} s: {doc['error']}")
        return Lease(_int(doc.get("ID")), _int(doc.get("TTL")))

    def keepalive(self, lease_id: int) -> int:
        """Renew the lease once; returns its TTL. Raises LeaseNotFound when it has already expired."""
        # A bidirectional stream in gRPC; through the gateway one request and its one answer.
        doc = self._call("/v3/lease/keepalive", {"ID": str(lease_id)}).get("result", {})
        ttl = _int(doc.get("TTL"))
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease_id} has expired or was revoked", _NOT_FOUND)
        return ttl

    def revoke(self, lease_id: int) -> None:
        """End the lease now, deleting its keys. A lease already gone is no error (the same outcome)."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        except EtcdError as e:
            if e.code != _NOT_FOUND:
                raise

    # -- watch -----------------------------------------------------------------------------------------

    def watch(self, key: Key, *, prefix: bool = False, start_revision: int = 0) -> Watch:
        """Follow changes to ``key`` (or under the prefix ``key``) from ``start_revision`` (0: from now).
        The watch ends when its stream does (a member stops, ``close()``): the follower starts a new
        one from the last revision it saw + 1, so nothing is missed."""
        request: dict[str, Any] = _range_request(key, prefix)
        if start_revision:
            request["start_revision"] = str(start_revision)
        body = json.dumps({"create_request": request}).encode()
        errors: list[str] = []
        for index in self._order():
            host, port = self.endpoints[index]
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            try:
                conn.connect()
                conn.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                if response.status != 200:
                    raise _Failed(f"HTTP {response.status}: {response.read()[:200]!r}")
                first = json.loads(response.readline() or b"{}")
                if not first.get("result", {}).get("created"):
                    raise _Failed(f"the watch was not created: {first}")
                # Created: from here the stream may be quiet for any length of time.
                if conn.sock is not None:
                    conn.sock.settimeout(None)
                self._preferred = index
                return Watch(conn, response)
            except (OSError, http.client.HTTPException, ValueError, _Failed) as e:
                conn.close()
                errors.append(f"{host}:{port}: {e}")
        raise EtcdUnavailable("no etcd endpoint started the watch: " + "; ".join(errors), _UNAVAILABLE)

    # -- the one request path --------------------------------------------------------------------------

    def _order(self) -> Iterator[int]:
        start = self._preferred
        n = len(self.endpoints)
        return ((start + i) % n for i in range(n))

    def _call(self, path: str, body: dict[str, Any], *, repeatable: bool = True) -> dict[str, Any]:
        errors: list[str] = []
        for index in self._order():
            host, port = self.endpoints[index]
            try:
                doc = self._once(host, port, path, body)
            except _NotSent as e:
                errors.append(f"{host}:{port}: {e}")
                continue
            except _Failed as e:
                errors.append(f"{host}:{port}: {e}")
                if repeatable:
                    continue
                raise EtcdUnavailable(f"etcd {path} at {host}:{port} failed after it was sent, so its outcome "
                                      f"is unknown (read the keys again to learn it): {e}", _UNAVAILABLE) from None
            self._preferred = index
            return doc
        raise EtcdUnavailable(f"etcd {path}: no endpoint answered, or the cluster has no quorum: "
                              + "; ".join(errors), _UNAVAILABLE)

    def _once(self, host: str, port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            try:
                conn.connect()
            except OSError as e:  # refused, unreachable, connect timeout: nothing was sent
                raise _NotSent(str(e) or type(e).__name__) from None
            try:
                conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as e:  # timeout or cut off after sending
                raise _Failed(str(e) or type(e).__name__) from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise _Failed(f"HTTP {response.status}, not JSON: {raw[:200]!r}") from None
        # A unary error: HTTP 4xx/5xx and {"error": msg, "message": msg, "code": grpc code}; an error in a
        # stream (keepalive): HTTP 200 and {"error": {"grpc_code": ..., "message": ...}}.
        streamed = doc.get("error") if isinstance(doc.get("error"), dict) else None
        if response.status == 200 and streamed is None:
            return doc
        error = streamed or doc
        code = _int(error.get("grpc_code", error.get("code")))
        message = str(error.get("message") or f"HTTP {response.status}")
        if code in (_UNAVAILABLE, _DEADLINE_EXCEEDED) or (code == 0 and response.status >= 500):
            raise _Failed(f"{message} (code {code})")  # no leader, request timed out, leader changed
        if code == _NOT_FOUND and "lease" in message:
            raise LeaseNotFound(message, code)
        raise EtcdError(f"etcd {path}: {message} (code {code})", code)


class Watch:
    """A watch's stream, read by a daemon thread into a queue, so ``next`` can wait with a timeout and
    ``close`` can end it from any thread (a timeout on the socket itself would spoil its reader)."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._response = response
        self._queue: queue.Queue[list[WatchEvent] | BaseException | None] = queue.Queue()
        self._closed = threading.Event()
        self.ended = threading.Event()  # the stream is over (closed, or the member went away)
        self._thread = threading.Thread(target=self._read, name="etcd-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                line = self._response.readline()
                if not line:
                    break
                doc = json.loads(line)
                if "error" in doc:
                    error = doc["error"]
                    # A stream's error names its code "grpc_code" (a unary error's is "code": see _post).
                    self._queue.put(EtcdError(f"the watch failed: {error.get('message', error)}",
                                              _int(error.get("grpc_code", error.get("code")))))
                    break
                result = doc.get("result", {})
                if result.get("canceled"):
                    self._queue.put(EtcdError(f"etcd canceled the watch: {result.get('cancel_reason', '')} "
                                              f"(compacted to {result.get('compact_revision', 0)})"))
                    break
                events = [WatchEvent("DELETE" if e.get("type") == "DELETE" else "PUT", KeyValue.from_json(e["kv"]))
                          for e in result.get("events", ())]
                if events:
                    self._queue.put(events)
        except (OSError, ValueError, http.client.HTTPException) as e:
            if not self._closed.is_set():
                self._queue.put(EtcdUnavailable(f"the watch's stream broke: {e}", _UNAVAILABLE))
        finally:
            self._conn.close()  # here, on the reader's thread: closing under a blocked read breaks http.client
            self.ended.set()
            self._queue.put(None)

    def next(self, timeout: float | None = None) -> list[WatchEvent]:
        """The next batch of events (one revision's, or several). Raises TimeoutError after ``timeout``,
        EtcdUnavailable / EtcdError when the stream broke, StopIteration when it ended."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no watch event within {timeout} s") from None
        if item is None:
            self._queue.put(None)  # stays ended for the next caller
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._closed.set()
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed by the other side
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread out of its blocking read
        self._thread.join(timeout=5)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Compare", "Delete", "DeleteResult", "EtcdClient", "EtcdError", "EtcdUnavailable", "Get", "KeyValue",
           "Lease", "LeaseNotFound", "Put", "PutResult", "RangeResult", "TxnResult", "Watch", "WatchEvent",
           "prefix_end"]
