"""The key schema of the cube store: every column family, its keys and its values, drawn here only.

Every key is ASCII. Ids never contain "/", numbers are fixed-width lowercase
hex, so byte order is numeric order and a cube's rows form one contiguous
range per column family (``cube_id/`` .. ``cube_id0``; "0" sorts right after
"/"). FreeCube deletes that range in every family whose keys all start with
``{cube_id}/`` (CUBE_SCOPED).

The tree below is the one drawing of the schema, and tests/unit/test_store_schema.py
holds it to the code: its families are exactly those Store opens, each key is
drawn as the ``str.format`` template the store's accessor writes (written
through the accessor and read back raw), and a value named by a class is that
record of store/records.py, encoded as JSON by ``records.encode`` unless said
otherwise. The fields of a record are documented on its class, not here.

    default                       daemon metadata (Store.get_meta / put_meta)
      schema_version              -> "1" (SCHEMA_VERSION; checked at open: a mismatch refuses to start)
      embedder                    -> fingerprint of the embedder that made the stored vectors
      memory_text                 -> the memory-text recipe (kernel/memory_text.py) they were made under
      space_probe                 -> time_ns of the last probe write while the disk was full
    cubes
      {cube_id}                   -> CubeRecord
    cube_names
      {name}                      -> the cube id (ASCII)
    revisions
      {cube_id}/{rev:016x}        -> RevisionRecord
    items                         every version of every item, all revisions
      {cube_id}/{item_id}/{born:016x}
                                  -> VersionRecord
    vectors
      {cube_id}/{vkey:016x}       -> float32[dim], the embedding of that version
    mounts
      {mount_id}                  -> MountRecord
    staging                       a mount's uncommitted changes
      {mount_id}/{item_id}        -> StagedRecord
    staged_vectors
      {mount_id}/{item_id}        -> float32[dim], the embedding of the staged content (none for a forget)
    activations                   a cube's activation for one model (at most one per model)
      {cube_id}/{fingerprint}     -> ActivationRecord
    kv_chunks                     the KV cache blobs (BlobDB files, uncompressed)
      {cube_id}/{cache_key}/{chunk:08x}
                                  -> a safetensors chunk (fp16/bf16) made by runtime.kvcache.to_chunks
    kv_blocks                     a paged engine's KV blocks (BlobDB files, uncompressed; store/blocks.py)
      {cube_id}/{fingerprint}/{block_key}
                                  -> one block, as runtime.kvblocks.encode_block makes it (the engine's dtype)
    kv_block_index                one row per kv_blocks row, written and deleted with it (one batch, one range)
      {cube_id}/{fingerprint}/{block_key}
                                  -> the block's size in bytes, ASCII decimal
    adapters                      every version of a cube's adapter (at most one per revision)
      {cube_id}/{born:016x}       -> AdapterRecord
    adapter_blobs                 adapter files by digest (BlobDB files, uncompressed)
      {cube_id}/{digest}/c        -> adapter_config.json bytes
      {cube_id}/{digest}/w/{chunk:08x}
                                  -> adapter_model.safetensors bytes, in ADAPTER_CHUNK_BYTES (8 MiB) pieces
    staged_adapters
      {mount_id}                  -> StagedAdapterRecord
    jobs                          background jobs (training), the last parametric.jobs.MAX_JOBS kept
      {job_id}                    -> JobRecord
    purges                        what each Purge removed and flagged: ids and counts, never text
      {cube_id}/{purge_id}        -> PurgeReceipt
    principals                    users and agents (governance)
      {principal_id}              -> PrincipalRecord
    grants                        rights on cubes; the cube's owner (CubeRecord.owner) holds all without a row
      {cube_id}/{principal_id}    -> GrantRecord
    usage                         what Search, Read and Generate used (statistics, flushed in batches)
      {cube_id}/#                 -> CubeUsage, as json.dumps with its default separators
      {cube_id}/{item_id}         -> ItemUsage, as the JSON list [hits, last_used_ns]
    request_ids                   client-chosen request ids, kept limits.request_id_ttl_seconds
      {cube_id}/{principal_id}/{request_id}
                                  -> RequestRecord (a request id may itself hold "/": it is the key's rest)
    audit                         the hash-chained audit log, one record per syscall, allowed or refused
      {seq:016x}                  -> StoredRecord, as hash (64 hex) "\n" body; body = canonical JSON of the
                                     record, holding seq and prev_hash; hash = sha256(body)

A block key (``kvblocks.block_keys``, 64 hex) already hashes the model
fingerprint and the cube salt, so it alone would name a block uniquely. The
kv_blocks keys are nevertheless cube-scoped: FreeCube then drops a cube's
blocks with its one range delete, and Evict or Purge with one more
(``delete_kv_blocks``), with no list of a cube's keys to keep in step with the
blocks; the fingerprint after the cube lets one model's blocks go alone. The
price: whoever reads or writes a block must know its cube (RocksBlockStore is
bound to one cube and one model). kv_block_index is there because RocksDB
has no key-only lookup: a read of a kv_blocks row loads its blob (~3 MB,
~5 ms), and the connector asks "is block i stored?" for every block of every
waiting request, so has(), counts and sizes read the small index instead.

A version key (vkey) is a per-cube counter assigned at commit, so the dense and
lexical indexes (derived, rebuildable) can say "everything up to vkey N is in".

Purge is the one change that rewrites history: it deletes every row of an item
(its versions and vectors at every revision, its staged copies, the activations
whose block holds it, and every stored KV block of the cube: a block's
key does not say which items its tokens came from), then Store.scrub compacts them away so that no file of
the data dir keeps its text. Revision records are kept as they were.
"""

from __future__ import annotations

SCHEMA_VERSION = b"1"

CF_DEFAULT = "default"
CF_CUBES = "cubes"
CF_CUBE_NAMES = "cube_names"
CF_REVISIONS = "revisions"
CF_ITEMS = "items"
CF_VECTORS = "vectors"
CF_MOUNTS = "mounts"
CF_STAGING = "staging"
CF_STAGED_VECTORS = "staged_vectors"
CF_ACTIVATIONS = "activations"
CF_KV_CHUNKS = "kv_chunks"
CF_KV_BLOCKS = "kv_blocks"
CF_KV_BLOCK_INDEX = "kv_block_index"
CF_ADAPTERS = "adapters"
CF_ADAPTER_BLOBS = "adapter_blobs"
CF_STAGED_ADAPTERS = "staged_adapters"
CF_JOBS = "jobs"
CF_PURGES = "purges"
CF_PRINCIPALS = "principals"
CF_GRANTS = "grants"
CF_AUDIT = "audit"
CF_USAGE = "usage"
CF_REQUEST_IDS = "request_ids"

# Adding a family is backward compatible (RocksDB creates missing ones at open), so it
# does not bump SCHEMA_VERSION; activations, kv_chunks, kv_blocks, kv_block_index and purges were added
# that way.
COLUMN_FAMILIES = (
    CF_CUBES, CF_CUBE_NAMES, CF_REVISIONS, CF_ITEMS, CF_VECTORS, CF_MOUNTS, CF_STAGING, CF_STAGED_VECTORS,
    CF_ACTIVATIONS, CF_KV_CHUNKS, CF_KV_BLOCKS, CF_KV_BLOCK_INDEX, CF_ADAPTERS, CF_ADAPTER_BLOBS,
    CF_STAGED_ADAPTERS, CF_JOBS, CF_PURGES, CF_PRINCIPALS, CF_GRANTS, CF_AUDIT, CF_USAGE, CF_REQUEST_IDS,
)
# Column families whose keys start with "{cube_id}/": deleted by range on FreeCube.
CUBE_SCOPED = (CF_REVISIONS, CF_ITEMS, CF_VECTORS, CF_ACTIVATIONS, CF_KV_CHUNKS, CF_KV_BLOCKS,
               CF_KV_BLOCK_INDEX, CF_ADAPTERS, CF_ADAPTER_BLOBS, CF_GRANTS, CF_PURGES, CF_USAGE, CF_REQUEST_IDS)
# Large values: stored in blob files, not compressed (fp16 tensors do not compress).
BLOB_FAMILIES = (CF_KV_CHUNKS, CF_KV_BLOCKS, CF_ADAPTER_BLOBS)
ADAPTER_CHUNK_BYTES = 8 << 20

KEY_SCHEMA_VERSION = b"schema_version"
KEY_EMBEDDER = b"embedder"
KEY_MEMORY_TEXT = b"memory_text"
# Written (synced) only while the disk is full: the write that tells whether RocksDB takes writes again.
KEY_SPACE_PROBE = b"space_probe"
# The item id of a cube's own usage row: "#" sorts before every item id ("itm_..."), so it comes first.
USAGE_CUBE_ROW = "#"


def _hex(n: int) -> str:
    return f"{n:016x}"


def cube_key(cube_id: str) -> bytes:
    return cube_id.encode()


def name_key(name: str) -> bytes:
    return name.encode()


def revision_key(cube_id: str, revision: int) -> bytes:
    return f"{cube_id}/{_hex(revision)}".encode()


def version_key(cube_id: str, item_id: str, born: int) -> bytes:
    return f"{cube_id}/{item_id}/{_hex(born)}".encode()


def vector_key(cube_id: str, vkey: int) -> bytes:
    return f"{cube_id}/{_hex(vkey)}".encode()


def mount_key(mount_id: str) -> bytes:
    return mount_id.encode()


def staged_key(mount_id: str, item_id: str) -> bytes:
    return f"{mount_id}/{item_id}".encode()


def activation_key(cube_id: str, fingerprint: str) -> bytes:
    return f"{cube_id}/{fingerprint}".encode()


def kv_chunk_key(cube_id: str, cache_key: str, index: int) -> bytes:
    return f"{cube_id}/{cache_key}/{index:08x}".encode()


def kv_cache_range(cube_id: str, cache_key: str) -> tuple[bytes, bytes]:
    """The [begin, end) range of one cache's chunks."""
    return prefix_range(f"{cube_id}/{cache_key}")


def kv_block_key(cube_id: str, fingerprint: str, block_key: str) -> bytes:
    return f"{cube_id}/{fingerprint}/{block_key}".encode()


def kv_blocks_range(cube_id: str, fingerprint: str | None = None) -> tuple[bytes, bytes]:
    """The [begin, end) range of a cube's stored blocks: every model's, or ``fingerprint``'s only."""
    return prefix_range(cube_id if fingerprint is None else f"{cube_id}/{fingerprint}")


def adapter_key(cube_id: str, born: int) -> bytes:
    return f"{cube_id}/{_hex(born)}".encode()


def adapter_config_key(cube_id: str, digest: str) -> bytes:
    return f"{cube_id}/{digest}/c".encode()


def adapter_weights_key(cube_id: str, digest: str, index: int) -> bytes:
    return f"{cube_id}/{digest}/w/{index:08x}".encode()


def adapter_blob_range(cube_id: str, digest: str) -> tuple[bytes, bytes]:
    return prefix_range(f"{cube_id}/{digest}")


def principal_key(principal_id: str) -> bytes:
    return principal_id.encode()


def grant_key(cube_id: str, principal_id: str) -> bytes:
    return f"{cube_id}/{principal_id}".encode()


def usage_key(cube_id: str, item_id: str) -> bytes:
    """``item_id`` USAGE_CUBE_ROW: the cube's own counters."""
    return f"{cube_id}/{item_id}".encode()


def split_usage_key(key: bytes) -> tuple[str, str]:
    cube_id, _, item_id = bytes(key).decode().partition("/")
    return cube_id, item_id


def audit_key(seq: int) -> bytes:
    return _hex(seq).encode()


def audit_seq(key: bytes) -> int:
    return int(key, 16)


def job_key(job_id: str) -> bytes:
    return job_id.encode()


def purge_key(cube_id: str, purge_id: str) -> bytes:
    return f"{cube_id}/{purge_id}".encode()


def request_key(cube_id: str, principal_id: str, request_id: str) -> bytes:
    return f"{cube_id}/{principal_id}/{request_id}".encode()


def split_request_key(key: bytes) -> tuple[str, str, str]:
    """(cube_id, principal_id, request_id); a request id is the client's and may itself hold "/"."""
    cube_id, principal_id, request_id = bytes(key).decode().split("/", 2)
    return cube_id, principal_id, request_id


def prefix_range(owner_id: str) -> tuple[bytes, bytes]:
    """The [begin, end) key range of every row that starts with ``owner_id/``."""
    return f"{owner_id}/".encode(), f"{owner_id}0".encode()


def split_version_key(key: bytes) -> tuple[str, str, int]:
    cube_id, item_id, born = key.decode().split("/")
    return cube_id, item_id, int(born, 16)
