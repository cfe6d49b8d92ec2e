"""memosctl finds its daemon: --data-dir / $MEMOSD_DATA_DIR give the address (daemon.json) and the token
(admin.token); an UNAUTHENTICATED answer names the token that was refused. Against an in-process fake
daemon that knows one token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from memos.cli.main import main
from memos.v1 import memos_pb2, memos_pb2_grpc, types_pb2

GOOD = "mtk.prn_admin.good"


class TokenCheckingMemOS(memos_pb2_grpc.MemOSServicer):
    """ListCubes answers one cube to the bearer of GOOD, UNAUTHENTICATED to anyone else."""

    def ListCubes(self, request: memos_pb2.ListCubesRequest, context: grpc.ServicerContext
                  ) -> memos_pb2.ListCubesResponse:
        if ("authorization", f"Bearer {GOOD}") not in tuple(context.invocation_metadata()):
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason="UNAUTHENTICATED", domain="memosd.v1"))
            context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=grpc.StatusCode.UNAUTHENTICATED.value[0], message="unknown or revoked token", details=[detail])))
        return memos_pb2.ListCubesResponse(cubes=[types_pb2.Cube(cube_id="cube_0001", name="notes")])


@pytest.fixture
def address(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    for var in ("MEMOS_TARGET", "MEMOS_TOKEN", "MEMOS_TOKEN_FILE", "MEMOSD_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # the default admin.token: absent
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    memos_pb2_grpc.add_MemOSServicer_to_server(TokenCheckingMemOS(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def data_dir(root: Path, address: str, token: str) -> Path:
    """What a running memosd leaves in its data dir: daemon.json and admin.token."""
    root.mkdir(parents=True)
    (root / "daemon.json").write_text(json.dumps({"pid": 1, "address": address, "metrics_address": ""}))
    (root / "admin.token").write_text(token + "\n")
    return root


def test_data_dir_flag_gives_address_and_token(address: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = data_dir(tmp_path / "data", address, GOOD)
    assert main(["--data-dir", str(root), "-o", "json", "cube", "list"]) == 0
    assert [c["name"] for c in json.loads(capsys.readouterr().out)["cubes"]] == ["notes"]


def test_data_dir_env_works_like_the_flag_and_target_still_wins(address: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = data_dir(tmp_path / "data", "127.0.0.1:1", GOOD)  # daemon.json names a dead port
    monkeypatch.setenv("MEMOSD_DATA_DIR", str(root))
    assert main(["--timeout", "2", "--retries", "0", "cube", "list"]) == 4  # it went to daemon.json's address
    assert "is memosd running at 127.0.0.1:1?" in capsys.readouterr().err
    assert main(["--target", address, "cube", "list"]) == 0  # --target wins; the token is still admin.token's
    assert "notes" in capsys.readouterr().out


def test_data_dir_without_a_running_daemon_says_so(address: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--data-dir", str(empty), "cube", "list"]) == 4
    assert capsys.readouterr().err == (f"memosctl: error: no memosd is running on data dir {empty} (no "
                                       f"{empty / 'daemon.json'}); start it with memosd --data-dir {empty}\n")


def test_refused_token_names_its_source(address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = data_dir(tmp_path / "data", address, "mtk.prn_admin.stale")
    assert main(["--data-dir", str(root), "cube", "list"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("memosctl: error: UNAUTHENTICATED: unknown or revoked token; the token from "
                          f"{root / 'admin.token'} was refused by {address}: pass --token-file FILE"), err
    # The default data dir's token, sent to a daemon of another data dir: the message names that file.
    default = tmp_path / "xdg" / "memosd" / "admin.token"
    default.parent.mkdir(parents=True)
    default.write_text("mtk.prn_admin.other\n")
    assert main(["--target", address, "cube", "list"]) == 3
    assert f"the token from {default} was refused" in capsys.readouterr().err
    monkeypatch.setenv("MEMOS_TOKEN", "mtk.prn_admin.env")
    assert main(["--target", address, "cube", "list"]) == 3
    assert "the token from $MEMOS_TOKEN was refused" in capsys.readouterr().err


def test_no_token_at_all_says_none_was_sent(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", address, "cube", "list"]) == 3
    err = capsys.readouterr().err
    assert "; memosctl sent no token (none given, and no readable " in err and "--data-dir DIR" in err, err
