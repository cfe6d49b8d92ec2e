"""The OpenAI-compatible HTTP surface on a cluster: three real daemons (each with the tiny model and
``[http] listen``) against the real etcd; a chat through any node is served by its cubes' owner.

The module's own rig (tests/cluster/node_rig.py, started once, shared by the tests, auth off as in
test_routing.py): one cube with one committed fact on each node. The test that SIGKILLs a node restarts it.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from daemon_proc import DaemonProcess
from etcd_rig import EtcdCluster
from memosd_client import NO_RETRY, Client
from node_rig import NODES, ThreeNodes
from tiny_llama import save_tiny_llama

from memosd.cluster.directory import Directory

Cubes = dict[str, str]  # node ("alpha") -> the name of a cube it owns


@pytest.fixture(scope="module")
def nodes(etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory, run: str, three_nodes: ThreeNodes
          ) -> Iterator[dict[str, DaemonProcess]]:
    root = tmp_path_factory.mktemp("http-routing")
    model = save_tiny_llama(root / "tiny-model", context=512)
    env = {"MEMOSD_RUNTIME__MODEL": str(model), "MEMOSD_RUNTIME__DEVICE": "cpu", "MEMOSD_HTTP__LISTEN": "127.0.0.1:0"}
    with three_nodes(etcd_cluster, root, run, env) as procs:
        yield procs


def _client(proc: DaemonProcess) -> Client:
    return Client(proc.address, timeout=60, retry=NO_RETRY)


@pytest.fixture(scope="module")
def cubes(nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str) -> Cubes:
    """A cube on each node (allocated through alpha until each node has one), each with a committed fact,
    activated."""
    directory = Directory(etcd_cluster.client())
    found: Cubes = {}
    with _client(nodes["alpha"]) as via_a:
        for i in range(60):
            cube = via_a.alloc_cube(f"chat-{run}-{i}")
            node = directory.lookup(cube.cube_id).owner.rsplit("-", 1)[0]  # type: ignore[union-attr]
            if node in found:
                via_a.free_cube(cube.cube_id)
                continue
            with via_a.mount(cube.name, writable=True) as m:
                m.write([f"The launch code kept by {node} is {1000 + i}."])
                m.commit()
            with via_a.mount(cube.name) as m:
                m.activate()  # its KV blocks, on the owner: a chat's reply then carries the block's items
            found[node] = cube.name
            if len(found) == len(NODES):
                return found
    raise AssertionError(f"60 cubes did not land on all three nodes: {found}")


def _base(proc: DaemonProcess) -> str:
    """The node's HTTP address now (a restarted node has new ports)."""
    return "http://" + json.loads((proc.data_dir / "daemon.json").read_text())["http_address"] + "/v1"


def _post(proc: DaemonProcess, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{_base(proc)}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _stream(proc: DaemonProcess, body: dict[str, Any]) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{_base(proc)}/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        for line in response:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def _models(proc: DaemonProcess) -> list[str]:
    with urllib.request.urlopen(f"{_base(proc)}/models", timeout=60) as response:
        return [model["id"] for model in json.loads(response.read())["data"]]


def _chat(cube: str, **extra: Any) -> dict[str, Any]:
    return {"model": f"memos:{cube}", "messages": [{"role": "user", "content": "What is the launch code?"}],
            "temperature": 0, "max_tokens": 8, **extra}


def _mounts(via: Client, cube: str) -> int:
    deadline = time.monotonic() + 30  # the unmount follows the reply; a bound for it to come, not a speed claim
    while (count := via.stat_cube(cube).mount_count) and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_a_chat_through_any_node_is_served_by_the_owner_alike(nodes: dict[str, DaemonProcess], cubes: Cubes,
                                                             run: str) -> None:
    cube = cubes["gamma"]
    status, owner = _post(nodes["gamma"], _chat(cube))
    assert status == 200, owner
    [used] = owner["memos"]["cubes"]
    assert used["cube"] == cube and used["revision"] == 1 and len(used["block_items"]) == 1
    with _client(nodes["alpha"]) as via_a:
        forwarded = via_a.stats().cluster.forwarded_calls
        seen = max((r.seq for r in via_a.audit(cube=cube)), default=0)  # gamma's records so far
        for via in ("alpha", "beta"):  # the same reply, the same memory, through the two nodes that lack the cube
            status, reply = _post(nodes[via], _chat(cube))
            assert status == 200, reply
            assert reply["choices"][0]["message"] == owner["choices"][0]["message"]
            assert reply["memos"]["cubes"] == owner["memos"]["cubes"]
            assert reply["usage"]["completion_tokens"] == owner["usage"]["completion_tokens"]
        assert via_a.stats().cluster.forwarded_calls > forwarded  # sent to gamma: alpha holds no such cube
        assert cube not in {x.name for x in via_a.list_cubes(local=True)}
        # Streaming through alpha: the same text, and the same account in the last chunk.
        events = _stream(nodes["alpha"], _chat(cube, stream_options={"include_usage": True}))
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
        assert text == owner["choices"][0]["message"]["content"]
        assert events[-1]["memos"]["cubes"] == owner["memos"]["cubes"]
        # The owner served the three calls as gRPC Generates (its audit, read through alpha; the chat made on
        # gamma itself is its OpenAI.ChatCompletions record) and closed every mount.
        generates = [r for r in via_a.audit(cube=cube, method="Generate") if r.seq > seen]
        assert [r.code for r in generates] == ["OK"] * 3
        assert _mounts(via_a, cube) == 0


def test_memos_remember_on_another_nodes_cube(nodes: dict[str, DaemonProcess], cubes: Cubes) -> None:
    status, reply = _post(nodes["alpha"], _chat(cubes["beta"], memos={"remember": cubes["beta"],
                                                                     "request_id": f"http-{uuid.uuid4().hex}"}))
    assert status == 200, reply
    remembered = reply["memos"]["remembered"]
    assert remembered["revision"] >= 2 and remembered["item_ids"]
    with _client(nodes["gamma"]) as via_c:
        assert via_c.stat_cube(cubes["beta"]).head_revision == remembered["revision"]
        assert _mounts(via_c, cubes["beta"]) == 0  # the read-write mount on beta is gone


def test_cubes_on_two_nodes_are_refused_saying_which_is_where(nodes: dict[str, DaemonProcess], cubes: Cubes,
                                                              run: str) -> None:
    body = {**_chat(cubes["beta"]), "model": "memosd", "memos": {"cubes": [cubes["beta"], cubes["gamma"]]}}
    status, reply = _post(nodes["alpha"], body)
    assert status == 400, reply
    error = reply["error"]
    assert error["code"] == "INVALID_FIELD" and error["param"] == "memos.cubes"
    assert f"{cubes['beta']!r} on 'beta-{run}'" in error["message"]
    assert f"{cubes['gamma']!r} on 'gamma-{run}'" in error["message"]
    # An owner's own refusal comes back with its reason: beta's cube has no revision 9.
    status, reply = _post(nodes["alpha"], _chat(cubes["beta"], memos={"revision": 9}))
    assert status == 404 and reply["error"]["code"] == "REVISION_NOT_FOUND", reply


def test_models_through_any_node_list_every_nodes_cubes(nodes: dict[str, DaemonProcess], cubes: Cubes) -> None:
    for proc in nodes.values():
        listed = _models(proc)
        assert listed[0] == "memosd"
        assert {f"memos:{name}" for name in cubes.values()} <= set(listed), listed


def test_a_client_leaving_mid_stream_unmounts_on_the_owner(nodes: dict[str, DaemonProcess], cubes: Cubes) -> None:
    cube = cubes["gamma"]
    host, port = _base(nodes["alpha"]).removeprefix("http://").removesuffix("/v1").split(":")
    with _client(nodes["alpha"]) as via_a:
        seen = max((r.seq for r in via_a.audit(cube=cube)), default=0)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {**_chat(cube), "stream": True, "max_tokens": 200}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # mid-stream
    with _client(nodes["alpha"]) as via_a:
        assert _mounts(via_a, cube) == 0
        # The Generate on gamma was cancelled, not run to its 200 tokens.
        assert [r.code for r in via_a.audit(cube=cube, method="Generate") if r.seq > seen] == ["CANCELLED"]


def test_a_dead_owners_cube_is_503_naming_it(nodes: dict[str, DaemonProcess], cubes: Cubes, run: str) -> None:
    gamma = nodes["gamma"]
    address = gamma.address
    gamma.kill()
    try:
        for why in ("cannot be reached", "not a live cluster member"):  # at once, and once its lease is gone
            deadline = time.monotonic() + 30
            while True:
                status, reply = _post(nodes["alpha"], _chat(cubes["gamma"]))
                assert status == 503, reply
                error = reply["error"]
                assert error["code"] == "CUBE_UNAVAILABLE" and error["type"] == "service_unavailable_error"
                assert f"cluster node 'gamma-{run}' at {address}" in error["message"], error
                if why in error["message"] or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert why in error["message"], error
        # The others still serve through alpha, and the model list still answers (gamma's cube listed from
        # the directory).
        status, reply = _post(nodes["alpha"], _chat(cubes["beta"]))
        assert status == 200, reply
        assert f"memos:{cubes['gamma']}" in _models(nodes["alpha"])
    finally:
        gamma.start()
    deadline = time.monotonic() + 30
    while (status := _post(nodes["alpha"], _chat(cubes["gamma"]))[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200
