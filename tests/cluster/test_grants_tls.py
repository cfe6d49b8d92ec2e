"""TLS between nodes: two real daemons serving TLS with mTLS (a CA made at test time, `cryptography`), auth
on, sharing the real etcd. A call through one node on a cube of the other is forwarded over TLS to the
owner's advertised address, trusting the configured CA and presenting the node's own certificate (the
owner demands one): plaintext forwarding to a TLS port would fail the call.
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess
from etcd_rig import EtcdCluster
from memosd_client import NO_RETRY, Client
from memosd_client.v1 import memos_pb2, memos_pb2_grpc

from memosd.cluster.directory import Directory


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA and one certificate for 127.0.0.1 signed by it (both nodes use it, as server and as client)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "memosd cluster test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "memosd node")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.pem", "cert": directory / "node.pem", "key": directory / "node.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(files["key"], 0o600)
    return files


@pytest.fixture(scope="module")
def tls_nodes(etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[dict[str, DaemonProcess], dict[str, Path], str]]:
    etcd_cluster.restore()
    etcd_cluster.client().delete("memosd/access/", prefix=True)  # the first node here makes the admin
    run = uuid.uuid4().hex[:6]
    root = tmp_path_factory.mktemp("tls")
    certs = _certificates(root)
    env = {"MEMOSD_CLUSTER__ETCD": ",".join(etcd_cluster.endpoints), "MEMOSD_CLUSTER__LEASE_SECONDS": "2",
           "MEMOSD_SECURITY__TLS_CERT_FILE": str(certs["cert"]), "MEMOSD_SECURITY__TLS_KEY_FILE": str(certs["key"]),
           "MEMOSD_SECURITY__TLS_CLIENT_CA_FILE": str(certs["ca"]), "MEMOSD_HTTP__LISTEN": "127.0.0.1:0"}
    etcd_cluster.forget_cluster_config()  # this module's settings, not the last module's
    procs = {n: DaemonProcess(root / n, env={**env, "MEMOSD_CLUSTER__NODE_NAME": f"{n}-{run}"})
             for n in ("east", "west")}
    try:
        procs["east"].start()  # first: it makes the cluster's admin
        procs["west"].start()
        yield procs, certs, run
    finally:
        for proc in procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                assert proc.stop() == 0, proc.log()


def test_calls_are_forwarded_over_tls_to_the_owner(
        tls_nodes: tuple[dict[str, DaemonProcess], dict[str, Path], str], etcd_cluster: EtcdCluster) -> None:
    procs, certs, run = tls_nodes
    token = procs["east"].token
    directory = Directory(etcd_cluster.client())

    def client(node: str) -> Client:
        return Client(procs[node].address, token=token, tls_ca=str(certs["ca"]), tls_cert=str(certs["cert"]),
                      tls_key=str(certs["key"]), timeout=30, retry=NO_RETRY)

    with client("east") as via_east, client("west") as via_west:
        owners: dict[str, str] = {}
        for i in range(30):  # until placement has put a cube on each node (8 all on one: ~1% of the time)
            cube = via_east.alloc_cube(f"tls-{run}-{i}")
            owners[cube.cube_id] = directory.lookup(cube.cube_id).owner  # type: ignore[union-attr]
            if {f"west-{run}", f"east-{run}"} <= set(owners.values()):
                break
        on_west = [cid for cid, owner in owners.items() if owner == f"west-{run}"]
        on_east = [cid for cid, owner in owners.items() if owner == f"east-{run}"]
        assert on_west and on_east, owners
        # Through east to west's cube (and back): mount, write, commit, read, all forwarded over TLS.
        mount = via_east.mount(on_west[0], writable=True)
        [item] = via_east.write(mount.mount_id, ["sent over TLS between nodes"])
        via_east.commit(mount.mount_id, "tls")
        assert [i.text for i in via_east.read(mount.mount_id, [item])] == ["sent over TLS between nodes"]
        assert via_west.stat_cube(on_east[0]).cube_id == on_east[0]
        assert via_east.stats().cluster.forwarded_calls > 0 and via_west.stats().cluster.forwarded_calls > 0
    # The nodes serve TLS only: a plaintext call (what forwarding did before) is refused by the port.
    with grpc.insecure_channel(procs["west"].address) as plain, pytest.raises(grpc.RpcError):
        memos_pb2_grpc.MemOSStub(plain).WhoAmI(memos_pb2.WhoAmIRequest(), timeout=5)


def test_the_http_surface_reaches_the_owner_over_tls(
        tls_nodes: tuple[dict[str, DaemonProcess], dict[str, Path], str], etcd_cluster: EtcdCluster) -> None:
    """A chat through east on west's cube runs its Mount and Generate on west over the router's TLS channel:
    west answers (no model here: MODEL_UNAVAILABLE from its Generate), where a plaintext channel would not
    reach it at all (CUBE_UNAVAILABLE); and the mount it made there is gone after."""
    procs, certs, run = tls_nodes
    token = procs["east"].token
    directory = Directory(etcd_cluster.client())
    with Client(procs["east"].address, token=token, tls_ca=str(certs["ca"]), tls_cert=str(certs["cert"]),
                tls_key=str(certs["key"]), timeout=30, retry=NO_RETRY) as via_east:
        cube = next(c for c in (via_east.alloc_cube(f"tls-http-{run}-{i}") for i in range(20))
                    if directory.lookup(c.cube_id).owner == f"west-{run}")  # type: ignore[union-attr]
        address = json.loads((procs["east"].data_dir / "daemon.json").read_text())["http_address"]
        body = {"model": f"memos:{cube.name}", "messages": [{"role": "user", "content": "hi"}]}
        request = urllib.request.Request(f"http://{address}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        reply = json.loads(refused.value.read())
        assert reply["error"]["code"] == "MODEL_UNAVAILABLE", reply
        assert via_east.stat_cube(cube.cube_id).mount_count == 0
