"""One frozen configuration tree for the daemon.

Sources, lowest precedence first: built-in defaults, the TOML file, ``MEMOSD_*``
environment variables, command-line flags. Each source is read into a flat map of
``section.key`` to a typed, validated value; later sources override earlier ones,
and only then are the frozen dataclasses built. Validating while reading lets
every error name the exact key and the source it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from memosd import __version__

ENV_PREFIX = "MEMOSD_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEVICES = ("auto", "cpu", "cuda")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_DTYPES = ("float16", "bfloat16")
# The serving engines (memosd/runtime/): auto is vllm where it is installed, else transformers.
ENGINES = ("auto", "vllm", "transformers")
COMPOSE_MODES = ("exact", "composed", "auto")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank takes these
# The fusion methods the index package understands; keep in step with memosd/index.
FUSION_METHODS = ("rrf", "linear", "combsum", "combmnz", "dbsf", "tm2c2")


# A cluster node's name ([cluster] node_name; its etcd key memosd/members/<name>): DNS-label-like, lowercase.
NODE_NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key, its source and what was expected."""


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    workers: int = 16  # the syscall executor: threads that run handlers (streams wait holding none)
    upload_workers: int = 4  # threads that consume client streams (ImportAdapter), apart from the above
    stream_idle_seconds: float = 60.0  # a client stream with no message for this long ends with STREAM_IDLE
    grace_seconds: float = 10.0  # how long in-flight RPCs may drain on SIGTERM
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoreConfig:
    sync_commits: bool = True  # fsync the WAL on every Commit
    disk_check_seconds: float = 2.0  # while the disk is full: how often to look for room again


@dataclass(frozen=True)
class LimitsConfig:
    max_item_bytes: int = 32768
    max_items_per_write: int = 1024
    max_staged_changes: int = 100_000
    max_query_bytes: int = 4096
    max_k: int = 1000
    max_adapter_bytes: int = 256 << 20  # both files of an uploaded adapter together
    max_archive_bytes: int = 16 << 30  # an ImportCube archive (spooled to the data dir's disk before it is read)
    # How long a request id (Write, Ingest, Commit, ImportAdapter) is remembered: retries within it are safe.
    request_id_ttl_seconds: float = 86400.0


@dataclass(frozen=True)
class QuotasConfig:
    """What one principal may hold at once, whoever grants it rights; 0 turns a limit off.

    The defaults are far above what an agent uses (a handful of mounts; staging is committed every few
    thousand items at most) and bound what a careless or hostile principal can make the daemon keep."""

    # Open mounts across all cubes: each is a persisted record and memory the daemon keeps until Unmount.
    max_mounts_per_principal: int = 1024
    # Staged text and vectors across the principal's mounts (held in memory until Commit or Unmount):
    # ~100,000 typical items (1 KB of text, a 1.5 KB vector).
    max_staged_bytes_per_principal: int = 256 << 20
    # Streams (a stream holds no thread while it waits, but each is state and a share of the executor):
    max_streams_per_principal: int = 64  # open streaming calls of every kind together
    max_generations_per_principal: int = 16  # concurrent Generate streams
    max_uploads_per_principal: int = 4  # concurrent ImportAdapter and ImportCube uploads
    max_follows_per_principal: int = 8  # concurrent Audit(follow) streams


@dataclass(frozen=True)
class EmbedderConfig:
    model: str = "all-MiniLM-L6-v2"  # a known name, or a local sentence-transformers directory
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 64


@dataclass(frozen=True)
class SearchConfig:
    fusion: str = "rrf"
    rrf_k: int = 5  # memosd.index.fusion.RRF_K: why 5, not the paper's 60
    dense_weight: float = 1.0
    lexical_weight: float = 1.0
    depth: int = 100  # candidates fetched from each list before fusion
    exact_below: int = 2048  # brute-force dense search when a filter leaves fewer candidates
    session_match_weight: float = 0.2  # memosd.kernel.turn_rank.MATCH_WEIGHT; 0: no session match
    period_lift: float = 0.2  # memosd.kernel.search.PERIOD_LIFT: hybrid hits in a period the query names


@dataclass(frozen=True)
class IndexConfig:
    save_interval_seconds: float = 30.0


@dataclass(frozen=True)
class RuntimeConfig:
    """The in-process model that holds activation memory."""

    model: str = "SmolLM2-135M-Instruct"  # the builtin, a local Hugging Face model directory, or "none"
    # Who serves it: vllm (batched, paged KV, multi-LoRA) or transformers (one request at a time; it also
    # trains adapters, whichever engine serves). auto: vllm where it is installed.
    engine: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on cpu, bfloat16 on cuda) | float32 | bfloat16 | float16
    cache_dir: str = ""  # where the dequantized builtin model is cached; empty means the data dir
    pool_bytes: int = 1 << 30  # KV pool budget
    kv_dtype: str = "float16"  # how KV caches are persisted: float16 | bfloat16
    retrieve_k: int = 4  # items Generate retrieves for the last user message, by default
    max_tokens: int = 256  # Generate's default max_tokens
    max_tokens_limit: int = 4096  # the most a request may ask for
    prefill_chunk: int = 512  # tokens per forward pass when encoding a memory block
    # ... when the scheduler encodes one in the background: a Generate waits for at most one such chunk
    background_chunk: int = 128
    max_adapters: int = 8  # LoRA adapters resident in the model at once (vLLM: its LoRA slots)
    max_lora_rank: int = 16  # vLLM: the largest adapter rank it serves (its LoRA buffers are sized by it)
    # How Generate reuses the KV of activated blocks after the first (issue 13): exact (only a combination
    # seen before), composed (each block's own KV at its new position: an approximation), or auto (exact
    # where a seen combination covers it, composed elsewhere). A request may choose (options.compose).
    compose: str = "exact"
    compose_recompute: float = 0.01  # composed: the share of each later block's first tokens recomputed
    # composed, transformers engine: the share of each later block's tokens recomputed besides its first ones,
    # those whose KV deviates most from the prompt's (CacheBlend's selection; one layer over the blocks' tokens)
    compose_deviation: float = 0.0
    # composed, transformers engine: APE's attention adjustment of the later blocks' placed keys, for every
    # query the request computes: logits q.k / T (temperature) and weights times S (scale). 1 and 1: none, the
    # default (T=0.85 meets the needle target on SmolLM2 but is not proven beyond noise: BENCHMARKS.md). vLLM: unused.
    compose_temperature: float = 1.0
    compose_scale: float = 1.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class SchedulerConfig:
    enabled: bool = True  # the MemScheduler loop (it acts only on cubes whose policy is auto)
    interval_seconds: float = 2.0  # between passes
    max_per_tick: int = 2  # background activations per pass at most


@dataclass(frozen=True)
class SecurityConfig:
    # Off only for measurements on a trusted machine: every call then acts as an admin.
    auth: bool = True
    audit: bool = True  # the hash-chained audit log of every syscall
    # Refusals without a valid token: the first per method in each window is recorded, the rest are
    # counted into one record at its end (0: a record each).
    audit_unauthenticated_window_seconds: float = 60.0
    # TLS: both files (PEM) serve TLS; client_ca_file also demands client certificates signed by it (mTLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""


@dataclass(frozen=True)
class LifecycleConfig:
    enabled: bool = True  # the lifecycle loop: TTL expiry, then purging expired items after the grace period
    interval_seconds: float = 60.0  # between passes
    expire_grace_seconds: float = 86400.0  # an expired item is purged this long after its TTL ended


DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
FREE_METRICS_LISTEN = "127.0.0.1:0"  # the default when server.listen has port 0 (loopback, as the default)


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus metrics at http://<listen>/metrics, unauthenticated (like node_exporter): keep it on
    # loopback or behind a firewall. "" turns them off; port 0 picks a free one (written to daemon.json).
    # Left unset while server.listen has port 0, it is "127.0.0.1:0" too: a daemon started to pick any free
    # port (tests, a second daemon beside another) must not then fail on a fixed metrics port.
    listen: str = DEFAULT_METRICS_LISTEN


@dataclass(frozen=True)
class HttpConfig:
    # The OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models), with the same tokens and
    # the same gate as gRPC. Off ("") by default: a daemon that is upgraded must not open a port nobody asked
    # for, and a fixed default would collide with a second daemon beside it. Port 0 picks a free one
    # (written to daemon.json as "http_address"). Plain HTTP: keep it on loopback or behind a TLS proxy.
    listen: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    """Several memosd nodes sharing one etcd cluster (docs/ARCHITECTURE.md, Cluster).

    In progress: with etcd set the daemon is a member, claims its cubes in the directory and routes calls."""

    # etcd's client endpoints, "host:port" or "http://host:port". Empty (the default): one node, no etcd.
    etcd: tuple[str, ...] = ()
    # This node's name among the members (its etcd key memosd/members/<name>): 1-63 of a-z 0-9 . _ -,
    # starting with a letter or digit. Required with etcd: a name must not change when a host is renamed.
    node_name: str = ""
    # The "host:port" other nodes and clients reach this node's gRPC server at (a forwarded call goes
    # there); not a wildcard address, not port 0. Empty: the address the gRPC server is bound to (its port
    # picked when server.listen has port 0), which needs a server.listen host others can dial, not a wildcard.
    advertise: str = ""
    # The membership lease: a node that stops renewing it leaves the member list this long after its last
    # renewal (renewed every third of it). etcd grants 2 s at the least.
    lease_seconds: int = 5
    # With security.tls_cert_file set, calls forwarded to another node go over TLS, and this CA (PEM) is what
    # the other nodes' certificates must be signed by. Empty: security.tls_client_ca_file, else the
    # system's roots. The node presents its own certificate (security.tls_cert_file) to the other nodes,
    # so mTLS between them works when their certificates are signed by their client CA.
    tls_ca_file: str = ""


@dataclass(frozen=True)
class ReaderConfig:
    """The MemReader (Extract jobs, docs/ARCHITECTURE.md)."""

    # The OpenAI-compatible endpoints an Extract job may send a cube's turns to, with the caller's token:
    # URL prefixes ("https://api.example.com/v1", "http://127.0.0.1:"). An endpoint named in a request must
    # start with one of them. Empty (the default): only the in-process model, so no caller can make the
    # daemon send requests to an address the operator did not choose.
    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    data_dir: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    config_file: Path | None = None  # the TOML file that was read, if any

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the effective configuration, for logging at start."""
        out: dict[str, Any] = {"data_dir": str(self.data_dir)}
        for name in SECTIONS:
            # A list, not a tuple, so the view survives a JSON round trip unchanged ([cluster] etcd).
            out[name] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(getattr(self, name)).items()}
        out["config_file"] = None if self.config_file is None else str(self.config_file)
        return out


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "store": StoreConfig,
    "limits": LimitsConfig,
    "quotas": QuotasConfig,
    "embedder": EmbedderConfig,
    "search": SearchConfig,
    "index": IndexConfig,
    "runtime": RuntimeConfig,
    "log": LogConfig,
    "security": SecurityConfig,
    "scheduler": SchedulerConfig,
    "lifecycle": LifecycleConfig,
    "metrics": MetricsConfig,
    "http": HttpConfig,
    "cluster": ClusterConfig,
    "reader": ReaderConfig,
}
STRINGS = tuple[str, ...]  # the one list type a key may have: TOML ["a", "b"], or "a,b" from text

# "section.key" -> field type; "data_dir" is the one top-level key.
_FIELD_TYPES: dict[str, type[Any]] = {"data_dir": Path}
for _section, _cls in SECTIONS.items():
    for _name, _type in get_type_hints(_cls).items():
        _FIELD_TYPES[f"{_section}.{_name}"] = _type


def _listen_ok(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        return False
    if host.startswith("[") != host.endswith("]"):  # IPv6 literals are bracketed: "[::1]:50051"
        return False
    return 0 <= int(port) <= 65535


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _etcd_endpoints_ok(endpoints: tuple[str, ...]) -> bool:
    return all(not e.startswith("https://") and _listen_ok(e.removeprefix("http://")) and not e.endswith(":0")
               for e in endpoints)


WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # listen on every interface: no one can dial these


def _advertise_ok(value: str) -> bool:
    host = value.rpartition(":")[0].strip("[]")
    return value == "" or (_listen_ok(value) and not value.endswith(":0") and host not in WILDCARD_HOSTS)


_POSITIVE_INT = (_positive, "an integer > 0")
_POSITIVE_NUM = (_positive, "a number > 0")
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "server.listen": (_listen_ok, 'a "host:port" address with port 0-65535'),
    "server.workers": _POSITIVE_INT,
    "server.upload_workers": _POSITIVE_INT,
    "server.stream_idle_seconds": _POSITIVE_NUM,
    "server.grace_seconds": (_non_negative, "a number >= 0"),
    "quotas.max_streams_per_principal": _POSITIVE_INT,
    "quotas.max_generations_per_principal": _POSITIVE_INT,
    "quotas.max_uploads_per_principal": _POSITIVE_INT,
    "quotas.max_follows_per_principal": _POSITIVE_INT,
    "server.max_message_bytes": _POSITIVE_INT,
    "limits.max_item_bytes": _POSITIVE_INT,
    "limits.max_items_per_write": _POSITIVE_INT,
    "limits.max_staged_changes": _POSITIVE_INT,
    "limits.max_query_bytes": _POSITIVE_INT,
    "limits.max_k": _POSITIVE_INT,
    "limits.max_adapter_bytes": _POSITIVE_INT,
    "limits.max_archive_bytes": _POSITIVE_INT,
    "quotas.max_mounts_per_principal": (_non_negative, "an integer >= 0 (0: no limit)"),
    "quotas.max_staged_bytes_per_principal": (_non_negative, "an integer >= 0 (0: no limit)"),
    "limits.request_id_ttl_seconds": _POSITIVE_NUM,
    "embedder.model": (bool, "a non-empty model name or directory"),
    "embedder.device": (lambda v: v in DEVICES, f"one of {', '.join(DEVICES)}"),
    "embedder.batch_size": _POSITIVE_INT,
    "search.fusion": (lambda v: v in FUSION_METHODS, f"one of {', '.join(FUSION_METHODS)}"),
    "search.rrf_k": _POSITIVE_INT,
    "search.dense_weight": (_non_negative, "a number >= 0"),
    "search.lexical_weight": (_non_negative, "a number >= 0"),
    "search.depth": _POSITIVE_INT,
    "search.exact_below": (_non_negative, "an integer >= 0"),
    "search.session_match_weight": (_non_negative, "a number >= 0"),
    "search.period_lift": (_non_negative, "a number >= 0"),
    "index.save_interval_seconds": _POSITIVE_NUM,
    "store.disk_check_seconds": _POSITIVE_NUM,
    "security.audit_unauthenticated_window_seconds": (_non_negative, "a number >= 0"),
    "scheduler.interval_seconds": _POSITIVE_NUM,
    "scheduler.max_per_tick": _POSITIVE_INT,
    "lifecycle.interval_seconds": _POSITIVE_NUM,
    "lifecycle.expire_grace_seconds": (_non_negative, "a number >= 0"),
    "runtime.model": (bool, 'the builtin model name, a local model directory, or "none"'),
    "runtime.device": (lambda v: v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()),
                       "auto, cpu, cuda or cuda:N"),
    "runtime.dtype": (lambda v: v in MODEL_DTYPES, f"one of {', '.join(MODEL_DTYPES)}"),
    "runtime.pool_bytes": (_non_negative, "an integer >= 0"),
    "runtime.kv_dtype": (lambda v: v in KV_DTYPES, f"one of {', '.join(KV_DTYPES)}"),
    "runtime.retrieve_k": (lambda v: 0 <= v <= 100, "an integer from 0 to 100"),
    "runtime.max_tokens": _POSITIVE_INT,
    "runtime.max_tokens_limit": _POSITIVE_INT,
    "runtime.prefill_chunk": _POSITIVE_INT,
    "runtime.background_chunk": _POSITIVE_INT,
    "runtime.max_adapters": _POSITIVE_INT,
    "runtime.engine": (lambda v: v in ENGINES, f"one of {', '.join(ENGINES)}"),
    "runtime.compose": (lambda v: v in COMPOSE_MODES, f"one of {', '.join(COMPOSE_MODES)}"),
    "runtime.compose_recompute": (lambda v: 0 <= v <= 1, "a number from 0 to 1 (a share of a block's tokens)"),
    "runtime.compose_deviation": (lambda v: 0 <= v <= 1, "a number from 0 to 1 (a share of a block's tokens)"),
    "runtime.compose_temperature": (lambda v: 0 < v <= 4, "a number above 0, at most 4 (1: no adjustment)"),
    "runtime.compose_scale": (lambda v: 0 < v <= 4, "a number above 0, at most 4 (1: no adjustment)"),
    "runtime.max_lora_rank": (lambda v: v in LORA_RANKS, f"one of {', '.join(map(str, LORA_RANKS))}"),
    "log.level": (lambda v: v in LOG_LEVELS, f"one of {', '.join(LOG_LEVELS)}"),
    "metrics.listen": (lambda v: v == "" or _listen_ok(v), 'a "host:port" address with port 0-65535, or "" (off)'),
    "http.listen": (lambda v: v == "" or _listen_ok(v), 'a "host:port" address with port 0-65535, or "" (off)'),
    "cluster.etcd": (_etcd_endpoints_ok, 'a list of etcd endpoints "host:port" or "http://host:port" (port 1-65535; '
                     "https is not supported yet), or [] (a single node)"),
    "cluster.node_name": (lambda v: v == "" or bool(NODE_NAME_RE.fullmatch(v)),
                          "1-63 of a-z 0-9 . _ -, starting with a letter or digit"),
    "reader.endpoints": (lambda v: all(re.match(r"^https?://[^\s/@?#]+", e) for e in v),
                         'a list of http(s) URL prefixes with a host ("https://api.example.com/v1"), or []'),
    "cluster.advertise": (_advertise_ok, 'a "host:port" others can dial (no wildcard host, no port 0), or ""'),
    "cluster.lease_seconds": (lambda v: 2 <= v <= 3600, "an integer from 2 to 3600 (seconds)"),
}
# Enumerated words are matched case-insensitively ("INFO" is fine).
_LOWERCASE = {"embedder.device", "search.fusion", "log.level", "runtime.device", "runtime.dtype", "runtime.kv_dtype",
              "runtime.engine", "runtime.compose"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_TYPE_WORDS: dict[object, str] = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                   Path: "a path", STRINGS: "a list of strings"}


def _fail(key: str, raw: object, source: str, expected: str) -> ConfigError:
    return ConfigError(f"invalid {key} = {raw!r} (from {source}): expected {expected}")


def _convert(key: str, raw: object, source: str, *, text: bool) -> Any:
    """Convert one raw value to its field's type and validate it.

    ``text`` values come from the environment or flags and are parsed; TOML values
    already have a type, which must match (an int is accepted where a float is due).
    """
    typ = _FIELD_TYPES[key]
    value: Any
    if text:
        assert isinstance(raw, str)
        s = raw.strip()
        try:
            if typ is bool:
                if s.lower() not in _TRUE | _FALSE:
                    raise ValueError(s)
                value = s.lower() in _TRUE
            elif typ is int:
                value = int(s)
            elif typ is float:
                value = float(s)
            elif typ == STRINGS:  # "a:1, b:2" -> ("a:1", "b:2"); "" -> ()
                value = tuple(part.strip() for part in s.split(",") if part.strip())
            else:
                value = raw
        except ValueError:
            raise _fail(key, raw, source, _TYPE_WORDS[typ]) from None
    else:
        if typ is float and type(raw) is int:
            raw = float(raw)  # `grace_seconds = 5` in TOML means 5.0
        if typ == STRINGS:
            if not isinstance(raw, list) or not all(type(v) is str for v in raw):
                raise _fail(key, raw, source, _TYPE_WORDS[typ])
            raw = tuple(raw)
        # An exact type match: bool is a subclass of int, and `workers = true` must not pass as 1.
        elif type(raw) is not (str if typ is Path else typ):
            raise _fail(key, raw, source, _TYPE_WORDS[typ])
        value = raw
    if typ is float and not math.isfinite(value):
        raise _fail(key, raw, source, "a finite number")
    if key in _LOWERCASE:
        value = value.lower()
    if typ is Path:
        if not value:
            raise _fail(key, raw, source, "a non-empty path")
        value = Path(value)
    check = _CHECKS.get(key)
    if check is not None and not check[0](value):
        raise _fail(key, raw, source, check[1])
    return value


def parse_value(key: str, text: str, source: str) -> Any:
    """One ``section.key`` given as text (an environment variable, a flag, ``memosctl cluster config set``),
    converted to its field's type and checked by the same rule as the file's. Raises ConfigError."""
    _check_key(key, source)
    return _convert(key, text, source, text=True)


def _known_keys(section: str) -> str:
    return ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))


def _check_key(key: str, source: str) -> None:
    if key in _FIELD_TYPES:
        return
    section, dot, _ = key.partition(".")
    if dot and section in SECTIONS:
        raise ConfigError(f"unknown key {key!r} (from {source}); [{section}] has: {_known_keys(section)}")
    what = f"no section {section!r}" if dot else "expected data_dir or section.key"
    raise ConfigError(f"unknown key {key!r} (from {source}): {what}; sections are: {', '.join(SECTIONS)}")


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def _xdg_dir(env: Mapping[str, str], var: str, fallback: str) -> Path:
    # The XDG spec says to ignore unset, empty or relative values.
    value = env.get(var, "")
    return Path(value) if os.path.isabs(value) else _home(env) / fallback


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where data lives when nothing says otherwise.

    Under systemd with ``StateDirectory=`` the service manager creates the directory,
    owns it to the service user and exports ``STATE_DIRECTORY``: use it. It is set
    for system services whether or not they run as root (the unit runs as User=memosd).
    Otherwise it is per user: ``$XDG_DATA_HOME/memosd`` or ``~/.local/share/memosd``.
    """
    env = os.environ if env is None else env
    state = env.get("STATE_DIRECTORY", "")
    if state:
        return Path(state.split(":")[0])  # several StateDirectory= entries are joined by ":"
    return _xdg_dir(env, "XDG_DATA_HOME", ".local/share") / "memosd"


def _abs(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _read_file(path: Path) -> dict[str, Any]:
    source = f"config file {path}"
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    values: dict[str, Any] = {}
    for top, content in doc.items():
        if top in SECTIONS:
            if not isinstance(content, dict):
                raise ConfigError(f"invalid {top} = {content!r} (from {source}): expected a table [{top}]")
            for name, raw in content.items():
                key = f"{top}.{name}"
                _check_key(key, source)
                values[key] = _convert(key, raw, source, text=False)
        elif isinstance(content, dict):
            raise ConfigError(f"unknown section [{top}] (from {source}); sections are: {', '.join(SECTIONS)}")
        else:
            _check_key(top, source)  # only data_dir passes
            # A relative data_dir in the file means relative to the file, not to wherever we started.
            values[top] = _abs(_convert(top, content, source, text=False), path.parent)
    return values


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    shortcuts = {"DATA_DIR": "data_dir", "LISTEN": "server.listen"}
    for var in sorted(env):
        # MEMOSD_TEST_CRASH_AT is a test-only hook, not configuration (memosd/cluster/crash.py).
        if not var.startswith(ENV_PREFIX) or var in (ENV_PREFIX + "CONFIG", ENV_PREFIX + "TEST_CRASH_AT"):
            continue
        source = f"environment variable {var}"
        rest = var[len(ENV_PREFIX) :]
        if rest in shortcuts:
            key = shortcuts[rest]
        elif "__" in rest:
            section, _, name = rest.partition("__")
            key = f"{section.lower()}.{name.lower()}"
            _check_key(key, source)
        else:
            # Strict, so a typo such as MEMOSD_LOG_LEVEL is reported rather than silently ignored.
            raise ConfigError(
                f"unknown environment variable {var}: expected MEMOSD_CONFIG, MEMOSD_DATA_DIR, "
                f"MEMOSD_LISTEN or MEMOSD_<SECTION>__<KEY> (e.g. MEMOSD_LOG__LEVEL)"
            )
        values[key] = _convert(key, env[var], source, text=True)
    if "data_dir" in values:
        values["data_dir"] = _abs(values["data_dir"], Path.cwd())
    return values


def _read_flags(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in args.set or ():
        source = f"flag --set {item}"
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"invalid {source}: expected section.key=value")
        _check_key(key, source)
        values[key] = _convert(key, raw, source, text=True)
    # The named flags win over --set for the same key.
    for flag, key in (
        ("--data-dir", "data_dir"),
        ("--listen", "server.listen"),
        ("--log-level", "log.level"),
    ):
        raw = getattr(args, flag[2:].replace("-", "_"))
        if raw is not None:
            values[key] = _convert(key, raw, f"flag {flag}", text=True)
    if "data_dir" in values:
        values["data_dir"] = _abs(values["data_dir"], Path.cwd())
    return values


def _config_path(args: argparse.Namespace, env: Mapping[str, str]) -> Path | None:
    """The TOML file to read: explicit ones must exist, the default one may be absent."""
    explicit = args.config or env.get(ENV_PREFIX + "CONFIG")
    if explicit:
        path = _abs(Path(explicit), Path.cwd())
        if not path.is_file():
            origin = "flag --config" if args.config else "environment variable MEMOSD_CONFIG"
            raise ConfigError(f"config file {path} (from {origin}) does not exist or is not a file")
        return path
    default = _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "memosd" / "memosd.toml"
    return default if default.is_file() else None


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memosd",
        description=(
            "memosd: a memory operating system for language models. Serves versioned "
            "MemCubes (plaintext, activation and parametric memory) over gRPC."
        ),
        epilog=(
            "Settings come from, lowest precedence first: built-in defaults, the TOML file "
            "(--config, $MEMOSD_CONFIG, or $XDG_CONFIG_HOME/memosd/memosd.toml if present), "
            "MEMOSD_* environment variables (MEMOSD_DATA_DIR, MEMOSD_LISTEN, "
            "MEMOSD_<SECTION>__<KEY> such as MEMOSD_LIMITS__MAX_ITEM_BYTES=65536), "
            "then these flags. Sections: " + ", ".join(SECTIONS) + "."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    parser.add_argument("--data-dir", metavar="DIR", help="where cubes, indexes and caches are stored")
    parser.add_argument("--listen", metavar="HOST:PORT", help="gRPC listen address (port 0 picks a free one, and then the metrics port "
                        "too unless metrics.listen is set)")
    parser.add_argument("--log-level", metavar="LEVEL", help=f"one of {', '.join(LOG_LEVELS)}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (every key, from every source) as TOML and exit")
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="set any key, e.g. --set search.rrf_k=30 (repeatable)",
    )
    return parser


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration. Raises ConfigError; bad flag syntax exits via argparse."""
    argv = sys.argv[1:] if argv is None else list(argv)
    env = os.environ if env is None else env
    args = build_arg_parser().parse_args(argv)

    config_file = _config_path(args, env)
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_file(config_file))
    values.update(_read_env(env))
    values.update(_read_flags(args))
    # The metrics port follows port 0 unless some source set it (see MetricsConfig).
    listen_port = str(values.get("server.listen", ServerConfig.listen)).rpartition(":")[2]
    if "metrics.listen" not in values and int(listen_port) == 0:
        values["metrics.listen"] = FREE_METRICS_LISTEN

    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        prefix = name + "."
        kwargs = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
        sections[name] = cls(**kwargs)
    runtime: RuntimeConfig = sections["runtime"]
    if runtime.max_tokens > runtime.max_tokens_limit:
        raise ConfigError(f"runtime.max_tokens = {runtime.max_tokens} is above runtime.max_tokens_limit = "
                          f"{runtime.max_tokens_limit}: the default reply length must be one a request may ask for")
    security: SecurityConfig = sections["security"]
    if bool(security.tls_cert_file) != bool(security.tls_key_file):
        raise ConfigError("security.tls_cert_file and security.tls_key_file go together: give both to serve TLS")
    if security.tls_client_ca_file and not security.tls_cert_file:
        raise ConfigError("security.tls_client_ca_file (mTLS) needs TLS: set security.tls_cert_file and "
                          "security.tls_key_file too")
    cluster: ClusterConfig = sections["cluster"]
    if cluster.etcd and not cluster.node_name:
        raise ConfigError("cluster.etcd is set, so cluster.node_name must be set too: the name this node joins "
                          "the cluster under")
    listen_host = sections["server"].listen.rpartition(":")[0].strip("[]")
    if cluster.etcd and not cluster.advertise and listen_host in WILDCARD_HOSTS:
        raise ConfigError(f"cluster.etcd is set and server.listen = {sections['server'].listen!r} is a wildcard "
                          "address, so cluster.advertise must say where the other nodes reach this one (host:port)")
    data_dir = values.get("data_dir") or default_data_dir(env)
    return Config(data_dir=data_dir, config_file=config_file, **sections)
