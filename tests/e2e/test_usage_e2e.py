"""Usage through a real daemon: Search, Read and Generate are counted per cube (StatCube) and per item
(Read's hit_count and last_used_time), and the counts survive a restart."""

from __future__ import annotations

from pathlib import Path

from daemon_proc import DaemonProcess
from memos import Client


def test_usage_is_counted_shown_and_kept_across_a_restart(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data").start()
    try:
        with Client(daemon.address, token=daemon.token) as c:
            c.alloc_cube("used")
            with c.mount("used", writable=True) as m:
                owls, river = m.write(["owls hunt at night", "the river is green"])
                m.commit("seed")
            with c.mount("used") as m:
                assert [h.item.item_id for h in m.search("owls night", k=1, mode="lexical")] == [owls]
                m.read([owls])
                listed = {i.item_id: i for i in m.iter_items()}  # listing is not a use
            assert listed[owls].hit_count == 2 and listed[owls].HasField("last_used_time")
            assert listed[river].hit_count == 0
            usage = c.stat_cube("used").usage
            assert (usage.searches, usage.reads, usage.generations, usage.item_hits) == (1, 1, 0, 2)
            assert usage.items_tracked == 1 and usage.HasField("last_used_time")
    finally:
        assert daemon.stop() == 0
    restarted = DaemonProcess(tmp_path / "data").start()
    try:
        with Client(restarted.address, token=restarted.token) as c:
            usage = c.stat_cube("used").usage
            assert (usage.searches, usage.reads, usage.item_hits) == (1, 1, 2)
            with c.mount("used") as m:
                assert {i.item_id: i.hit_count for i in m.iter_items()}[owls] == 2
    finally:
        restarted.stop()
