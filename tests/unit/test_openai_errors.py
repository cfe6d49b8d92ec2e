"""memosd's errors in OpenAI's shape: every ErrorReason has an HTTP status, and the body names what to fix."""

from __future__ import annotations

import pytest
from memos.v1 import types_pb2

from memosd import errors
from memosd.syscalls.convert_openai import chat_request
from memosd.syscalls.errors import internal
from memosd.syscalls.openai_errors import error_body, http_status

# The table (gRPC code -> HTTP status); FAILED_PRECONDITION is 409 (the cube's state refuses).
STATUS_BY_CODE = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
                  "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 409, "OUT_OF_RANGE": 400, "UNAVAILABLE": 503,
                  "INTERNAL": 500, "ALREADY_EXISTS": 409, "ABORTED": 409, "DEADLINE_EXCEEDED": 504}
REASONS = [n for n in types_pb2.ErrorReason.DESCRIPTOR.values_by_name if n != "ERROR_REASON_UNSPECIFIED"]


def _subclasses(cls: type[errors.MemosError]) -> list[type[errors.MemosError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


BY_REASON = {cls.reason: cls for cls in _subclasses(errors.MemosError)}  # ALL_ERRORS leaves a few out


@pytest.mark.parametrize("reason", REASONS)
def test_every_reason_has_its_http_status(reason: str) -> None:
    cls = BY_REASON[reason]
    status, kind = http_status(cls("what to fix"))
    assert status == STATUS_BY_CODE[cls.code]
    assert kind == {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 500: "api_error",
                    503: "service_unavailable_error", 504: "timeout_error"}[status]


def test_the_body_has_openais_four_fields_and_the_reason_as_code() -> None:
    body = error_body(errors.CubeNotFound("no cube named 'x'; ListCubes shows yours", cube="x"))
    assert body == {"error": {"message": "no cube named 'x'; ListCubes shows yours", "type": "not_found_error",
                              "param": None, "code": "CUBE_NOT_FOUND"}}


@pytest.mark.parametrize(("field", "param"), [("options.temperature", "temperature"), ("messages", "messages"),
                                              ("retrieve_k", "memos.retrieve_k"), ("mount_ids", "memos.cubes")])
def test_param_is_the_chat_requests_name_for_generates_field(field: str, param: str) -> None:
    assert error_body(errors.InvalidField("bad", field=field))["error"]["param"] == param


def test_an_internal_error_says_where_to_look_and_nothing_else() -> None:
    body = error_body(internal("OpenAI.ChatCompletions", RuntimeError("/secret/path exploded")))
    assert body["error"]["code"] == "INTERNAL_ERROR" and "/secret" not in body["error"]["message"]
    assert "ref" in body["error"]["message"]


def test_a_huge_client_value_is_shortened_in_the_message() -> None:
    name = "c" * 5000
    body = error_body(errors.CubeNotFound(f"no cube named {name!r}", cube=name))
    assert len(body["error"]["message"].encode()) <= 1024 and "shortened" in body["error"]["message"]


def test_cubes_come_from_the_model_name_and_extra_body_once_each() -> None:
    chat = chat_request({"model": "memos:notes, team", "messages": [{"role": "user", "content": "hi"}],
                         "memos": {"cubes": ["team", "more"], "revision": {"notes": 3}, "retrieve_k": 2}})
    assert chat.cubes == ["notes", "team", "more"] and chat.revisions == {"notes": 3}
    assert chat.generate.retrieve_k == 2 and chat.generate.HasField("retrieve_k")


def test_text_parts_are_joined_and_developer_is_system() -> None:
    chat = chat_request({"model": "memosd", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert [(m.role, m.content) for m in chat.generate.messages] == [("system", "be brief"), ("user", "ab")]
    assert not chat.cubes and not chat.generate.HasField("retrieve_k")


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "memos:a,b", "memos": {"revision": 2}}, "memos.revision"),
    ({"model": "memos:a", "memos": {"revision": {"b": 1}}}, "memos.revision"),
    ({"model": "memosd", "n": 2}, "n"),
    ({"model": "memosd", "stop": [1]}, "stop"),
    ({"model": "memosd", "max_tokens": 0}, "max_tokens"),
    ({"model": "memosd", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"model": "memosd", "stream": "yes"}, "stream"),
])
def test_a_bad_shape_names_its_param(body: dict[str, object], param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(errors.InvalidField) as caught:
        chat_request(body)
    assert caught.value.metadata["field"] == param
