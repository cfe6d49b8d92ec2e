"""The directory and the member list as this node last saw them: a watch-fed cache the router reads.

One range over ``memosd/`` (members, cubes and names at one revision), then a watch from the revision
after it; when the watch ends (its etcd member stopped, a compaction) or etcd cannot be reached, the
cache keeps what it knew and the follower reads it all again once etcd answers. So routing never waits
on etcd: a call on a cube whose owner is known keeps working with etcd out of reach (issue 18).

Reads are plain dict lookups under a lock, from the event loop or any thread. ``lookup`` is the one
call that may wait on etcd: a miss (a cube created a moment ago on another node, before its watch
event arrived here) is read from the directory itself, once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from memosd.cluster.directory import ROOT, Directory, Entry
from memosd.cluster.etcd import EtcdClient, EtcdError, KeyValue, WatchEvent
from memosd.cluster.membership import MEMBERS_PREFIX, Member
from memosd.kernel.ids import CUBE_ID_RE, TAG_BYTES
from memosd.logfmt import log_event

log = logging.getLogger("memosd.cluster")
RETRY_SECONDS = 0.5


def node_tag(node_name: str) -> bytes:
    """The bytes a node puts into its mount and job ids (kernel/ids.py): the first of sha256(name)."""
    return hashlib.sha256(node_name.encode()).digest()[:TAG_BYTES]


@dataclass(frozen=True)
class Owner:
    """Where a cube (or a mount, a job) is served: the node's name, its address, and whether it is live."""

    node: str
    address: str
    live: bool


class DirectoryView:
    def __init__(self, client: EtcdClient, *, root: str = ROOT) -> None:
        self.client = client
        self._root = root
        self.directory = Directory(client, root=root)
        self._cubes_prefix = self.directory.cubes
        self._lock = threading.Lock()
        self._cubes: dict[str, Entry] = {}
        self._names: dict[str, str] = {}  # name -> cube id, from the entries (names/ agrees: one txn)
        self._live: dict[str, str] = {}  # member -> address, live now
        self._addresses: dict[str, str] = {}  # member -> its last known address (kept after it goes)
        self._tags: dict[bytes, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()  # set once the first full read is in
        # The cluster config key (cluster/settings.py) as the watch brings it: called on the follower's thread,
        # outside the lock, with the record each time it is read or changes (not when it is deleted: the
        # nodes keep applying the one they have).
        self.on_settings: Callable[[KeyValue], None] | None = None
        self._settings_key = root + "config"

    # -- following etcd --------------------------------------------------------------------------------
    def start(self) -> None:
        revision = self._load()
        self._thread = threading.Thread(target=self._follow, args=(revision,), name="cluster-directory",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _load(self) -> int:
        """Everything under the root, at one revision; returns it (the watch starts after it)."""
        found = self.client.range(self._root, prefix=True)
        cubes: dict[str, Entry] = {}
        live: dict[str, str] = {}
        settings: KeyValue | None = None
        for kv in found.kvs:
            if kv.key == self._settings_key.encode():
                settings = kv
            self._read_into(kv, cubes, live)
        if settings is not None:
            self._settings(settings)
        with self._lock:
            self._cubes = cubes
            self._names = {e.name: e.cube_id for e in cubes.values() if e.name}
            self._live = live
            for name, address in live.items():
                self._remember(name, address)
        self.synced.set()
        return found.revision

    def _read_into(self, kv: KeyValue, cubes: dict[str, Entry], live: dict[str, str]) -> None:
        key = kv.key.decode(errors="replace")
        try:
            if key.startswith(self._cubes_prefix):
                cube_id = key[len(self._cubes_prefix):]
                cubes[cube_id] = Entry.from_kv(cube_id, kv)
            elif key.startswith(MEMBERS_PREFIX):
                member = Member.from_kv(kv)
                live[member.name] = member.address
        except (ValueError, KeyError, TypeError) as e:
            log_event(log, "cluster_record_unreadable", level=logging.WARNING, key=key, error=str(e))

    def _remember(self, name: str, address: str) -> None:
        self._addresses[name] = address
        self._tags[node_tag(name)] = name

    def _follow(self, revision: int) -> None:
        while not self._stop.is_set():
            try:
                if not revision:
                    revision = self._load()
                revision = self._watch(revision + 1)
            except EtcdError as e:
                log_event(log, "cluster_directory_unread", level=logging.DEBUG, error=str(e))
                revision = 0  # read it all again once etcd answers: events may have been missed
                self._stop.wait(RETRY_SECONDS)

    def _watch(self, start: int) -> int:
        """Apply events from ``start`` until the watch ends; returns the last revision applied."""
        last = start - 1
        with self.client.watch(self._root, prefix=True, start_revision=start) as watch:
            while not self._stop.is_set():
                try:
                    events = watch.next(timeout=0.5)
                except TimeoutError:
                    continue
                except StopIteration:
                    return last
                for event in events:
                    self._apply(event)
                    last = max(last, event.kv.mod_revision)
        return last

    def _settings(self, kv: KeyValue) -> None:
        if self.on_settings is not None:
            try:
                self.on_settings(kv)
            except Exception as e:  # never let the follower die: routing reads what it keeps
                log_event(log, "cluster_config_unapplied", level=logging.WARNING, error=f"{type(e).__name__}: {e}")

    def _apply(self, event: WatchEvent) -> None:
        key = event.kv.key.decode(errors="replace")
        if key == self._settings_key:
            if event.type == "PUT":
                self._settings(event.kv)
            return
        with self._lock:
            if key.startswith(self._cubes_prefix):
                cube_id = key[len(self._cubes_prefix):]
                old = self._cubes.pop(cube_id, None)
                if old is not None and old.name and self._names.get(old.name) == cube_id:
                    del self._names[old.name]
                if event.type == "PUT":
                    cubes: dict[str, Entry] = {}
                    self._read_into(event.kv, cubes, {})
                    for entry in cubes.values():
                        self._set(entry)
            elif key.startswith(MEMBERS_PREFIX):
                name = key[len(MEMBERS_PREFIX):]
                if event.type == "DELETE":
                    self._live.pop(name, None)
                else:
                    live: dict[str, str] = {}
                    self._read_into(event.kv, {}, live)
                    for member, address in live.items():
                        self._live[member] = address
                        self._remember(member, address)

    def _set(self, entry: Entry) -> None:
        self._cubes[entry.cube_id] = entry
        if entry.name:
            self._names[entry.name] = entry.cube_id

    # -- what this node changed itself (seen before its watch event arrives) ---------------------------
    def noted(self, entry: Entry) -> None:
        with self._lock:
            self._set(entry)

    def dropped(self, cube_id: str) -> None:
        with self._lock:
            old = self._cubes.pop(cube_id, None)
            if old is not None and old.name and self._names.get(old.name) == cube_id:
                del self._names[old.name]

    # -- reads -----------------------------------------------------------------------------------------
    def entry(self, ref: str) -> Entry | None:
        """The cached entry of a cube by id or name (no etcd call)."""
        with self._lock:
            cube_id = ref if CUBE_ID_RE.fullmatch(ref) else self._names.get(ref, "")
            return self._cubes.get(cube_id)

    def lookup(self, ref: str) -> Entry | None:
        """The entry by id or name: the cache, else the directory itself (None: not in the cluster, or
        etcd cannot say now)."""
        found = self.entry(ref)
        if found is not None:
            return found
        try:
            cube_id = ref if CUBE_ID_RE.fullmatch(ref) else self.directory.lookup_name(ref)
            entry = self.directory.lookup(cube_id) if cube_id else None
        except EtcdError:
            return None
        if entry is not None:
            self.noted(entry)
        return entry

    def owner(self, node: str) -> Owner:
        with self._lock:
            live = self._live.get(node)
            return Owner(node, live or self._addresses.get(node, ""), live is not None)

    def node_of_tag(self, tag: bytes) -> str:
        """The member whose node tag this is ("" for none known: an id made before the cluster, say)."""
        with self._lock:
            return self._tags.get(tag, "")

    def live_members(self) -> list[str]:
        with self._lock:
            return sorted(self._live)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._cubes.values())


__all__ = ["DirectoryView", "Owner", "node_tag"]
