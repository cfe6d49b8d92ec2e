"""The cluster config in etcd: what every node must agree on, and the cluster-wide defaults an operator sets.

One key, ``memosd/config``, JSON::

  {"version": 1,
   "fixed":    {"embedder.fingerprint": ..., "embedder.dim": 384, "runtime.model": ..., "security.auth": true,
                "security.tls": false, "cluster.lease_seconds": 5, "cluster.placement": "rendezvous-sha256-v1"},
   "settings": {"quotas.max_mounts_per_principal": 1024, ...},
   "created_by": node, "updated_by": node, "update_ns": ...}

The first node to start writes it (a txn: only if the key is absent), from its own configuration. Every
later node compares its own ``fixed`` values with the stored ones before it serves, and refuses to start
with one line naming the setting and both values when one differs (``mismatches``, ``refusal``). Why each
must agree:

- ``embedder.fingerprint`` / ``embedder.dim``: a cube's vectors and indexes are its embedder's. A node with
  another embedder re-embeds a cube that moves to it (slowly, while the cube is frozen) and then answers
  its searches differently: a cube's answers must not depend on which node serves it.
- ``runtime.model``: a moved cube's KV caches load only under the same model fingerprint (the others are
  dropped and encoded again), and Generate on a cube must not change with its node.
- ``security.auth``: principals and grants are cluster-wide; a node with auth off would serve its cubes
  (and any cube moved to it) to anyone.
- ``security.tls``: a node forwards over TLS exactly when it serves TLS itself, so a mixed cluster cannot
  forward between its TLS and plaintext nodes.
- ``cluster.lease_seconds``: the failure bound every node reasons with (a dead owner's cubes unavailable
  within it, the move fence, the grants' trust window and revocation bound are all derived from it).
- ``cluster.placement``: the placement rule's name (placement.RULE): every node places a new cube the same way.

A fixed value the stored record lacks (written by an older memosd) is not compared. Fixed values are
never changed by ``memosctl cluster config set``: they are set when the cluster is made (to change one,
stop every node, delete the key, start them with the new value).

``settings`` are the cluster-wide defaults an operator changes once, for every node: today the
``[quotas]`` (what one principal may hold). A principal's calls are served by its cubes' owners, so a
quota that differed per node would depend on where its cubes happen to be. On a cluster node the stored
values replace the node's own ``[quotas]`` (which only seed the record when it is first written); an
operator changes them with ``memosctl cluster config set KEY VALUE`` (``changed`` checks the key and the
value by config.py's own rules; the write is a compare-and-swap on the key's mod_revision), and every node
applies the change when its directory watch (cluster/view.py) brings it. Quotas are still counted per node.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memosd.cluster.directory import ROOT
from memosd.cluster.etcd import Compare, EtcdClient, EtcdError, Get, KeyValue, Put, RangeResult
from memosd.cluster.placement import RULE
from memosd.config import Config, ConfigError, QuotasConfig, parse_value
from memosd.errors import ClusterUnavailable, InvalidField

KEY = ROOT + "config"
VERSION = 1
Value = str | int | bool

FIXED_KEYS = ("embedder.fingerprint", "embedder.dim", "runtime.model", "security.auth", "security.tls",
              "cluster.lease_seconds", "cluster.placement")
SETTING_KEYS = tuple(f"quotas.{f.name}" for f in dataclasses.fields(QuotasConfig))
CAS_ATTEMPTS = 5  # a set that loses its compare to another set reads again and retries, this many times
UNAVAILABLE = ("the cluster config is unavailable (etcd has no quorum, or no endpoint answers): changes are "
               "refused until it is back; every node keeps applying the config it last read")


class ClusterConfigMismatch(Exception):
    """This node's must-agree settings differ from the cluster's: the message is the one-line refusal."""


@dataclass(frozen=True)
class ClusterSettings:
    fixed: Mapping[str, Value]
    settings: Mapping[str, Value]
    created_by: str = ""
    updated_by: str = ""
    update_ns: int = 0
    revision: int = field(default=0, compare=False)  # the key's mod_revision as read (0: not from etcd)

    def record(self) -> bytes:
        return json.dumps({"version": VERSION, "fixed": dict(self.fixed), "settings": dict(self.settings),
                           "created_by": self.created_by, "updated_by": self.updated_by,
                           "update_ns": self.update_ns}, sort_keys=True).encode()

    @staticmethod
    def from_kv(kv: KeyValue) -> ClusterSettings:
        """Raises ValueError (or KeyError, TypeError) for a record that is not one."""
        doc = kv.json()
        if not isinstance(doc, dict) or not isinstance(doc.get("fixed"), dict) \
                or not isinstance(doc.get("settings"), dict):
            raise ValueError(f"{KEY} is not a cluster config record: {kv.value[:200]!r}")
        return ClusterSettings(dict(doc["fixed"]), dict(doc["settings"]), str(doc.get("created_by", "")),
                               str(doc.get("updated_by", "")), int(doc.get("update_ns", 0)), kv.mod_revision)

    def quotas(self, base: QuotasConfig) -> QuotasConfig:
        """``base`` with the stored quotas in place of its own (keys this memosd does not know are skipped)."""
        values = {k.partition(".")[2]: v for k, v in self.settings.items() if k in SETTING_KEYS and type(v) is int}
        return dataclasses.replace(base, **values)


def fixed_of(config: Config, embedder_fingerprint: str, embedder_dim: int) -> dict[str, Value]:
    """This node's must-agree values (the embedder's after it loaded: its fingerprint names its bytes)."""
    return {"embedder.fingerprint": embedder_fingerprint, "embedder.dim": embedder_dim,
            "runtime.model": config.runtime.model, "security.auth": config.security.auth,
            "security.tls": bool(config.security.tls_cert_file), "cluster.lease_seconds": config.cluster.lease_seconds,
            "cluster.placement": RULE}


def settings_of(quotas: QuotasConfig) -> dict[str, Value]:
    return {f"quotas.{k}": v for k, v in dataclasses.asdict(quotas).items()}


@dataclass(frozen=True)
class Mismatch:
    key: str
    ours: Value
    theirs: Value


def _same(a: Value, b: Value) -> bool:
    return type(a) is type(b) and a == b  # True is not 1: JSON keeps booleans apart from numbers


def mismatches(ours: Mapping[str, Value], theirs: Mapping[str, Value]) -> list[Mismatch]:
    """The must-agree values that differ, in FIXED_KEYS order; a key either side lacks is not compared."""
    return [Mismatch(k, ours[k], theirs[k]) for k in FIXED_KEYS
            if k in ours and k in theirs and not _same(ours[k], theirs[k])]


def _show(value: Value) -> str:
    return json.dumps(value)  # true/false, numbers, and strings quoted: as in the record


def refusal(found: list[Mismatch], stored: ClusterSettings) -> str:
    """One line: the first differing setting with both values, and how many more differ."""
    first = found[0]
    more = f" (and {len(found) - 1} more: {', '.join(m.key for m in found[1:])})" if len(found) > 1 else ""
    by = f", written by node {stored.created_by!r}" if stored.created_by else ""
    return (f"cluster config: {first.key} is {_show(first.ours)} on this node but {_show(first.theirs)} in the "
            f"cluster ({KEY}{by}){more}; every node must agree on it: give this node the cluster's value")


def changed(stored: ClusterSettings, key: str, text: str, node: str) -> ClusterSettings:
    """The record with ``key`` set to ``text`` (parsed and checked as config.py would). Raises InvalidField."""
    if key in FIXED_KEYS:
        raise InvalidField(f"{key} is fixed when the cluster is made (every node must agree on it), so it cannot "
                           "be set; the settings an operator can change are: " + ", ".join(SETTING_KEYS),
                           field="key", key=key)
    if key not in SETTING_KEYS:
        raise InvalidField(f"unknown cluster setting {key!r}; the settings are: " + ", ".join(SETTING_KEYS),
                           field="key", key=key)
    try:
        value = parse_value(key, text, "memosctl cluster config set")
    except ConfigError as e:
        raise InvalidField(str(e), field="value", key=key) from None
    return dataclasses.replace(stored, settings={**stored.settings, key: value}, updated_by=node,
                               update_ns=time.time_ns())


class ClusterConfigStore:
    def __init__(self, client: EtcdClient, *, key: str = KEY) -> None:
        self.client = client
        self.key = key

    def read(self) -> ClusterSettings | None:
        kv = self.client.get(self.key)
        return ClusterSettings.from_kv(kv) if kv is not None else None

    def join(self, ours: ClusterSettings) -> tuple[ClusterSettings, bool]:
        """Write ``ours`` if there is no cluster config yet, else read it; returns it and whether we wrote it.
        Raises ClusterConfigMismatch when our fixed values differ, EtcdError when etcd cannot say."""
        result = self.client.txn([Compare.create_revision(self.key, "==", 0)], [Put(self.key, ours.record())],
                                 [Get(self.key)])
        if result.succeeded:
            return dataclasses.replace(ours, revision=result.revision), True
        read = result.responses[0] if result.responses else None
        kvs = read.kvs if isinstance(read, RangeResult) else []
        if not kvs:  # deleted between the compare and the read: cannot be, one txn; say so rather than guess
            raise EtcdError(f"{self.key} vanished inside one txn")
        stored = ClusterSettings.from_kv(kvs[0])
        found = mismatches(ours.fixed, stored.fixed)
        if found:
            raise ClusterConfigMismatch(refusal(found, stored))
        return stored, False

    def set(self, key: str, text: str, node: str) -> ClusterSettings:
        """Change one setting: read, check, compare-and-swap on the key's mod_revision (another set that won
        meanwhile is read and kept). Raises InvalidField, ClusterUnavailable."""
        try:
            for _ in range(CAS_ATTEMPTS):
                stored = self.read()
                if stored is None:
                    raise InvalidField(f"there is no cluster config in etcd ({self.key}): a node writes it when it "
                                       "starts; restart one", field="key", key=key)
                new = changed(stored, key, text, node)
                result = self.client.txn([Compare.mod_revision(self.key, "==", stored.revision)],
                                         [Put(self.key, new.record())])
                if result.succeeded:
                    return dataclasses.replace(new, revision=result.revision)
        except EtcdError as e:  # EtcdUnavailable among them: no quorum, or a txn whose outcome is unknown
            raise ClusterUnavailable(f"{UNAVAILABLE} ({e})") from None
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidField(f"the cluster config in etcd ({self.key}) cannot be read: {e}", field="key",
                               key=key) from None
        raise ClusterUnavailable(f"the cluster config changed {CAS_ATTEMPTS} times while {key} was being set; "
                                 "try again")


def as_text(values: Mapping[str, Any]) -> dict[str, str]:
    """The wire's view: booleans and numbers as JSON (true, 1024), strings as they are."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in sorted(values.items())}


__all__ = ["FIXED_KEYS", "KEY", "SETTING_KEYS", "ClusterConfigMismatch", "ClusterConfigStore", "ClusterSettings",
           "Mismatch", "Value", "as_text", "changed", "fixed_of", "mismatches", "refusal", "settings_of"]
