"""Index upkeep: loading cubes and mounts from the store at start, and keeping the derived indexes level.

The store is the source of truth; each cube's dense and lexical indexes are
derived from it. At start they are caught up (only *added to*: what they
lack), everything is re-embedded when the embedder changed, and conversation
turns are when the memory-text recipe did. Purge resets a cube's indexes and
refills them from the store (see kernel/purge.py).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from memosd.fsutil import fsync_path
from memosd.kernel.catalog import Catalog
from memosd.kernel.memory_text import MEMORY_TEXT_RECIPE, memory_text
from memosd.kernel.ports import CubeIndexPort, EmbedderPort, IndexFactory
from memosd.kernel.quotas import Quotas
from memosd.kernel.state import CubeState, MountState, meta_of
from memosd.kernel.table import Tables
from memosd.logfmt import log_event
from memosd.store import schema
from memosd.store.records import CubeRecord, MountRecord
from memosd.store.rocks import Store
from memosd.store.space import is_no_space

log = logging.getLogger("memosd.kernel")


class Indexes:
    """Makes, loads, catches up, resets and saves the cubes' indexes, under ``root`` (one folder a cube)."""

    def __init__(self, store: Store, embedder: EmbedderPort, factory: IndexFactory, root: Path) -> None:
        self._store = store
        self._embedder = embedder
        self._factory = factory
        self._root = root

    def new(self, cube_id: str) -> CubeIndexPort:
        return self._factory(self._root / cube_id, self._embedder.dim)

    # -- start ----------------------------------------------------------
    def open(self, tables: Tables, quotas: Quotas) -> None:
        """Load every cube and mount, re-embedding if the embedder changed (every item) or the memory-text
        recipe did (only turns: other items read the same under every recipe), and bring the derived
        indexes up to the store."""
        self._root.mkdir(parents=True, exist_ok=True)
        reembed = self._embedder_changed()
        retext = not reembed and self._memory_text_changed()
        for record in self._store.iter_cubes():
            if reembed:
                self._reembed_cube(record.cube_id)
            elif retext and self._reembed_cube(record.cube_id, turns_only=True):
                shutil.rmtree(self._root / record.cube_id, ignore_errors=True)  # rebuilt from the store
            tables.cubes[record.cube_id] = self._load_cube(record)
        for mount in self._store.iter_mounts():
            loaded = tables.mounts[mount.mount_id] = self._load_mount(mount, reembed, retext)
            quotas.opened(mount.principal, mount.cube_id, loaded.staged_total())
        self._store.put_meta(schema.KEY_EMBEDDER, self._embedder.fingerprint.encode())
        self._store.put_meta(schema.KEY_MEMORY_TEXT, MEMORY_TEXT_RECIPE.encode())
        for orphan in self._root.iterdir():
            if orphan.name not in tables.cubes:
                shutil.rmtree(orphan, ignore_errors=True)
        log_event(log, "kernel_open", cubes=len(tables.cubes), mounts=len(tables.mounts))

    def _embedder_changed(self) -> bool:
        stored = self._store.get_meta(schema.KEY_EMBEDDER)
        changed = stored is not None and stored.decode() != self._embedder.fingerprint
        if changed:
            log_event(log, "embedder_changed", level=logging.WARNING, was=stored, now=self._embedder.fingerprint,
                      action="re-embedding every item and rebuilding the indexes")
            shutil.rmtree(self._root, ignore_errors=True)
            self._root.mkdir(parents=True, exist_ok=True)
        return changed

    def _memory_text_changed(self) -> bool:
        """Whether a store with items was indexed under another memory-text recipe (or before there was one)."""
        if self._store.get_meta(schema.KEY_EMBEDDER) is None:
            return False  # a new store
        stored = self._store.get_meta(schema.KEY_MEMORY_TEXT)
        changed = stored is None or stored.decode() != MEMORY_TEXT_RECIPE
        if changed:
            log_event(log, "memory_text_changed", level=logging.WARNING, was=stored, now=MEMORY_TEXT_RECIPE,
                      action="re-embedding conversation turns and rebuilding the indexes of their cubes")
        return changed

    def _reembed_cube(self, cube_id: str, *, turns_only: bool = False) -> int:
        """Recompute the stored vectors of the cube's versions (with ``turns_only``, of those with a speaker);
        returns how many."""
        versions = [v for v in self._store.iter_versions(cube_id) if v.speaker or not turns_only]
        for start in range(0, len(versions), 256):
            chunk = versions[start:start + 256]
            vectors = self._embedder.embed([memory_text(v.text, v.speaker, v.event_ns) for v in chunk])
            batch = self._store.batch()
            for version, vector in zip(chunk, vectors, strict=True):
                batch.put_vector(cube_id, version.vkey, vector)
            self._store.write(batch, sync=False)
        return len(versions)

    def load(self, record: CubeRecord) -> CubeState:
        """A cube from its rows in the store, as at start (ImportCube: rows written, record not yet)."""
        return self._load_cube(record)

    def remove_files(self, cube_id: str) -> None:
        """Delete the cube's index files, if any (an import that did not finish)."""
        shutil.rmtree(self._root / cube_id, ignore_errors=True)

    def _load_cube(self, record: CubeRecord) -> CubeState:
        catalog = Catalog()
        for version in self._store.iter_versions(record.cube_id):
            catalog.add(meta_of(version))
        cube = CubeState(record, catalog, self.new(record.cube_id),
                         adapters=list(self._store.iter_adapters(record.cube_id)),
                         purged={i: p.purge_id for p in self._store.iter_purges(record.cube_id) for i in p.item_ids})
        self._catch_up(cube)
        return cube

    def _load_mount(self, record: MountRecord, reembed: bool, retext: bool) -> MountState:
        mount = MountState(record, staged_adapter=self._store.get_staged_adapter(record.mount_id))
        for staged, vector in self._store.iter_staged(record.mount_id):
            mount.staging[staged.item_id] = staged
            if staged.kind != "forget":
                if vector is None or reembed or (retext and staged.speaker):
                    vector = self._embedder.embed([memory_text(staged.text, staged.speaker, staged.event_ns)])[0]
                mount.vectors[staged.item_id] = vector
        return mount

    # -- upkeep ---------------------------------------------------------
    def _catch_up(self, cube: CubeState) -> None:
        """The indexes are derived: add whatever committed versions they lack."""
        all_keys = np.fromiter(cube.catalog.by_vkey, dtype=np.uint64, count=len(cube.catalog))
        missing = cube.index.dense_missing(all_keys)
        for start in range(0, len(missing), 4096):
            keys = missing[start:start + 4096]
            vectors = self._store.get_vectors(cube.cube_id, [int(k) for k in keys])
            present = [(k, v) for k, v in zip(keys, vectors, strict=True) if v is not None]
            if present:
                cube.index.add_dense(np.array([k for k, _ in present], dtype=np.uint64),
                                     np.stack([v for _, v in present]))
        watermark = cube.index.lexical_watermark
        behind = sorted((m for m in cube.catalog.by_vkey.values() if m.vkey > watermark), key=lambda m: m.vkey)
        for start in range(0, len(behind), 4096):
            chunk = behind[start:start + 4096]
            versions = self._store.get_versions(cube.cube_id, [(m.item_id, m.born) for m in chunk])
            cube.index.add_lexical([(v.vkey, memory_text(v.text, v.speaker, v.event_ns)) for v in versions if v is not None])
        if len(missing) or behind:
            cube.index_dirty = True
            log_event(log, "index_caught_up", cube=cube.cube_id, dense_added=len(missing),
                      lexical_added=len(behind))

    def reset(self, cube: CubeState) -> None:
        """Delete the cube's index files and put empty indexes in their place (Purge).

        From here on a crash rebuilds them from the store at start. Call refill after."""
        directory = self._root / cube.cube_id
        cube.index.destroy()
        try:
            if directory.exists():
                shutil.rmtree(directory)  # destroy() ignores errors; this raises them
            fsync_path(self._root)
        finally:
            cube.index = self.new(cube.cube_id)

    def refill(self, cube: CubeState) -> None:
        """Add every committed version the indexes lack, from the store, and save them."""
        self._catch_up(cube)
        cube.index.save()
        cube.index_dirty = False

    # -- stop -----------------------------------------------------------
    @staticmethod
    def save(cubes: Iterable[CubeState]) -> None:
        for cube in list(cubes):
            with cube.lock:
                if cube.index_dirty and not cube.freed:
                    cube.index.save()
                    cube.index_dirty = False

    @staticmethod
    def close(cubes: Iterable[CubeState]) -> None:
        """Save (a failure is logged: derived data, caught up at the next start) and close every index."""
        cubes = list(cubes)
        try:
            Indexes.save(cubes)
        except Exception as error:  # derived data: the next start catches the indexes up from the store
            log_event(log, "index_save_failed", level=logging.ERROR, error=type(error).__name__,
                      disk_full=is_no_space(error), hint="the indexes are caught up from the store at the next start")
        for cube in cubes:
            cube.index.close()
