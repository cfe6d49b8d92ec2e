"""Erasure: purging items everywhere a copy of them is kept. Purge and the lifecycle loop share it."""

from __future__ import annotations

from collections.abc import Sequence

from memosd.activation.activator import Activator
from memosd.kernel.kernel import Kernel
from memosd.kernel.usage import UsageTracker
from memosd.store.records import PurgeReceipt


class Erasure:
    """Owns the invariant "no copy of a purged item survives". Each copy, and who removes it:

    - every version (all revisions) with its vector, the staged copies in open mounts, every stored
      activation (with its KV cache chunks) whose block holds the item, every KV block a paged engine
      stored for the cube (all of them: a block's key does not say which items it holds), both index
      files, and the bytes in old store files: ``Kernel.purge`` (kernel/purge.py), in one synced batch then a scrub;
    - the KV caches of the cube held in the pool (in memory): ``Activator.drop_pooled``;
    - the activator's account of the stored caches the purge deleted: ``Activator.forget_persisted``;
    - the items' usage counts (in memory and, at the next flush, in the store): ``UsageTracker.forget_items``.

    Adapters trained on an item are flagged tainted by the kernel, not removed. The Purge syscall and
    the lifecycle loop (expired items past the grace) both call ``erase``; there is no other path.
    """

    def __init__(self, kernel: Kernel, activator: Activator, usage: UsageTracker | None = None) -> None:
        self.kernel = kernel
        self.activator = activator
        self.usage = usage

    def erase(self, cube: str, item_ids: Sequence[str], source: str = "", tags: Sequence[str] = ()
              ) -> PurgeReceipt:
        """Purge the items selected by id, and/or by the source or any tag of any of their versions, from
        the cube (an id or a name); the receipt (ids and counts only).

        Errors are the kernel's: CubeNotFound, InvalidField (no selector, or a bad one), ItemNotFound
        (an id the cube does not hold), DiskFull from the store. On any of them the pool, the activator's
        account and the usage counts are left as they were.
        """
        receipt = self.kernel.purge(cube, list(item_ids), source, list(tags))
        # The store's caches are gone with the purge; the pool's copies go now.
        self.activator.drop_pooled(receipt.cube_id)
        self.activator.forget_persisted(receipt.cube_id, {a.fingerprint for a in receipt.activations})
        if self.usage is not None:
            self.usage.forget_items(receipt.cube_id, receipt.item_ids)
        return receipt
