"""Generate remembers: a finished exchange ingested into a read-write mount's cube as one revision.

The last user message and the reply become two conversation turns (speakers "user" and "assistant", the
request's session, times: the request's arrival and the reply's end) through the kernel's one Ingest path,
so they are embedded, indexed, linked to the session's earlier turns and committed like any Ingest. The
revision carries the generation's provenance (``RevisionRecord.generation``: the model fingerprint, the
adapter digest, and per mount the cube, revision and items used), which Log returns; the items' ``source``
is ``REMEMBER_SOURCE``, so Purge by source finds every remembered turn.

Only a reply that ended is remembered: the caller runs this after the generation's report, which a
cancelled or failed generation never produces. A request id makes a retried Generate record once: the
Ingest is claimed under the Generate's own identity (``generate_identity``: its conversation, sampling
options, session and the cubes it read), not under the turns, whose reply text and times a retry changes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from memosd.activation.generator import GenerateParams, GenerationReport
from memosd.kernel import validate
from memosd.kernel.kernel import Kernel
from memosd.kernel.requests import RequestIdentity, RequestRef
from memosd.kernel.types import IngestResult, Message, MountInfo
from memosd.store.records import GenerationProvenance, GenerationSource

REMEMBER_SOURCE = "memosd:generate"  # the items' source: Purge(source=...) erases every remembered turn
USER, ASSISTANT = "user", "assistant"  # the request's roles, as the turns' speakers


@dataclass(frozen=True)
class Remember:
    """What a Generate asked to remember: where, in which session, under which request id."""

    mount_id: str
    session_id: str  # "": a new session for this exchange
    request: RequestRef | None = None


def new_session_id() -> str:
    """A session for one exchange whose caller named none (its turns then link to nothing earlier)."""
    return "generate-" + secrets.token_hex(8)


def exchange_turns(user_text: str, reply: str, session_id: str, arrived_ns: int, ended_ns: int) -> list[Message]:
    """The two turns of an exchange; a blank reply (the model ended at once, or said only whitespace) leaves
    only the user's, since an item needs text."""
    turns = [Message(USER, user_text, session_id, arrived_ns)]
    if reply.strip():
        turns.append(Message(ASSISTANT, reply, session_id, max(ended_ns, arrived_ns)))
    return turns


def provenance(report: GenerationReport) -> GenerationProvenance:
    """The generation's model, adapter and memory, as ids: staged items (born 0) are left out, since
    they are in no revision a reader could find them at."""
    return GenerationProvenance(
        report.model_fingerprint, report.adapter_digest,
        [GenerationSource(use.cube_id, use.revision,
                          [u.item_id for u in use.block_items if u.born],
                          [u.item_id for u in use.retrieved_items if u.born])
         for use in report.memory])


def generate_identity(params: GenerateParams, report: GenerationReport, session_id: str) -> RequestIdentity:
    """What a Generate's request id stands for. Mount ids and revisions are left out on purpose: a client
    retrying after a lost answer may mount again (the OpenAI endpoint mounts per request), and at HEAD,
    which the first call's remembered revision moved when the remember cube is also read."""
    options = (params.max_tokens, params.temperature, params.top_p, list(params.stop), params.seed,
               params.retrieve_k, params.bypass_kv_cache)
    cubes = [use.cube_id for use in report.memory]
    return RequestIdentity("generate", ([list(m) for m in params.messages], cubes, report.adapter_digest, options,
                                        session_id))


class Remembering:
    """The remember step of Generate: checks before the generation, the Ingest after it."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def check(self, remember: Remember, params: GenerateParams) -> MountInfo:
        """Refuse before any model work: a read-only mount (MOUNT_READ_ONLY), a frozen cube, a bad session, a
        user message that could not be an item (blank, or over limits.max_item_bytes). The conversation's
        own shape is the generator's to check."""
        validate.session_id(remember.session_id, "options.session_id", required=False)
        if params.messages and params.messages[-1][0] == USER:
            validate.text(params.messages[-1][1], f"messages[{len(params.messages) - 1}].content",
                          self.kernel.limits.max_item_bytes, "limits.max_item_bytes")
        return self.kernel.writable_mount(remember.mount_id)

    def remember(self, remember: Remember, params: GenerateParams, reply: str, report: GenerationReport, *,
                 arrived_ns: int, ended_ns: int, author: str) -> IngestResult:
        """Ingest the exchange as one revision with the generation's provenance; a retry under the same
        request id returns the first call's result and writes nothing."""
        session_id = remember.session_id or new_session_id()
        turns = exchange_turns(params.messages[-1][1], reply, session_id, arrived_ns, ended_ns)
        record = provenance(report)
        fingerprint = report.model_fingerprint[:12] or "unknown model"
        return self.kernel.ingest(
            remember.mount_id, turns, source=REMEMBER_SOURCE, author=author,
            message=f"remember a generation ({fingerprint}, {len(record.sources)} memory mounts)",
            request=remember.request, generation=record,
            claim_as=generate_identity(params, report, remember.session_id))
