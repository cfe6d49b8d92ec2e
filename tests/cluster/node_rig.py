"""The three memosd nodes test_routing.py, test_move.py and test_http_routing.py share (the ``three_nodes`` fixture in conftest.py):
alpha, beta and gamma on loopback against the session's etcd, started in parallel, once per module."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from daemon_proc import DaemonProcess
from etcd_rig import EtcdCluster

NODES = ("alpha", "beta", "gamma")


def node_env(endpoints: list[str], name: str) -> dict[str, str]:
    """A cluster daemon of the shared rigs: a 2 s lease (failures show within seconds), auth off (the rigs test
    routing and moves; tests/cluster/test_grants.py tests principals with auth on)."""
    return {"MEMOSD_CLUSTER__ETCD": ",".join(endpoints), "MEMOSD_CLUSTER__NODE_NAME": name,
            "MEMOSD_CLUSTER__LEASE_SECONDS": "2", "MEMOSD_SECURITY__AUTH": "false"}


@contextlib.contextmanager
def start_three_nodes(etcd: EtcdCluster, root: Path, run: str, env: Mapping[str, str] | None = None
                      ) -> Iterator[dict[str, DaemonProcess]]:
    """alpha, beta and gamma (named ``<node>-<run>``, data dirs under ``root``, ``env`` added to each one's)
    started in parallel against the session's etcd, the last module's cluster config forgotten first; stopped
    (each must exit 0) at the end, except one a test left killed."""
    etcd.restore()
    etcd.forget_cluster_config()  # this module's settings, not the last module's
    procs = {n: DaemonProcess(root / n, env={**node_env(etcd.endpoints, f"{n}-{run}"), **(env or {})})
             for n in NODES}
    errors: list[BaseException] = []

    def start(proc: DaemonProcess) -> None:
        try:
            proc.start()
        except BaseException as e:  # reported below, with the others stopped
            errors.append(e)

    threads = [threading.Thread(target=start, args=(p,)) for p in procs.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield procs
    finally:
        for proc in procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                assert proc.stop() == 0, proc.log()


ThreeNodes = Callable[..., contextlib.AbstractContextManager[dict[str, DaemonProcess]]]


__all__ = ["NODES", "ThreeNodes", "node_env", "start_three_nodes"]
