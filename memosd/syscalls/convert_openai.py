"""OpenAI chat requests <-> memosd's Generate: the wire shape of the HTTP surface (syscalls/openai_http.py).

Memory is chosen per request, two ways that add up:
- the model name ``memos:notes,team`` names cubes (by name or id), so a framework that only lets you set a
  model still reaches memory; plain ``memosd`` is the model without memory;
- ``extra_body={"memos": {"cubes": [...], "revision": N | {cube: N}, "retrieve_k": K, "adapter": cube}}``.
Each cube is mounted read-only at its revision (0 or absent: HEAD) for the request and unmounted after.
``"remember": cube`` (with ``"session_id"`` and ``"request_id"``, both optional) records the exchange in that
cube once the reply ends, as Generate's options.remember_mount_id: the cube is then mounted read-write.
Only wire shape is checked here; every bound (lengths, counts, temperature range) is Generate's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.errors import InvalidField

MODEL = "memosd"  # the daemon's one model; "memos:<cubes>" is the same model with memory
CUBE_MODEL_PREFIX = "memos:"
ROLES = ("system", "user", "assistant")
FINISH = {t.FINISH_REASON_END: "stop", t.FINISH_REASON_STOP: "stop", t.FINISH_REASON_LENGTH: "length"}


@dataclass
class ChatRequest:
    model: str
    cubes: list[str]  # refs (names or ids), in order, each once
    revisions: dict[str, int]  # ref -> revision; absent: HEAD
    adapter: str  # a cube ref whose adapter to generate with; "" for the base model
    remember: str  # a cube ref to remember the exchange in; "" for none
    generate: pb.GenerateRequest  # mount_ids (and options.adapter_mount_id) are filled in once mounted
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    created: int = field(default_factory=lambda: int(time.time()))


def _bad(param: str, message: str) -> InvalidField:
    return InvalidField(f"{param}: {message}", field=param)


def _int(value: Any, param: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(param, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(param, f"must be a number, got {value!r}")
    return float(value)


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts only)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{i}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(param, "must be a string or a list of text parts")


def _messages(value: Any) -> list[t.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", "must be an object with role and content")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for system
            role = "system"
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        out.append(t.ChatMessage(role=role, content=_content(message.get("content"), f"messages[{i}].content")))
    return out


def _model_cubes(model: Any) -> list[str]:
    if not isinstance(model, str) or not model:
        raise _bad("model", f"must be {MODEL!r} or 'memos:<cube>[,<cube>...]' (GET /v1/models lists them)")
    if model == MODEL:
        return []
    if model.startswith(CUBE_MODEL_PREFIX):
        cubes = [c.strip() for c in model[len(CUBE_MODEL_PREFIX):].split(",") if c.strip()]
        if cubes:
            return cubes
    raise _bad("model", f"no model {model!r}: use {MODEL!r}, or 'memos:<cube>[,<cube>...]' for the model with those "
                        "cubes' memory (GET /v1/models lists them)")


@dataclass(frozen=True)
class _Memos:
    """The ``memos`` body field."""

    cubes: list[str] = field(default_factory=list)
    revision: Any = None
    retrieve_k: Any = None
    adapter: str = ""
    remember: str = ""
    session_id: str = ""
    request_id: str = ""


_MEMOS_FIELDS = ("cubes", "revision", "retrieve_k", "adapter", "remember", "session_id", "request_id")


def _memos(value: Any) -> _Memos:
    if value is None:
        return _Memos()
    if not isinstance(value, dict):
        raise _bad("memos", "must be an object: {" + ", ".join(f'"{f}"' for f in _MEMOS_FIELDS) + "}")
    unknown = sorted(set(value) - set(_MEMOS_FIELDS))
    if unknown:
        raise _bad(f"memos.{unknown[0]}", f"is not a field; memos takes {', '.join(_MEMOS_FIELDS)}")
    cubes = value.get("cubes", [])
    if not isinstance(cubes, list) or not all(isinstance(c, str) and c for c in cubes):
        raise _bad("memos.cubes", "must be a list of cube names or ids")
    adapter = value.get("adapter", "")
    if not isinstance(adapter, str):
        raise _bad("memos.adapter", "must be the name or id of a cube whose adapter to generate with")
    remember = value.get("remember", "")
    if not isinstance(remember, str):
        raise _bad("memos.remember", "must be the name or id of a cube to remember the exchange in")
    for name in ("session_id", "request_id"):
        if not isinstance(value.get(name, ""), str):
            raise _bad(f"memos.{name}", "must be a string")
    return _Memos(list(cubes), value.get("revision"), value.get("retrieve_k"), adapter, remember,
                  value.get("session_id", ""), value.get("request_id", ""))


def _revisions(value: Any, cubes: list[str]) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, dict):
        for ref in value:
            if ref not in cubes:
                raise _bad("memos.revision", f"names cube {ref!r}, which the request does not use")
        return {ref: _int(rev, "memos.revision") for ref, rev in value.items()}
    if len(cubes) != 1:
        raise _bad("memos.revision", "with several cubes (or none) give an object {cube: revision}")
    return {cubes[0]: _int(value, "memos.revision")}


def chat_request(body: Any) -> ChatRequest:
    """The chat completion request's body (parsed JSON), checked for shape; raises InvalidField naming the param."""
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object")
    model = body.get("model")
    model_cubes = _model_cubes(model)
    memos = _memos(body.get("memos"))
    cubes = list(dict.fromkeys(model_cubes + memos.cubes))
    if body.get("n", 1) != 1:
        raise _bad("n", "memosd generates one choice per request; leave n at 1")
    options = t.GenerationOptions()
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options.max_tokens = _int(max_tokens, "max_tokens", minimum=1)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            setattr(options, name, _number(body[name], name))
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop", "must be a string or a list of strings")
        options.stop.extend(stops)
    if body.get("seed") is not None:
        options.seed = _int(body["seed"], "seed")
    options.session_id = memos.session_id  # Generate refuses one without a remember mount
    generate = pb.GenerateRequest(messages=_messages(body.get("messages")), options=options,
                                  request_id=memos.request_id)
    if memos.retrieve_k is not None:
        generate.retrieve_k = _int(memos.retrieve_k, "memos.retrieve_k")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "must be an object")
    return ChatRequest(model=str(model), cubes=cubes, revisions=_revisions(memos.revision, cubes),
                       adapter=memos.adapter, remember=memos.remember, generate=generate, stream=stream, include_usage=stream_options.get("include_usage") is True)


# -- responses ------------------------------------------------------------------------------------------
def _used(items: Any) -> list[dict[str, Any]]:
    return [{"item_id": u.item_id, "born_revision": u.born_revision, "score": round(u.score, 6)} for u in items]


def memos_usage(summary: t.GenerationSummary, names: dict[str, str]) -> dict[str, Any]:
    """memosd's own account of the reply: each cube's revision, KV reuse and the items that went in; and where
    it was remembered."""
    remembered = ({"remembered": {"revision": summary.remembered.number,
                                  "item_ids": list(summary.remembered_item_ids)}}
                  if summary.HasField("remembered") else {})
    return {
        "reused_tokens": summary.reused_tokens, "prefilled_tokens": summary.prefilled_tokens,
        "ttft_us": summary.ttft_us, "total_us": summary.total_us,
        "cubes": [{"cube": names.get(use.cube_id, use.cube_id), "cube_id": use.cube_id, "revision": use.revision,
                   "activated": use.activated, "cache_key": use.cache_key,
                   "block_items": _used(use.block_items), "retrieved_items": _used(use.retrieved_items)}
                  for use in summary.memory],
        **remembered,
    }


def usage(summary: t.GenerationSummary) -> dict[str, Any]:
    """OpenAI's usage, with the reused tokens where OpenAI reports cached ones."""
    return {"prompt_tokens": summary.prompt_tokens, "completion_tokens": summary.completion_tokens,
            "total_tokens": summary.prompt_tokens + summary.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": summary.reused_tokens}}


def completion(chat: ChatRequest, call_id: str, text: str, summary: t.GenerationSummary,
               names: dict[str, str]) -> dict[str, Any]:
    return {"id": call_id, "object": "chat.completion", "created": chat.created, "model": chat.model,
            "system_fingerprint": summary.model_fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH.get(summary.finish_reason, "stop"), "logprobs": None}],
            "usage": usage(summary), "memos": memos_usage(summary, names)}


def chunk(chat: ChatRequest, call_id: str, delta: dict[str, Any], finish_reason: str | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"id": call_id, "object": "chat.completion.chunk", "created": chat.created, "model": chat.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}


def last_chunks(chat: ChatRequest, call_id: str, summary: t.GenerationSummary,
                names: dict[str, str]) -> list[dict[str, Any]]:
    """The finishing chunk (with memosd's usage), then OpenAI's usage-only chunk when it was asked for."""
    finish = chunk(chat, call_id, {}, FINISH.get(summary.finish_reason, "stop"),
                   system_fingerprint=summary.model_fingerprint, memos=memos_usage(summary, names))
    if not chat.include_usage:
        return [finish]
    tail = {"id": call_id, "object": "chat.completion.chunk", "created": chat.created, "model": chat.model,
            "choices": [], "usage": usage(summary), "memos": memos_usage(summary, names)}
    return [finish, tail]


def models(cube_names: list[str], created: int) -> dict[str, Any]:
    """The model, then one ``memos:<cube>`` per cube the caller can see."""
    ids = [MODEL] + [CUBE_MODEL_PREFIX + name for name in cube_names]
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "memosd"}
                                       for i in ids]}
