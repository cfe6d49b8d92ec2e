"""The owner's calls on the target during a move (cluster/move.py's MovePeer), over gRPC.

ReceiveCube streams the archive from its spool file in 1 MiB chunks; SettleCube asks the target to settle
the cube by the directory. Both carry the MoveCube caller's authorization header as it was sent (the
target checks it: principals are per node) and ``memosd-forwarded-by`` (they name no cube the router
would send elsewhere anyway). Any failure is MOVE_REFUSED naming the node, its address and its answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import memos_pb2_grpc

from memosd.errors import MoveRefused
from memosd.syscalls.cube_stream import CHUNK_BYTES
from memosd.syscalls.gate import AUTH_METADATA
from memosd.syscalls.router import HOP

RECEIVE_TIMEOUT = 600.0  # a large cube's archive: imported whole (vectors, indexes) before the answer
SETTLE_TIMEOUT = 10.0


class GrpcMovePeer:
    def __init__(self, node: str, authorization: Sequence[str], *, max_message_bytes: int) -> None:
        self._metadata: tuple[tuple[str, str | bytes], ...] = (
            *((AUTH_METADATA, value) for value in authorization), (HOP, node))
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]

    def _refused(self, call: str, address: str, error: grpc.RpcError) -> MoveRefused:
        code = error.code().name if isinstance(error, grpc.Call) else "UNKNOWN"
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        return MoveRefused(f"{call} on the target at {address} failed ({code}: {details}); the move is given up",
                           address=address)

    def receive(self, address: str, cube_id: str, from_node: str, epoch: int, owner_revision: int,
                archive: Path) -> int:
        size = archive.stat().st_size

        def messages() -> Iterator[pb.ReceiveCubeRequest]:
            yield pb.ReceiveCubeRequest(start=pb.ReceiveCubeStart(
                cube_id=cube_id, from_node=from_node, epoch=epoch, size_bytes=size, owner_revision=owner_revision))
            with archive.open("rb") as f:
                while data := f.read(CHUNK_BYTES):
                    yield pb.ReceiveCubeRequest(data=data)

        with grpc.insecure_channel(address, options=self._options) as channel:
            try:
                response = memos_pb2_grpc.MemOSStub(channel).ReceiveCube(messages(), metadata=self._metadata,
                                                                         timeout=RECEIVE_TIMEOUT)
            except grpc.RpcError as error:
                raise self._refused("ReceiveCube", address, error) from None
        return int(response.cube.head_revision)

    def settle(self, address: str, cube_id: str) -> bool:
        with grpc.insecure_channel(address, options=self._options) as channel:
            try:
                response = memos_pb2_grpc.MemOSStub(channel).SettleCube(
                    pb.SettleCubeRequest(cube_id=cube_id), metadata=self._metadata, timeout=SETTLE_TIMEOUT)
            except grpc.RpcError as error:
                raise self._refused("SettleCube", address, error) from None
        return bool(response.kept)


__all__ = ["GrpcMovePeer"]
