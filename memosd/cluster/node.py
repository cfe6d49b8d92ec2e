"""This daemon as a cluster member: what the wiring does with ``[cluster]`` when ``etcd`` is set.

Today that is membership only: ``check()`` before anything slow loads (etcd answers and no live member
holds our node name: a start that cannot join fails in a second, like a taken port), ``join()`` once the
gRPC server serves (a member in the list is one that answers), ``leave()`` first thing at shutdown (the
others stop sending calls before we stop taking them). Claiming cubes in the directory at AllocCube,
routing and moves come next (docs/ARCHITECTURE.md, Cluster (in progress)).
"""

from __future__ import annotations

import time

from memosd.cluster.etcd import EtcdClient, EtcdError
from memosd.cluster.membership import NodeNameTaken, Registration, members
from memosd.config import ClusterConfig


class ClusterStartError(RuntimeError):
    """The node cannot join: the message says why and what to change."""


class ClusterNode:
    def __init__(self, config: ClusterConfig, *, timeout: float = 2.0) -> None:
        self.config = config
        self.client = EtcdClient(config.etcd, timeout=timeout)
        self.registration: Registration | None = None  # made at join, when the bound address is known

    def _where(self) -> str:
        return ", ".join(self.config.etcd)

    def check(self) -> None:
        """Before the slow part of a start: etcd answers and our node name is free, waiting up to one
        lease for it (a node restarted right after a crash finds its own record until its lease ends)."""
        deadline = time.monotonic() + self.config.lease_seconds + 1
        while True:
            try:
                holder = next((m for m in members(self.client) if m.name == self.config.node_name), None)
            except EtcdError as e:
                raise ClusterStartError(f"cannot reach etcd at {self._where()} (cluster.etcd): {e}") from None
            if holder is None:
                return
            if time.monotonic() >= deadline:
                raise ClusterStartError(
                    f"cluster.node_name {self.config.node_name!r} is already a live member at {holder.address}: "
                    "give this node another name, or stop that one (a stopped node's name is free within "
                    f"cluster.lease_seconds = {self.config.lease_seconds} s)")
            time.sleep(0.25)

    def join(self, bound: str) -> None:
        """Register at cluster.advertise, or at ``bound`` (the gRPC server's address) when that is empty."""
        self.registration = Registration(self.client, self.config.node_name, self.config.advertise or bound,
                                         lease_seconds=self.config.lease_seconds)
        # wait: a node restarted at once after a crash finds its own record until its lease ends.
        try:
            self.registration.join(wait=self.config.lease_seconds + 1)
        except NodeNameTaken as e:
            raise ClusterStartError(f"cluster.node_name: {e}") from None
        except EtcdError as e:
            raise ClusterStartError(f"cannot join the cluster at {self._where()} (cluster.etcd): {e}") from None

    def leave(self) -> None:
        if self.registration is not None:
            self.registration.leave()


__all__ = ["ClusterNode", "ClusterStartError"]
