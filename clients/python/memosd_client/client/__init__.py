"""The typed, synchronous client of memosd: :class:`Client`, the :class:`MountHandle` it opens, and what
their calls accept and return.

The modules, each with one job: ``client`` (the calls), ``mount`` (the handle, binding the Client's calls on
a mount), ``results`` (Generation, SearchResults, DiffChanges), ``inputs`` (the ``*Like`` forms a call
accepts, and times), ``retry`` (RetryPolicy, Deadlines, request ids) and ``adapters`` (an adapter's files).
The names below are the public ones; ``memos`` re-exports the most used.
"""

from memosd_client.client.adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    adapter_digest,
    load_adapter_dir,
)
from memosd_client.client.client import (
    DEFAULT_INGEST_BATCH,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TARGET,
    MAX_MESSAGE_BYTES,
    Client,
)
from memosd_client.client.inputs import (
    RIGHTS,
    AdapterSource,
    ConversationLike,
    ItemLike,
    MessageLike,
    TimeLike,
    parse_time,
    to_timestamp,
)
from memosd_client.client.mount import MountHandle
from memosd_client.client.results import JOB_TERMINAL_STATES, DiffChanges, Generation, SearchResults
from memosd_client.client.retry import NO_RETRY, Deadlines, RetryPolicy, new_request_id

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "DEFAULT_INGEST_BATCH",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TARGET",
    "JOB_TERMINAL_STATES",
    "MAX_MESSAGE_BYTES",
    "NO_RETRY",
    "RIGHTS",
    "AdapterSource",
    "Client",
    "ConversationLike",
    "Deadlines",
    "DiffChanges",
    "Generation",
    "ItemLike",
    "MessageLike",
    "MountHandle",
    "RetryPolicy",
    "SearchResults",
    "TimeLike",
    "adapter_digest",
    "load_adapter_dir",
    "new_request_id",
    "parse_time",
    "to_timestamp",
]
