"""ImportAdapter, ExportAdapter, and making a cube's adapter resident for the model.

An upload arrives here whole, as plain values (``Upload``): the stream was
reassembled and checked against its header by ``syscalls/adapter_stream.py``,
its weights spooled to a file under ``<data dir>/uploads/`` (``spool``). It is
validated from there tensor by tensor on the worker thread (``validate``), and
only then staged in the mount: a refused upload changes nothing and leaves no
file. Export returns the stored files unchanged (the syscall layer chunks them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from memosd.errors import (
    AdapterInvalid,
    AdapterMismatch,
    AdapterNotFound,
    ModelUnavailable,
)
from memosd.kernel.kernel import Kernel
from memosd.kernel.requests import RequestRef
from memosd.kernel.types import MountInfo
from memosd.logfmt import log_event
from memosd.runtime import adapters as rt
from memosd.runtime.engine import Adapter
from memosd.runtime.host import ModelHost
from memosd.runtime.lora_dirs import peft_dir
from memosd.runtime.model import LoadedModel
from memosd.store.records import AdapterRecord

log = logging.getLogger("memosd.parametric")

SPOOL_PREFIX = "upload-"  # the spool files under ``<data dir>/uploads/``; leftovers deleted at start


@dataclass(frozen=True)
class Upload:
    mount_id: str
    config: bytes  # at most rt.MAX_CONFIG_BYTES
    weights: Path  # the spool file (deleted by the receiver, adapter_stream.receive, when the import ends)
    weights_bytes: int
    digest: str  # sha256 of the config bytes, then the weights bytes
    declared_digest: str  # as the client declared it; "" if it did not


def validate(loaded: LoadedModel, config: bytes, weights: bytes | Path, digest: str) -> rt.ParsedAdapter:
    """On the worker: check an upload's files as a supported peft LoRA adapter (the config's allow-list, the
    weights' keys, dtypes, shapes and values) and against the model, without keeping its tensors. Raises
    AdapterInvalid (naming the key at fault) / AdapterMismatch."""
    try:
        parsed = rt.parse_adapter(config, weights, keep_tensors=False, digest=digest)
        rt.check_fits(loaded, parsed)
    except rt.AdapterMismatch as error:
        raise AdapterMismatch(f"{error}; it cannot be used with this model", digest=digest) from None
    except rt.AdapterInvalid as error:
        raise AdapterInvalid(str(error), digest=digest, **({"key": error.key} if error.key else {})) from None
    return parsed


class AdapterService:
    def __init__(self, kernel: Kernel, host: ModelHost, *, spool: Path, lora_dir: Path | None = None) -> None:
        self.kernel = kernel
        self.host = host
        # The vLLM engine loads adapters from PEFT directories, written here by digest (runtime/lora_dirs.py).
        self.lora_dir = lora_dir if lora_dir is not None else spool.with_name("lora")
        # Uploads being received (the daemon puts them in the data dir); what a crash left there is deleted now.
        self.spool = spool
        for stale in self.spool.glob(SPOOL_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def import_adapter(self, upload: Upload, request: RequestRef | None = None) -> tuple[AdapterRecord, MountInfo]:
        """Check and stage a received upload; with a request id (the header's), a retry of the same upload
        gets the first call's adapter back and stages nothing (kernel/requests.py)."""
        mount = self.kernel.mount_state(upload.mount_id)  # an unknown mount fails before the model is involved
        digest = upload.digest
        if upload.declared_digest and upload.declared_digest.lower() != digest:
            raise AdapterInvalid(f"the upload's digest is {digest}, not the {upload.declared_digest} the "
                                 "header declared: the bytes were damaged on the way", digest=digest)
        cube_id = self.kernel.cube_of(mount).cube_id
        with self.kernel.requests.claim(cube_id, request, "import_adapter", upload.mount_id, digest) as claim:
            if claim.done is not None and claim.done.adapter is not None:
                return AdapterRecord(**claim.done.adapter), self.kernel.mount_info(mount)
            loaded = self.host.model()
            parsed = self.host.run(lambda: validate(loaded, upload.config, upload.weights, digest))
            record = AdapterRecord(
                digest=digest, config_bytes=len(upload.config), weights_bytes=upload.weights_bytes,
                rank=parsed.rank, target_modules=parsed.target_modules, base_model=parsed.base_model,
                lineage={"origin": "imported", "model_fingerprint": loaded.fingerprint,
                         "create_ns": time.time_ns()})
            info = self.kernel.stage_adapter(upload.mount_id, record, upload.config, upload.weights, claim)
        log_event(log, "import_adapter", mount=upload.mount_id, digest=digest[:16], rank=parsed.rank,
                  bytes=len(upload.config) + upload.weights_bytes)
        return record, info

    def export(self, mount_id: str) -> tuple[AdapterRecord, bool, MountInfo, tuple[bytes, bytes]]:
        """The adapter the mount sees, whether it is staged, the mount, and its files (config, weights) as
        stored."""
        mount = self.kernel.mount_state(mount_id)
        cube = self.kernel.cube_of(mount)
        adapter, staged = self.kernel.adapter_in(mount)
        info = self.kernel.mount_info(mount)
        if adapter is None:
            raise AdapterNotFound(f"cube {cube.record.name!r} has no adapter at revision {mount.record.base}"
                                  f"{' in this mount' if info.staged_adapter else ''}; import or train one",
                                  cube=cube.cube_id, revision=mount.record.base)
        return adapter, staged, info, self.kernel.adapter_files(cube.cube_id, adapter)

    # -- residency (for Activate, Generate, Evict) -----------------------------
    def prepare(self, loaded: LoadedModel, cube_id: str, adapter: AdapterRecord | None) -> None:
        """On the worker, before model work: run with ``adapter`` (loading it if it is not resident), or
        with the base model for None. Called by every job, since another request may have unloaded it."""
        pool = self.host.adapters
        if adapter is None:
            try:
                pool.use(loaded, None)
            except rt.BaseModelChanged as error:
                raise ModelUnavailable(str(error)) from None
            return
        key = rt.pool_key(cube_id, adapter.digest)
        try:
            if not pool.touch(key):
                config, weights = self.kernel.adapter_files(cube_id, adapter)
                parsed = rt.parse_adapter(config, weights, digest=adapter.digest)
                rt.check_fits(loaded, parsed)
                dropped = pool.ensure(loaded, parsed, key)
                log_event(log, "adapter_loaded", cube=cube_id, digest=adapter.digest[:16], unloaded=len(dropped))
            pool.use(loaded, key)
        except rt.BaseModelChanged as error:
            raise ModelUnavailable(str(error)) from None
        except rt.AdapterError as error:  # it passed at import: another model (or an older memosd's check)
            raise AdapterMismatch(f"the adapter {adapter.digest[:12]} of cube {cube_id} cannot be used with "
                                  f"the runtime's model: {error}", digest=adapter.digest) from None

    def engine_adapter(self, cube_id: str, adapter: AdapterRecord) -> Adapter:
        """The adapter as the engine loads it (its PEFT directory, written on first use). The engine's LoRA
        slots are sized for ``runtime.max_lora_rank``: a larger adapter is refused here, before it is sent."""
        limit = self.host.config.max_lora_rank
        if adapter.rank > limit:
            raise AdapterMismatch(f"the adapter {adapter.digest[:12]} of cube {cube_id} has rank {adapter.rank}; "
                                  f"the engine serves ranks up to runtime.max_lora_rank = {limit}. Raise it (one "
                                  "of 8, 16, 32, 64, 128, 256, 320, 512) and restart memosd",
                                  digest=adapter.digest)
        config, weights = self.kernel.adapter_files(cube_id, adapter)
        return Adapter(adapter.digest, peft_dir(self.lora_dir, adapter.digest, config, weights))

    def make_resident(self, cube_id: str, adapter: AdapterRecord) -> None:
        """Load the adapter into the model now (Activate), unless it is resident."""
        loaded = self.host.model()
        self.host.run(lambda: self.prepare(loaded, cube_id, adapter))

    def unload_cube(self, cube_id: str, versions: list[AdapterRecord]) -> int:
        """Unload every adapter version of the cube that is resident; returns how many."""
        loaded = self.host.loaded_now()
        if loaded is None:
            return 0
        keys = {rt.pool_key(cube_id, a.digest) for a in versions}
        return self.host.run(lambda: sum(self.host.adapters.unload(loaded, k) for k in keys))
