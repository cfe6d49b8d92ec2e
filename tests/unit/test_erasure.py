"""Erasure (services/erasure.py): the Purge syscall and the lifecycle loop's purge take one code path.

A real kernel, activator and usage tracker (the activation rig, no model); one Erasure is given to the
servicer (behind a real gate and gRPC server, auth off) and to the lifecycle loop, as daemon.build wires
them. Each path purges an item that has usage counts: both must go through that one Erasure and leave
what only it removes beyond the kernel's purge (the item's usage counts), with the kernel's receipt kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from activation_rig import Rig, open_rig
from memos import Client

import memosd.kernel.clock as kernel_clock
from memosd.eventloop import EventLoopThread
from memosd.governance.access import AccessControl
from memosd.governance.audit import AuditLog
from memosd.governance.principals import Principals
from memosd.kernel.types import ItemInput
from memosd.kernel.usage import ItemUsage, UsageTracker
from memosd.services.erasure import Erasure
from memosd.services.lifecycle import LifecycleLoop
from memosd.store.records import PurgeReceipt
from memosd.syscalls.gate import Gate
from memosd.syscalls.registry import generic_handler
from memosd.syscalls.servicer import MemOSServicer


class RecordingErasure(Erasure):
    """The real Erasure, noting each call (cube, item ids) and its receipt."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[tuple[str, list[str], str]] = []  # cube, item ids asked for, purge id

    def erase(self, cube: str, item_ids: Sequence[str], source: str = "", tags: Sequence[str] = ()
              ) -> PurgeReceipt:
        receipt = super().erase(cube, item_ids, source, tags)
        self.calls.append((cube, list(item_ids), receipt.purge_id))
        return receipt


@dataclass
class Wired:
    rig: Rig
    client: Client  # to the servicer
    erasure: RecordingErasure  # the servicer's and the loop's
    usage: UsageTracker
    loop: LifecycleLoop


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[Wired]:
    rig = open_rig(tmp_path, "none")
    store = rig.kernel.store
    usage = UsageTracker(store)
    erasure = RecordingErasure(rig.kernel, rig.activator, usage)
    principals = Principals(store)
    audit = AuditLog(store)
    gate = Gate(principals, AccessControl(rig.kernel, principals), audit, rig.jobs, auth=False)
    servicer = MemOSServicer(rig.kernel, None, rig.activator, rig.generator, rig.adapters,  # type: ignore[arg-type]
                             rig.jobs, lambda: None, gate, usage, erasure=erasure)  # type: ignore[arg-type, return-value]
    lifecycle = LifecycleLoop(rig.kernel, audit, erasure.erase, interval=60, grace_seconds=0)
    events = EventLoopThread()

    async def make() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((generic_handler(servicer),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = events.call(make())
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        yield Wired(rig, client, erasure, usage, lifecycle)
    events.call(server.stop(0))
    gate.close()
    events.close()
    rig.close()


def _committed(rig: Rig, name: str, items: list[ItemInput]) -> tuple[str, list[str]]:
    """A new cube holding ``items`` at revision 1: its id and the item ids."""
    cube_id = rig.kernel.alloc_cube(name, "", {}).record.cube_id
    mount = rig.kernel.mount(cube_id, 0, True).record.mount_id
    ids, _ = rig.kernel.write(mount, items)
    rig.kernel.commit(mount, "add", "test")
    rig.kernel.unmount(mount)
    return cube_id, ids


def test_purge_and_the_lifecycle_purge_both_erase_through_the_one_erasure(wired: Wired,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rig, usage = wired.rig, wired.usage
    clock = [kernel_clock.now_ns()]
    monkeypatch.setattr(kernel_clock, "now_ns", lambda: clock[0])  # the loop's time moves only when told
    cube_a, (asked, kept) = _committed(rig, "asked", [ItemInput("asked for"), ItemInput("kept")])
    cube_b, (brief,) = _committed(rig, "brief", [ItemInput("brief", ttl_seconds=1)])
    usage.record("read", [cube_a, cube_b], [(cube_a, asked), (cube_a, kept), (cube_b, brief)])
    assert usage.item(cube_a, asked).hits == usage.item(cube_b, brief).hits == 1

    receipt = wired.client.purge(cube_a, [asked])  # the syscall
    assert list(receipt.item_ids) == [asked]
    assert wired.erasure.calls == [(cube_a, [asked], receipt.purge_id)]

    clock[0] += 1_050_000_000  # past the TTL, and the grace is 0: one pass expires then purges
    wired.loop.tick()
    (lifecycle_purge,) = rig.kernel.purges(cube_b)
    assert wired.erasure.calls[1:] == [(cube_b, [brief], lifecycle_purge.purge_id)]
    assert [r.purge_id for r in rig.kernel.purges(cube_a)] == [receipt.purge_id]

    # Both went all the way: the usage counts (which Kernel.purge does not touch) are gone with the items.
    assert usage.item(cube_a, asked) == usage.item(cube_b, brief) == ItemUsage()
    assert usage.item(cube_a, kept).hits == 1
