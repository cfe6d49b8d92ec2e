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
    appended: list[int] = []  # the revision each append committed
    edited: dict[str, tuple[int, str]] = {}  # item -> (revision, text) of its latest committed edit
    edits_committed = 0
    writers_done = threading.Event()  # searchers run until every writer has finished its rounds
    lock = threading.Lock()
    rounds = 8  # a fixed amount of work per writer, not a wall-clock window

    def guarded(fn, repeat: bool):  # type: ignore[no-untyped-def]
        def run() -> None:
            try:
                with Client(daemon.address, token=daemon.token, timeout=60) as client:
                    if repeat:
                        while not writers_done.is_set():
                            fn(client)
                    else:
                        for n in range(rounds):
                            fn(client, n)
            except BaseException as error:
                errors.append(error)
        return run

    def appender(client: Client, n: int) -> None:
        with client.mount(cube_name, writable=True) as m:
            m.write([f"appended note {time.monotonic_ns()} about ships"], tags=["t1", "t2"])
            revision = m.commit().revision.number
            with lock:
                appended.append(revision)

    def editor(client: Client, n: int) -> None:
        nonlocal conflicts, edits_committed
        with client.mount(cube_name, writable=True) as m:
            target = seed[(n * 7 + time.monotonic_ns()) % 4]  # 4 targets for 2 editors: they collide
            text = f"edited fact {time.monotonic_ns()} about harbours"
            m.write([{"item_id": target, "text": text, "tags": ["seed"]}])
            try:
                revision = m.commit().revision.number
            except CommitConflict:
                with lock:
                    conflicts += 1
                # Aborted, the staging kept: the mount still reads its own edit.
                assert [i.text for i in m.read([target])] == [text]
                return
            with lock:
                edits_committed += 1
                if revision > edited.get(target, (0, ""))[0]:
                    edited[target] = (revision, text)

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

    writers = [threading.Thread(target=guarded(w, False)) for w in (appender, appender, editor, editor)]
    searchers = [threading.Thread(target=guarded(searcher, True)) for _ in range(2)]
    for thread in writers + searchers:
        thread.start()
    for thread in writers:
        thread.join(300)  # generous: a loaded 2-core CI machine; the property is consistency, not speed
    writers_done.set()
    for thread in searchers:
        thread.join(120)
    assert not errors, errors[:3]
    # Every edit either committed or was refused as a conflict; every commit made exactly one revision.
    assert edits_committed + conflicts == 2 * rounds and len(appended) == 2 * rounds
    with Client(daemon.address, token=daemon.token) as c:
        head = c.stat_cube(cube_name).head_revision
        assert head == 1 + len(appended) + edits_committed
        log = list(c.log(cube_name))
        assert [r.number for r in log] == list(range(head, 0, -1))
        with c.mount(cube_name) as m:
            assert m.info.base_revision == head
            items = list(m.iter_items())
            assert len(items) == c.stat_cube(cube_name).item_count == 20 + len(appended)
            # The edits took effect: each edited item holds the text of its last committed edit.
            texts = {i.item_id: i.text for i in items}
            assert edited and all(texts[item] == text for item, (_, text) in edited.items())
