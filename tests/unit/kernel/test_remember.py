"""Generate's remember step (services/remember.py) against a real kernel: one revision of two turns through
Kernel.ingest, the provenance on the revision (and back after a restart), the request id claimed under the
Generate's identity (a retry with another reply text records once), and the refusals before any model work.

The generation is a hand-built GenerationReport: the model is not what this tests (tests/e2e does, with it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memosd.activation.generator import GenerateParams, GenerationReport, MemoryUse, UsedItem
from memosd.errors import InvalidField, MountReadOnly, RequestIdReused, TextEmpty
from memosd.kernel.kernel import Kernel
from memosd.kernel.requests import RequestRef
from memosd.services.remember import REMEMBER_SOURCE, Remember, Remembering, exchange_turns, provenance
from memosd.store.records import GenerationProvenance, GenerationSource, RevisionRecord, decode, encode

from .fakes import FakeIndexes
from .rig import commit, head, open_kernel, rw_mount

QUESTION = "What colour is my car?"


def params(question: str = QUESTION) -> GenerateParams:
    return GenerateParams(messages=[("system", "be brief"), ("user", question)], mount_ids=["m-memory"],
                          max_tokens=8)


def report(cube_id: str, used: list[str]) -> GenerationReport:
    return GenerationReport(
        finish_reason="end", completion_tokens=3, model_fingerprint="f" * 64, adapter_digest="a" * 64,
        memory=[MemoryUse("m-memory", cube_id, 1, block_items=[UsedItem(used[0], 1)],
                          retrieved_items=[UsedItem(used[1], 1, 0.5), UsedItem("staged-item", 0, 0.4)])])


def test_an_exchange_is_one_revision_of_two_turns_with_its_provenance(tmp_path: Path, indexes: FakeIndexes) -> None:
    kernel = open_kernel(tmp_path / "data", indexes)  # its own, to reopen it
    kernel.alloc_cube("memory", "", {})
    used, _ = commit(kernel, "memory", ["My car is a red Volvo.", "I live in Lisbon."])
    memory_id = kernel.cube("memory").cube_id
    kernel.alloc_cube("notes", "", {})
    remember = Remember(rw_mount(kernel, "notes"), "chat-1", RequestRef("p1", "req-1"))
    result = Remembering(kernel).remember(remember, params(), "It is red.", report(memory_id, used),
                                          arrived_ns=1_000, ended_ns=2_000, author="ada")
    assert result.revision.number == head(kernel, "notes") == 1 and result.revision.added == 2
    assert result.revision.author == "ada" and result.revision.request_id == "req-1"
    expected = GenerationProvenance("f" * 64, "a" * 64, [GenerationSource(memory_id, 1, [used[0]], [used[1]])])
    assert result.revision.generation == expected  # the staged item is in no revision: left out
    items, _ = kernel.read(remember.mount_id, result.item_ids)
    assert [(i.speaker, i.text, i.session_id, i.event_ns, i.source) for i in items] == [
        ("user", QUESTION, "chat-1", 1_000, REMEMBER_SOURCE), ("assistant", "It is red.", "chat-1", 2_000,
                                                              REMEMBER_SOURCE)]
    kernel.close()
    reopened = open_kernel(tmp_path / "data", indexes)  # read back from the store, not from memory
    try:
        [revision, *_] = reopened.log("notes", 0, "")[0].entries
        assert revision.generation == expected
    finally:
        reopened.close()


def test_a_retry_under_the_same_request_id_records_once(kernel: Kernel) -> None:
    kernel.alloc_cube("notes", "", {})
    cube_id = kernel.cube("notes").cube_id
    remembering = Remembering(kernel)
    ref = RequestRef("p1", "req-1")
    first = remembering.remember(Remember(rw_mount(kernel, "notes"), "s", ref), params(), "Red.",
                                 report(cube_id, ["x", "y"]), arrived_ns=1, ended_ns=2, author="ada")
    # The retry's reply text and times differ (sampling, a later clock) and it mounts again: still the first.
    again = remembering.remember(Remember(rw_mount(kernel, "notes"), "s", ref), params(), "It is red!",
                                 report(cube_id, ["x", "y"]), arrived_ns=5, ended_ns=9, author="ada")
    assert again.revision.number == first.revision.number == head(kernel, "notes") == 1
    assert again.item_ids == first.item_ids
    with pytest.raises(RequestIdReused):  # another conversation under the same id
        remembering.remember(Remember(rw_mount(kernel, "notes"), "s", ref), params("Where do I live?"), "Lisbon.",
                             report(cube_id, ["x", "y"]), arrived_ns=5, ended_ns=9, author="ada")
    # Another principal's id of the same name is its own.
    other = remembering.remember(Remember(rw_mount(kernel, "notes"), "s", RequestRef("p2", "req-1")), params(),
                                 "Red.", report(cube_id, ["x", "y"]), arrived_ns=1, ended_ns=2, author="bob")
    assert other.revision.number == 2


def test_the_provenance_travels_in_a_cube_archive(kernel: Kernel, tmp_path: Path) -> None:
    kernel.alloc_cube("notes", "", {})
    cube_id = kernel.cube("notes").cube_id
    made = Remembering(kernel).remember(Remember(rw_mount(kernel, "notes"), "s"), params(), "Red.",
                                        report(cube_id, ["x", "y"]), arrived_ns=1, ended_ns=2, author="ada")
    archive = tmp_path / "notes.memcube"
    with archive.open("wb") as out:
        kernel.export_cube("notes", out, with_kv=False)
    kernel.import_cube(archive, "notes-copy", "", lambda _: False)
    [copied, *_] = kernel.log("notes-copy", 0, "")[0].entries
    assert copied.generation == made.revision.generation is not None


def test_refusals_come_before_any_model_work(kernel: Kernel) -> None:
    kernel.alloc_cube("notes", "", {})
    remembering = Remembering(kernel)
    read_only = kernel.mount("notes", 0, False).record.mount_id
    with pytest.raises(MountReadOnly):
        remembering.check(Remember(read_only, ""), params())
    writable = rw_mount(kernel, "notes")
    with pytest.raises(TextEmpty):
        remembering.check(Remember(writable, ""), params("   "))
    with pytest.raises(InvalidField):
        remembering.check(Remember(writable, "bad\nsession"), params())
    assert remembering.check(Remember(writable, "ok"), params()).record.mount_id == writable
    assert head(kernel, "notes") == 0


def test_a_blank_reply_leaves_the_user_turn_alone() -> None:
    assert [m.speaker for m in exchange_turns("hi", " \n", "s", 1, 2)] == ["user"]
    [user, reply] = exchange_turns("hi", "hello", "s", 5, 3)  # a clock step back never puts the reply first
    assert user.time_ns == 5 == reply.time_ns


def test_provenance_names_each_mount_even_without_items() -> None:
    bare = GenerationReport(model_fingerprint="f", memory=[MemoryUse("m", "c", 4)])
    assert provenance(bare) == GenerationProvenance("f", "", [GenerationSource("c", 4, [], [])])


def test_a_revision_record_without_provenance_still_decodes() -> None:
    """Rows written before the field existed have no ``generation`` key."""
    old = b'{"number":1,"parent":0,"kind":"commit","author":"a","message":"m","create_ns":1,"added":1,' \
          b'"changed":0,"forgotten":0,"item_count":1}'
    assert decode(RevisionRecord, old).generation is None
    with_it = RevisionRecord(1, 0, "commit", "a", "m", 1, 1, 0, 0, 1,
                             generation=GenerationProvenance("f", "", [GenerationSource("c", 1, ["i"], [])]))
    assert decode(RevisionRecord, encode(with_it)) == with_it
    with pytest.raises(TypeError):  # a corrupt one fails like any record (an archive import reports it)
        decode(RevisionRecord, encode(with_it).replace(b'"model_fingerprint"', b'"model"'))
