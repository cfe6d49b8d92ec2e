"""ListCubes on a cluster node: every cube in the cluster, one page at a time, in cube id order.

The node lists its own page as a single node does; it asks each other owner the directory names (its
watch-fed view, cluster/view.py) for the same page of its own (``local`` set, the caller's token passed
on, so each owner filters by the caller's rights as it always has and fills in its own stats); and a
cube whose owner is not a live member, or does not answer in time, is listed from the directory alone
(id, name, owner node) with ``unavailable`` set, if the caller may see it by what this node can check:
an admin, a grant (grants are cluster-wide, cluster/grants.py), or the cube's owning principal as its
directory entry names it (an entry an older memosd wrote has none: that owner sees it again when its
node is back).

Why forwarding the owners' stats rather than listing names from the directory only: a listing that
showed item counts, HEAD and mounts for some cubes and not others would be a different call on a
cluster; asking the owners costs one round trip to each, in parallel, and a dead one costs its timeout
at most once per page. ``local`` keeps the old answer (this node's cubes) for a caller who wants it.

Paging: every answer is the first ``page_size`` cubes after the token's id in that node's order, so the
merged first ``page_size`` are exact, up to the smallest last id of an answer that had more (ids past it
from the others wait for the next page). A node's cube whose entry names another owner (a copy a move
left, or one it does not serve) is left out: the owner lists it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import grpc
from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import memos_pb2_grpc
from memosd_client.v1 import types_pb2 as t

from memosd.cluster.directory import Entry
from memosd.cluster.view import DirectoryView
from memosd.kernel.paging import decode_token, encode_token, page_size
from memosd.logfmt import log_event
from memosd.syscalls.gate import AUTH_METADATA
from memosd.syscalls.router import HOP

log = logging.getLogger("memosd.cluster")
ASK_TIMEOUT = 5.0  # seconds an owner has to answer its page before its cubes are listed as unavailable


class ClusterLister:
    def __init__(self, view: DirectoryView, node: str, *, credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = 64 << 20, timeout: float = ASK_TIMEOUT) -> None:
        self.view = view
        self.node = node
        self.timeout = timeout
        self._credentials = credentials
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> memos_pb2_grpc.MemOSStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = (
                    grpc.secure_channel(address, self._credentials, options=self._options)
                    if self._credentials is not None else grpc.insecure_channel(address, options=self._options))
        return memos_pb2_grpc.MemOSStub(channel)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def page(self, request: pb.ListCubesRequest, authorization: Sequence[str], own: list[t.Cube], own_next: str,
             visible: Callable[[Entry], bool]) -> tuple[list[t.Cube], str]:
        """The cluster's page: ``own`` (this node's page, its next token ``own_next``) merged with the other
        owners' pages and the unavailable cubes the caller may see (``visible``, by directory entry)."""
        size = page_size(request.page_size)
        after = str(decode_token(request.page_token, "cubes") or "")
        by_owner: dict[str, list[Entry]] = {}
        for entry in self.view.entries():
            if entry.cube_id > after and entry.owner != self.node:
                by_owner.setdefault(entry.owner, []).append(entry)
        metadata = (*((AUTH_METADATA, value) for value in authorization), (HOP, self.node))
        asked = pb.ListCubesRequest(page_size=size, page_token=request.page_token, local=True)
        pending: dict[str, grpc.Future[pb.ListCubesResponse]] = {}
        down: dict[str, str] = {}  # owner -> why its cubes are listed as unavailable
        for node in sorted(by_owner):
            owner = self.view.owner(node)
            if not owner.live:
                down[node] = "not a live cluster member"
                continue
            pending[node] = self._stub(owner.address).ListCubes.future(asked, metadata=metadata,
                                                                       timeout=self.timeout)
        merged: dict[str, t.Cube] = {}
        bounds: list[str] = []  # the last id of each answer that had more

        def take(node: str, cubes: Sequence[t.Cube], next_token: str) -> None:
            for cube in cubes:
                entry = self.view.entry(cube.cube_id)
                if entry is None or entry.owner == node:
                    cube.owner_node = node
                    merged[cube.cube_id] = cube
            if next_token:
                bounds.append(str(decode_token(next_token, "cubes")))

        take(self.node, own, own_next)
        for node, future in pending.items():
            try:
                answer: pb.ListCubesResponse = future.result()
            except grpc.RpcError as error:
                code = error.code().name if isinstance(error, grpc.Call) else "UNKNOWN"
                details = error.details() if isinstance(error, grpc.Call) else str(error)
                down[node] = f"did not answer ({code}: {details})"
                continue
            take(node, answer.cubes, answer.next_page_token)
        for node, why in down.items():
            log_event(log, "cluster_list_owner_unavailable", level=logging.DEBUG, owner=node, reason=why)
            for entry in by_owner[node]:
                if entry.cube_id not in merged and visible(entry):
                    merged[entry.cube_id] = t.Cube(cube_id=entry.cube_id, name=entry.name, owner_node=node,
                                                   unavailable=True)
        ids = sorted(merged)
        bound = min(bounds) if bounds else None
        if bound is not None:
            ids = [cube_id for cube_id in ids if cube_id <= bound]
        shown = ids[:size]
        more = bound is not None or len(ids) > size
        last = shown[-1] if shown else bound
        return [merged[cube_id] for cube_id in shown], encode_token("cubes", last) if more and last else ""


__all__ = ["ClusterLister"]
