"""Concurrent syscalls on one cube: committers, editors, searchers and readers at once."""

from __future__ import annotations

import threading
import time

from daemon_proc import DaemonProcess
from memos import Client, CommitConflict


def test_concurrent_commits_edits_and_searches_stay_consistent(daemon: DaemonProcess, cube_name: str) -> None:
    with Client(daemon.address, token=daemon.token) as c:
        c.alloc_cube(cube_name)
        with c.mount(cube_name, writable=True) as m:
            seed = m.write([f"seed fact {i} about harbours" for i in range(20)], tags=["seed"])
            m.commit()
    errors: list[BaseException] = []
    conflicts = 0
    stop = time.monotonic() + 6
    lock = threading.Lock()

    def guarded(fn):  # type: ignore[no-untyped-def]
        def run() -> None:
            try:
                with Client(daemon.address, token=daemon.token, timeout=60) as client:
                    while time.monotonic() < stop:
                        fn(client)
            except BaseException as error:
                errors.append(error)
        return run

    def appender(client: Client) -> None:
        with client.mount(cube_name, writable=True) as m:
            m.write([f"appended note {time.monotonic_ns()} about ships"], tags=["t1", "t2"])
            m.commit()

    def editor(client: Client) -> None:
        nonlocal conflicts
        with client.mount(cube_name, writable=True) as m:
            target = seed[time.monotonic_ns() % len(seed)]
            m.write([{"item_id": target, "text": f"edited fact {time.monotonic_ns()} about harbours",
                      "tags": ["seed"]}])
            try:
                m.commit()
            except CommitConflict:
                with lock:
                    conflicts += 1

    def searcher(client: Client) -> None:
        with client.mount(cube_name) as m:
            base = m.base_revision
            for mode in ("hybrid", "dense", "lexical"):
                hits = m.search("harbours and ships", k=15, mode=mode)
                assert hits.response.headers[0].read_revision == base
                assert all(h.item.born_revision <= base for h in hits)
            tagged = m.search("ships", k=50, tags_all=["t1"])
            assert all("t1" in h.item.tags for h in tagged)
            # What a mount reads is exactly its revision: 20 seed items plus the appends up to it.
            items = list(m.iter_items())
            assert len([i for i in items if "seed" in i.tags]) == 20

    workers = [appender, appender, editor, editor, searcher, searcher]
    threads = [threading.Thread(target=guarded(w)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    with Client(daemon.address, token=daemon.token) as c:
        head = c.stat_cube(cube_name).head_revision
        assert head > 10, "the writers should have committed many revisions in 6 s"
        log = list(c.log(cube_name))
        assert [r.number for r in log] == list(range(head, 0, -1))
        with c.mount(cube_name) as m:
            assert m.info.base_revision == head
            assert len(list(m.iter_items())) == c.stat_cube(cube_name).item_count
