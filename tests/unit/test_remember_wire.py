"""Generate's remember options on the wire: what convert_activation.remember accepts and refuses, and how a
remembered revision's provenance is shown to a reader (sources on cubes it cannot read only counted)."""

from __future__ import annotations

import pytest
from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.errors import InvalidField
from memosd.kernel.requests import RequestRef
from memosd.services.remember import Remember
from memosd.store.records import GenerationProvenance, GenerationSource, RevisionRecord
from memosd.syscalls import convert as cv
from memosd.syscalls import convert_activation as ca


def request(**options: str) -> pb.GenerateRequest:
    request_id = options.pop("request_id", "")
    return pb.GenerateRequest(messages=[t.ChatMessage(role="user", content="hi")],
                              options=t.GenerationOptions(**options), request_id=request_id)


def test_remember_options() -> None:
    assert ca.remember(request(), "p") is None
    assert ca.remember(request(remember_mount_id="m1", session_id="s", request_id="r-1"), "p") == \
        Remember("m1", "s", RequestRef("p", "r-1"))
    with pytest.raises(InvalidField) as refused:  # a session for turns that are never recorded: a mistake
        ca.remember(request(session_id="s"), "p")
    assert refused.value.metadata["field"] == "options.session_id"
    with pytest.raises(InvalidField):  # a request id is checked even when nothing is remembered
        ca.remember(request(request_id="not ok/"), "p")


def test_provenance_names_only_the_cubes_the_reader_can_read() -> None:
    record = RevisionRecord(3, 2, "commit", "ada", "remember", 1, 2, 0, 0, 2, request_id="r",
                            generation=GenerationProvenance("fp", "ad", [GenerationSource("mine", 2, ["a"], ["b"]),
                                                                         GenerationSource("theirs", 7, [], ["c"])]))
    shown = cv.revision(record, lambda cube_id: cube_id == "mine").generation
    assert (shown.model_fingerprint, shown.adapter_digest, shown.hidden_sources) == ("fp", "ad", 1)
    [source] = shown.sources
    assert (source.cube_id, source.revision, list(source.block_item_ids), list(source.retrieved_item_ids)) == \
        ("mine", 2, ["a"], ["b"])
    assert len(cv.revision(record).generation.sources) == 2  # the caller who generated read them all
    assert not cv.revision(RevisionRecord(1, 0, "commit", "a", "m", 1, 1, 0, 0, 1)).HasField("generation")
