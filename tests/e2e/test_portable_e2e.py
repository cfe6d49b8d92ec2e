"""ExportCube / ImportCube through real daemons: a cube moves to another daemon with its whole history.

The source is the session daemon (with the model, on the transformers engine); the target a second
daemon of this module (no model: plaintext memory needs none). Log, Diff, Read at every revision and
Search must answer the same on both; a damaged archive is refused and leaves nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memosd_client import ArchiveInvalid, Client, CubeNameTaken
from memosd_client.v1 import types_pb2 as t

target_daemon = daemon_fixture("portable-target")
target = client_fixture("target_daemon")
T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


def _build(client: Client, name: str) -> dict[str, str]:
    """Revisions: 1 writes three items (tags, an event time); 2 edits one and forgets one; 3 ingests two
    turns of a session; 4 rolls back to 2."""
    client.alloc_cube(name, description="moves between daemons", labels={"team": "blue"})
    with client.mount(name, writable=True) as m:
        heron, swallow, owl = m.write(["a heron waits by the water", "a swallow skims the pond",
                                       "an owl hunts at night"], tags=["birds"], event_time=T0)
        m.commit("three birds")
        m.write([{"item_id": heron, "text": "a grey heron waits by the river"}])
        m.forget([swallow])
        m.commit("edit and forget")
        m.ingest([{"speaker": "user", "text": "I saw a kingfisher at the lake", "time": T0 + timedelta(days=1)},
                  {"speaker": "assistant", "text": "Kingfishers dive for fish", "time": T0 + timedelta(days=1)}],
                 session_id="walk-1")
    client.rollback(name, 2)
    return {"heron": heron, "swallow": swallow, "owl": owl}


def _view(client: Client, name: str) -> dict[str, object]:
    """Everything a caller can read of the cube's history, in comparable form."""
    head = client.stat_cube(name).head_revision
    log = [(r.number, r.parent, r.kind, r.message, r.item_count, r.added, r.changed, r.forgotten)
           for r in client.log(name)]
    diffs = {(a, b): sorted((c.item_id, c.kind) for c in client.diff(name, a, b))
             for a in range(1, head) for b in range(a + 1, head + 1)}
    reads = {}
    for revision in range(1, head + 1):
        with client.mount(name, revision=revision) as m:
            reads[revision] = sorted((i.item_id, i.text, tuple(i.tags), i.speaker, i.session_id,
                                      i.event_time.ToNanoseconds(), i.born_revision) for i in m.iter_items())
    with client.mount(name) as m:
        search = {q: [(h.item.item_id, round(h.score, 4)) for h in m.search(q, k=5)]
                  for q in ("heron by the river", "kingfisher", "owl night")}
    return {"head": head, "log": log, "diffs": diffs, "reads": reads, "search": search}


def test_a_cube_moves_to_another_daemon_with_its_whole_history(client: Client, target: Client, cube_name: str,
                                                               tmp_path: Path) -> None:
    _build(client, cube_name)
    path = tmp_path / "cube.memcube"
    seen: list[tuple[int, int]] = []
    archive = client.export_cube(cube_name, path, progress=lambda done, total: seen.append((done, total)))
    assert (archive.format, archive.version) == ("memosd-cube", 1)
    assert (archive.size_bytes, archive.revisions) == (path.stat().st_size, 4)
    assert archive.source_name == cube_name and seen[-1] == (archive.size_bytes, archive.size_bytes)

    imported = target.import_cube(path, "moved")
    source = client.stat_cube(cube_name)
    assert imported.kept_cube_id and imported.cube.cube_id == source.cube_id
    assert not imported.reembedded and imported.archive.sha256 == archive.sha256
    assert (imported.cube.description, dict(imported.cube.labels)) == ("moves between daemons", {"team": "blue"})
    assert (imported.cube.version_count, imported.cube.item_count) == (source.version_count, source.item_count)
    # The importer owns the copy; the source's grants stayed behind.
    assert imported.cube.owner_principal_id == target.whoami().principal_id
    assert _view(target, "moved") == _view(client, cube_name)

    # The import is audited on the target, naming the cube and the archive.
    [record] = [r for r in target.audit(cube=imported.cube.cube_id) if r.method == "ImportCube"]
    assert record.code == "OK" and f"archive:{archive.sha256}" in list(record.artifacts)

    # The copy is a cube like any other: it takes a commit after its history.
    with target.mount("moved", writable=True) as m:
        m.write(["a wren sings"])
        assert m.commit().revision.number == 5


def test_a_name_in_use_is_refused(client: Client, target: Client, cube_name: str, tmp_path: Path) -> None:
    _build(client, cube_name)
    path = tmp_path / "cube.memcube"
    client.export_cube(cube_name, path)
    with pytest.raises(CubeNameTaken) as taken:
        client.import_cube(path, cube_name)
    assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_archive_is_refused_and_leaves_nothing(client: Client, target: Client, cube_name: str,
                                                         tmp_path: Path, damage: str) -> None:
    _build(client, cube_name)
    good = tmp_path / "cube.memcube"
    client.export_cube(cube_name, good)
    data = bytearray(good.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[data.index(b"owl hunts")] ^= 0x20  # one bit of an item's text
    bad = tmp_path / "bad.memcube"
    bad.write_bytes(bytes(data))
    before = sorted(c.name for c in target.list_cubes())

    with pytest.raises(ArchiveInvalid) as refused:
        target.import_cube(bad, f"{cube_name}-copy")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.metadata["problem"] == damage and "nothing was imported" in refused.value.message
    assert sorted(c.name for c in target.list_cubes()) == before
    # Nothing took the name, or the cube id: the good archive imports under it.
    assert target.import_cube(good, f"{cube_name}-copy").cube.name == f"{cube_name}-copy"


def test_an_archive_that_is_not_one_is_refused(target: Client, tmp_path: Path) -> None:
    junk = tmp_path / "junk.memcube"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(ArchiveInvalid, match="magic"):
        target.import_cube(junk, "junk")


def test_kv_caches_come_back_with_a_restored_cube(client: Client, cube_name: str, tmp_path: Path) -> None:
    """Export with KV, free the cube, import it again (its id is free): the activation loads from the store,
    not recomputed. Beside its source (a new id) the KV is skipped, and the reply says why."""
    from test_activation_smollm2 import FACTS, wait_ready

    wait_ready(client)
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        m.write(FACTS)
        m.commit()
        computed = m.activate()
    assert computed.source == t.ACTIVATION_SOURCE_COMPUTED
    path = tmp_path / "kv.memcube"
    archive = client.export_cube(cube_name, path, with_kv=True)
    assert archive.kv_records == 1

    twin = client.import_cube(path, f"{cube_name}-twin")
    assert not twin.kept_cube_id and (twin.kv_loaded, twin.kv_skipped) == (0, 1)
    assert "new id" in twin.kv_skipped_reason

    client.free_cube(cube_name)
    restored = client.import_cube(path, cube_name)
    assert restored.kept_cube_id and (restored.kv_loaded, restored.kv_skipped) == (1, 0)
    with client.mount(cube_name) as m:
        again = m.activate()
    assert again.source == t.ACTIVATION_SOURCE_STORE and again.cache_key == computed.cache_key
    assert again.tokens_computed == 0


def test_memosctl_cube_export_and_import(client: Client, daemon: DaemonProcess, target_daemon: DaemonProcess,
                                         cube_name: str, tmp_path: Path) -> None:
    _build(client, cube_name)
    path = tmp_path / "cli.memcube"

    def ctl(node: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MEMOS_TARGET": node.address, "MEMOS_TOKEN_FILE": str(node.data_dir / "admin.token")}
        return subprocess.run([sys.executable, "-m", "memos.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    exported = ctl(daemon, "cube", "export", cube_name, str(path))
    assert exported.returncode == 0, exported.stderr
    assert "memosd-cube/1" in exported.stdout and "revisions: 4" in " ".join(exported.stdout.split())
    assert "exporting [" in exported.stderr  # the progress bar
    imported = ctl(target_daemon, "cube", "import", str(path), f"{cube_name}-cli")
    assert imported.returncode == 0, imported.stderr
    assert "importing [" in imported.stderr and "cube id kept" in imported.stdout
    assert Client(target_daemon.address, token=target_daemon.token).stat_cube(f"{cube_name}-cli").head_revision == 4
    refused = ctl(target_daemon, "cube", "import", str(path), f"{cube_name}-cli")
    assert refused.returncode != 0 and "in use" in refused.stderr
