"""A real 3-member etcd cluster on loopback for the cluster tests (etcd 3.4 from Debian's etcd-server).

Free ports, temp data dirs, ``--initial-cluster``; members can be killed (SIGKILL: a crash, not a clean
stop) and restarted on the same ports and data dir, rejoining the cluster. Short heartbeat and election
timeouts make a lost leader and a regained quorum take a second, not several, on 2 busy cores.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from memosd.cluster.etcd import EtcdClient

ETCD = "/usr/bin/etcd"
MISSING = (f"{ETCD} is missing: the cluster tests need a real etcd (Debian's etcd-server 3.4). "
           "Install it with `apt-get install -y etcd-server` (.ci/run does this before scripts/test.sh).")


def etcd_binary() -> str | None:
    return ETCD if os.access(ETCD, os.X_OK) else shutil.which("etcd")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # held open together, so the n ports differ
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    initial_cluster: str
    binary: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.data_dir.parent / f"{self.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        cmd = [
            self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"memosd-test-{os.getpid()}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "warn",
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """etcd's /health: true only when this member sees a leader and can commit (quorum)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=1)
        try:
            conn.request("GET", "/health")
            return bool(json.loads(conn.getresponse().read()).get("health") == "true")
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            conn.close()


class EtcdCluster:
    def __init__(self, root: Path, binary: str, size: int = 3) -> None:
        ports = _free_ports(2 * size)
        names = [f"m{i}" for i in range(size)]
        initial = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names))
        self.members = [Member(n, ports[2 * i], ports[2 * i + 1], root / n, initial, binary)
                        for i, n in enumerate(names)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def client(self, timeout: float = 1.0) -> EtcdClient:
        return EtcdClient(self.endpoints, timeout=timeout)

    def forget_cluster_config(self) -> None:
        """Delete the cluster config (memosd/config): the session's modules share this etcd, each with its own
        daemons and settings (auth, TLS), so each rig's first daemon must make the cluster config anew."""
        self.client().delete("memosd/config")

    def start(self) -> None:
        for m in self.members:
            m.start()
        self.wait_healthy(30)

    def stop(self) -> None:
        for m in self.members:
            m.kill()

    def restore(self, timeout: float = 20) -> None:
        """Every member running and the cluster healthy again (after a test killed some)."""
        for m in self.members:
            if not m.running:
                m.start()
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(m.healthy() for m in self.members):
                return
            for m in self.members:
                if m.proc is not None and m.proc.poll() is not None and m.proc.returncode not in (-9, None):
                    raise RuntimeError(f"etcd {m.name} exited with {m.proc.returncode}:\n{m.log.read_text()[-3000:]}")
            time.sleep(0.1)
        logs = "\n".join(f"--- {m.name}\n{m.log.read_text()[-2000:]}" for m in self.members if m.log.exists())
        raise RuntimeError(f"the etcd cluster was not healthy within {timeout} s:\n{logs}")
