"""The daemon as a process: restarts, crashes, shutdown, systemd notify, health and reflection."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from memos import Client, MemosError


def write_commit(client: Client, cube: str, texts: list[str], tags: list[str] | None = None) -> int:
    with client.mount(cube, writable=True) as m:
        m.write(texts, tags=tags or [])
        return int(m.commit().revision.number)


def test_restart_keeps_everything_and_rebuilds_missing_indexes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = DaemonProcess(data).start()
    with Client(first.address, token=first.token) as c:
        c.alloc_cube("keep")
        write_commit(c, "keep", ["the harbour freezes in January", "owls hunt at night"])
        write_commit(c, "keep", ["the bakery opens at seven"])
        kept_open = c.mount("keep", writable=True)  # left open across the restart
        kept_open.write(["staged but not committed"])
        staged_mount = kept_open.mount_id
    assert first.stop() == 0
    assert not (data / "daemon.json").exists(), "clean shutdown removes daemon.json"

    shutil.rmtree(data / "index")  # the derived indexes are rebuilt from RocksDB
    second = DaemonProcess(data).start()
    try:
        with Client(second.address, token=second.token) as c:
            assert c.stat_cube("keep").head_revision == 2
            with c.mount("keep") as m:
                assert m.search("when does the bakery open", k=1)[0].item.text == "the bakery opens at seven"
                assert m.search("harbour", k=1, mode="lexical")[0].item.text.startswith("the harbour")
            # Mounts and their staging survive a restart.
            assert "staged but not committed" in [i.text for i in c.iter_items(staged_mount)]
            assert c.commit(staged_mount).revision.number == 3
    finally:
        assert second.stop() == 0


def test_sigkill_during_commits_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon = DaemonProcess(data).start()
    cubes = ["crash-a", "crash-b"]
    with Client(daemon.address, token=daemon.token) as c:
        for cube in cubes:
            c.alloc_cube(cube)
    acked: list[tuple[str, int, str]] = []  # (cube, revision, batch tag)
    lock = threading.Lock()
    stop = threading.Event()

    def worker(n: int) -> None:
        cube = cubes[n % 2]
        with Client(daemon.address, token=daemon.token, timeout=10) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                tag = f"w{n}b{i}"
                texts = [f"{tag} token{tag}x{j} record" for j in range(3)]
                try:
                    revision = write_commit(c, cube, texts, [tag])
                except MemosError:
                    return  # the daemon died under us
                with lock:
                    acked.append((cube, revision, tag))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon.kill()  # SIGKILL with commits in flight
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(acked) >= 24, "too few commits before the kill to mean anything"

    restarted = DaemonProcess(data).start()
    try:
        with Client(restarted.address, token=restarted.token) as c:
            for cube in cubes:
                head = c.stat_cube(cube).head_revision
                mine = [(rev, tag) for cb, rev, tag in acked if cb == cube]
                assert all(rev <= head for rev, _ in mine), "an acknowledged revision is missing"
                log = {r.number: r for r in c.log(cube)}
                assert sorted(log) == list(range(1, head + 1)), "revisions must be contiguous"
                with c.mount(cube) as m:
                    items = list(m.iter_items())
                    by_tag: dict[str, list[str]] = {}
                    for item in items:
                        by_tag.setdefault(item.tags[0], []).append(item.text)
                    # Every commit is whole: each batch present has all 3 of its items.
                    assert all(len(texts) == 3 for texts in by_tag.values()), by_tag
                    for _, tag in mine:
                        assert tag in by_tag, f"acknowledged batch {tag} lost"
                    assert len(items) == 3 * head == log[head].item_count
                    for rev in range(1, head + 1):
                        assert log[rev].added == 3 and log[rev].item_count == 3 * rev
                    # Search agrees with the store: each batch's unique token finds exactly its items.
                    for tag in list(by_tag)[:: max(1, len(by_tag) // 15)]:
                        hits = m.search(f"token{tag}x1", k=3, mode="lexical")
                        assert hits[0].item.tags == [tag]
                        dense = m.search(by_tag[tag][0], k=1, mode="dense")
                        assert dense[0].item.text in by_tag[tag] or dense[0].dense_score > 0.95
                    total = m.search("record", k=1000, mode="lexical")
                    assert len(total) == len(items), "search sees exactly the committed items"
    finally:
        assert restarted.stop() == 0


def test_sigterm_drains_and_second_daemon_on_same_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon = DaemonProcess(data).start()
    try:
        clash = DaemonProcess(data)
        with pytest.raises(RuntimeError, match="in use by another memosd"):
            clash.start()
    finally:
        assert daemon.stop() == 0
    assert "event=stopped" in daemon.log()


def test_systemd_notify_protocol(tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(120)
    daemon = DaemonProcess(tmp_path / "data", env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"})
    daemon.start()
    try:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        ready = next(m for m in messages if "READY=1" in m)
        assert f"MAINPID={daemon.proc.pid}" in ready and "STATUS=" in ready  # type: ignore[union-attr]
        # The daemon answers the watchdog (WATCHDOG_USEC=0.4 s: pings every 0.2 s).
        pings = 0
        deadline = time.monotonic() + 10
        while pings < 3 and time.monotonic() < deadline:
            pings += listener.recv(4096).decode().count("WATCHDOG=1")
        assert pings >= 3
        # It was serving when it said READY.
        with Client(daemon.address, token=daemon.token) as c:
            assert c.stats().version
    finally:
        assert daemon.stop() == 0
    rest = []
    listener.settimeout(5)
    try:
        while True:
            rest.append(listener.recv(4096).decode())
    except TimeoutError:
        pass
    assert any("STOPPING=1" in m for m in rest)
    listener.close()


def test_health_and_reflection(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "memos.v1.MemOS"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert {"memos.v1.MemOS", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="memos.v1.MemOS")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert response.file_descriptor_response.file_descriptor_proto
        # v1 too, with the same messages (v1 is v1alpha promoted, field for field).
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                   request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                   response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        response = next(v1(iter([request]), timeout=10))
        assert response.file_descriptor_response.file_descriptor_proto
        listed = next(v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert {s.name for s in listed.list_services_response.service} == names


def test_stats(client: Client) -> None:
    stats = client.stats()
    assert stats.embedder and stats.embedding_dim == 384
    assert stats.rss_bytes > 50_000_000 and stats.store_bytes > 0
    assert stats.calls["Stats"] >= 1
    assert client.stats().calls["Stats"] == stats.calls["Stats"] + 1  # this very call was counted


def test_sigterm_lets_an_in_flight_write_finish_and_keeps_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Embedding 1024 items takes seconds on an idle machine and can take far longer than the default 10 s
    # grace on a loaded 2-core CI runner; the drain is what is tested here, not how fast the embedder is.
    daemon = DaemonProcess(data, env={"MEMOSD_SERVER__GRACE_SECONDS": "300"}).start()
    with Client(daemon.address, token=daemon.token, timeout=300) as c:
        c.alloc_cube("drain")
        mount = c.mount("drain", writable=True)
        texts = [f"memory {i}: the quick brown fox jumps over the lazy dog near the river bank" for i in range(1024)]
        result: dict[str, object] = {}

        def write() -> None:
            try:
                result["ids"] = mount.write(texts)
            except MemosError as error:
                result["error"] = error

        writer = threading.Thread(target=write)
        writer.start()
        # SIGTERM only once the daemon is running the Write: it counts a call when it starts serving it.
        # The deadline is generous because the machine may be loaded; the Write is admitted in milliseconds.
        deadline = time.monotonic() + 120
        while c.stats().calls.get("Write", 0) < 1:
            assert time.monotonic() < deadline, "the Write never reached the daemon"
            time.sleep(0.01)
        assert daemon.proc is not None
        daemon.proc.terminate()  # SIGTERM while the Write is in flight
        writer.join(600)
        assert daemon.proc.wait(600) == 0
    assert "error" not in result, result.get("error")
    assert len(result["ids"]) == 1024  # type: ignore[arg-type]
    # The Write was still in flight at SIGTERM: the daemon logged its end after it began stopping.
    log = daemon.full_log()
    stopping = log.index("event=stopping")
    assert "event=syscall method=Write" in log[stopping:], log[-20000:]
    restarted = DaemonProcess(data).start()
    try:
        with Client(restarted.address, token=restarted.token) as c:
            staged = list(c.iter_items(mount.mount_id))
            assert len(staged) == 1024 and all(i.staged for i in staged)
            assert c.commit(mount.mount_id).revision.added == 1024
    finally:
        assert restarted.stop() == 0
