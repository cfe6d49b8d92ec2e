"""The etcd watch stream's error line, read without an etcd (tests/cluster/ runs the real one): the gateway
names a streamed error's code "grpc_code", not "code" as in a unary answer."""

from __future__ import annotations

import io
import json

import pytest

from memosd.cluster.etcd import EtcdError, Watch


class _Conn:
    sock = None

    def close(self) -> None:
        pass


def test_a_streamed_watch_error_keeps_its_grpc_code() -> None:
    line = json.dumps({"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader",
                                 "http_status": "Service Unavailable"}}).encode() + b"\n"
    watch = Watch(_Conn(), io.BytesIO(line))  # type: ignore[arg-type]  # what Watch reads: readline()
    with pytest.raises(EtcdError, match="no leader") as raised:
        watch.next(timeout=5)
    assert raised.value.code == 14  # UNAVAILABLE; read from "code" it was 0
    watch.close()
