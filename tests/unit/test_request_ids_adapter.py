"""ImportAdapter's request id in process: a retried upload returns the first call's adapter and stages
nothing again, even after that staging was committed; another upload under the id is REQUEST_ID_REUSED."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from activation_rig import Rig, open_rig
from test_parametric import adapter_a, adapter_b, tiny_dir, upload  # noqa: F401  (fixtures)

from memosd.errors import RequestIdReused
from memosd.kernel.requests import request_ref
from memosd.syscalls import adapter_stream


@pytest.fixture
def rig(tmp_path: Path, tiny_dir: Path) -> Iterator[Rig]:  # noqa: F811
    r = open_rig(tmp_path, str(tiny_dir))
    yield r
    r.close()



def test_a_retried_upload_stages_once(rig: Rig, adapter_a: tuple[bytes, bytes],  # noqa: F811
                                      adapter_b: tuple[bytes, bytes]) -> None:  # noqa: F811
    rig.kernel.alloc_cube("c", "", {})
    mount = rig.kernel.mount("c", 0, True).record.mount_id
    request = request_ref("prn_alice", "up-1")
    first, info = adapter_stream.import_adapter(rig.adapters, upload(mount, *adapter_a), request)
    assert info.staged_adapter
    rig.kernel.commit(mount, "adapter", "test")
    again, info = adapter_stream.import_adapter(rig.adapters, upload(mount, *adapter_a), request)
    assert again == first  # the first call's record, lineage time included
    assert not info.staged_adapter  # committed, and not staged a second time
    with pytest.raises(RequestIdReused):
        adapter_stream.import_adapter(rig.adapters, upload(mount, *adapter_b), request)
    assert rig.kernel.mount_info(rig.kernel.mount_state(mount)).staged_adapter is False
