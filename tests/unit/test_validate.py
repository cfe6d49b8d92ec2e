"""Semantic bounds live in kernel/validate.py and the kernel applies them, so a caller inside the daemon (the
scheduler, the lifecycle loop) meets the same checks as a syscall; the converters check only wire shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from activation_rig import Rig, open_rig
from memos.v1 import types_pb2 as t

from memosd.errors import InvalidField
from memosd.kernel import validate
from memosd.kernel.types import ItemInput
from memosd.syscalls import convert as cv


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path, "none")
    yield r
    r.close()


def test_a_policy_is_bounded_by_the_kernel_whoever_sets_it(rig: Rig) -> None:
    rig.kernel.alloc_cube("c", "", {})
    wire = cv.policy_values(t.CubePolicy(working_set_size=validate.MAX_WORKING_SET + 1))
    for values in (wire, {"working_set_size": validate.MAX_WORKING_SET + 1}):  # a syscall's, the scheduler's
        with pytest.raises(InvalidField, match=r"policy\.working_set_size is 10001; at most 10000") as refused:
            rig.kernel.set_policy("c", values)
        assert refused.value.metadata["field"] == "policy.working_set_size"
    with pytest.raises(InvalidField, match=r"policy.drift_threshold is 1.5; use 0 \(the default\) to 1"):
        rig.kernel.set_policy("c", {"drift_threshold": 1.5})
    with pytest.raises(InvalidField, match=r"policy\.drift_threshold is nan"):
        rig.kernel.set_policy("c", {"drift_threshold": float("nan")})
    assert rig.kernel.cube("c").record.policy == {}  # nothing refused was stored
    info = rig.kernel.set_policy("c", cv.policy_values(t.CubePolicy(working_set_size=4, drift_threshold=0.2)))
    assert info.record.policy == {"schedule": "manual", "working_set_size": 4, "drift_threshold": 0.2}


def test_only_archived_and_active_can_be_set_on_the_wire_and_in_process(rig: Rig) -> None:
    assert cv.item_state(t.ITEM_STATE_ARCHIVED) == "archived"
    assert cv.item_state(t.ITEM_STATE_EXPIRED) == "expired"  # a state, refused by the kernel below
    with pytest.raises(InvalidField, match="state 0 cannot be set"):
        cv.item_state(t.ITEM_STATE_UNSPECIFIED)
    rig.kernel.alloc_cube("c", "", {})
    mount = rig.kernel.mount("c", 0, True).record.mount_id
    ids, _ = rig.kernel.write(mount, [ItemInput(text="a fact")])
    rig.kernel.commit(mount, "add", "test")
    with pytest.raises(InvalidField, match=r"state 'expired' cannot be set; use ITEM_STATE_ARCHIVED or "
                                           r"ITEM_STATE_ACTIVE \(items expire only through their TTL\)") as refused:
        rig.kernel.set_item_state("c", ids, "expired", "", "test")
    assert refused.value.metadata["field"] == "state"


def test_retention_and_write_bounds_are_the_kernels(rig: Rig) -> None:
    rig.kernel.alloc_cube("c", "", {})
    with pytest.raises(InvalidField, match=r"retention.keep_last is -1; use 0 \(off\) or more"):
        rig.kernel.set_retention("c", -1, 0.0)
    with pytest.raises(InvalidField, match=r"retention\.keep_seconds is inf"):
        rig.kernel.set_retention("c", 0, float("inf"))
    mount = rig.kernel.mount("c", 0, True).record.mount_id
    with pytest.raises(InvalidField, match=r"items\[0\].ttl_seconds is 3153600001; use 0 \(no TTL\) to 3153600000"):
        rig.kernel.write(mount, [ItemInput(text="a fact", ttl_seconds=validate.MAX_TTL_SECONDS + 1)])
    with pytest.raises(InvalidField, match=r"source is over 2048 characters") as refused:
        rig.kernel.write(mount, [ItemInput(text="a fact", source="s" * (validate.MAX_SOURCE_CHARS + 1))])
    assert refused.value.metadata["field"] == "items[0].source"
