"""Governance through a real daemon: tokens, principals, grants, invisible cubes, revocation, the audit log.

The daemon runs without a model (plaintext memory is enough to exercise every
check; the rights check runs before any model work). Purge has its own test
file; TLS is at the end of this one.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memos import Client
from memos.audit import verify
from memos.auth import TokenInterceptor
from memos.errors import (
    AccessDenied,
    AuthenticationFailed,
    CubeNameTaken,
    CubeNotFound,
    InvalidField,
    JobNotFound,
    MemosError,
    MountNotFound,
    PrincipalNameTaken,
)
from memos.v1 import memos_pb2, memos_pb2_grpc
from memos.v1 import types_pb2 as t

SERVICE = memos_pb2.DESCRIPTOR.services_by_name["MemOS"]


daemon = daemon_fixture("gov")
admin = client_fixture(timeout=30, scope="module")


def _user(daemon: DaemonProcess, admin: Client, name: str, kind: str = "user") -> Client:
    _, token = admin.create_principal(name, kind=kind)
    return Client(daemon.address, token=token, timeout=30)


@pytest.fixture(scope="module")
def alice(daemon: DaemonProcess, admin: Client) -> Iterator[Client]:
    with _user(daemon, admin, "alice") as c:
        yield c


@pytest.fixture(scope="module")
def bob(daemon: DaemonProcess, admin: Client) -> Iterator[Client]:
    with _user(daemon, admin, "bob", kind="agent") as c:
        yield c


def _cube(owner: Client, name: str, texts: tuple[str, ...] = ("owls hunt at night", "the river is green")) -> str:
    cube_id = owner.alloc_cube(name).cube_id
    with owner.mount(cube_id, writable=True) as m:
        m.write(list(texts))
        m.commit("seed")
    return cube_id


def _error(call: object) -> MemosError:
    with pytest.raises(MemosError) as caught:
        call()  # type: ignore[operator]
    return caught.value


# --- get or create ---------------------------------------------------------------------------------


def test_alloc_cube_exist_ok_returns_the_callers_cube_and_refuses_another_owners(alice: Client,
                                                                                  bob: Client) -> None:
    made = alice.alloc_cube("alice-journal", description="first run")
    assert isinstance(_error(lambda: alice.alloc_cube("alice-journal")), CubeNameTaken)
    again = alice.alloc_cube("alice-journal", description="second run", exist_ok=True)  # a script run twice
    assert (again.cube_id, again.description) == (made.cube_id, "first run")  # as it was, not changed
    # Bob cannot see alice's cube: for him the name is still taken, not handed over.
    assert isinstance(_error(lambda: bob.alloc_cube("alice-journal", exist_ok=True)), CubeNameTaken)


# --- authentication -------------------------------------------------------------------------------


def test_the_admin_token_file_is_private_and_its_path_logged(daemon: DaemonProcess) -> None:
    path = daemon.data_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    log = daemon.full_log()  # the line is from the start, however many tests ran before this one
    assert "admin_created" in log and str(path) in log


def test_every_syscall_refuses_a_missing_wrong_or_disabled_token(daemon: DaemonProcess, admin: Client) -> None:
    _, token = admin.create_principal("soon-disabled")
    admin.disable_principal("soon-disabled")
    prefix, pid, _secret = daemon.token.split(".")
    forged = f"{prefix}.{pid}.{'A' * 43}"
    with grpc.insecure_channel(daemon.address) as plain:
        for bad in ("", forged, token, "garbage"):
            channel = grpc.intercept_channel(plain, TokenInterceptor(bad)) if bad else plain
            for method in SERVICE.methods:
                request = getattr(memos_pb2, method.input_type.name)()
                path = f"/{SERVICE.full_name}/{method.name}"
                ser, de = request.SerializeToString, getattr(memos_pb2, method.output_type.name).FromString
                with pytest.raises(grpc.RpcError) as caught:
                    if method.client_streaming:
                        channel.stream_unary(path, ser, de)(iter([request]), timeout=10)
                    elif method.server_streaming:
                        list(channel.unary_stream(path, ser, de)(request, timeout=10))
                    else:
                        channel.unary_unary(path, ser, de)(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method.name, bad)
        # The health service needs no token.
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        status = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_are_stored_only_as_hashes(daemon: DaemonProcess, admin: Client) -> None:
    _, token = admin.create_principal("hash-check")
    secret = token.rsplit(".", 1)[1].encode()
    for path in (daemon.data_dir / "store").rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path


def test_principals_are_managed_by_admins_only(admin: Client, alice: Client) -> None:
    names = {p.name for p in admin.list_principals()}
    assert {"admin", "alice"} <= names
    assert alice.whoami().name == "alice" and not alice.whoami().admin
    assert isinstance(_error(lambda: alice.create_principal("mallory")), AccessDenied)
    assert isinstance(_error(lambda: list(alice.list_principals())), AccessDenied)
    assert isinstance(_error(lambda: admin.create_principal("alice")), PrincipalNameTaken)
    assert isinstance(_error(lambda: admin.create_principal("bad name!")), InvalidField)


def test_a_single_node_has_no_cluster_config_and_lists_its_own_cubes(admin: Client, alice: Client) -> None:
    assert isinstance(_error(lambda: alice.cluster_config()), AccessDenied)  # daemon admins only
    refused = _error(lambda: admin.cluster_config())
    assert isinstance(refused, InvalidField) and "single node" in str(refused)
    assert isinstance(_error(lambda: admin.set_cluster_config("quotas.max_mounts_per_principal", "5")), InvalidField)
    cube = _cube(admin, "single-node-listing")
    for local in (False, True):  # the same answer either way on a single node, with no owner node
        listed = {c.cube_id: c for c in admin.list_cubes(local=local)}
        assert listed[cube].owner_node == "" and not listed[cube].unavailable


def test_a_disabled_principal_is_locked_out_and_its_mounts_closed(daemon: DaemonProcess, admin: Client) -> None:
    with _user(daemon, admin, "carol") as carol:
        cube = _cube(carol, "carol-notes")
        mount = carol.mount(cube)
        resp = admin.disable_principal("carol")
        assert resp.principal.disabled and resp.mounts_closed == 1
        assert isinstance(_error(lambda: carol.whoami()), AuthenticationFailed)
    assert isinstance(_error(lambda: admin.read(mount.mount_id, [])), MountNotFound)


# --- grants ------------------------------------------------------------------------------------------


def test_a_cube_without_rights_is_indistinguishable_from_a_missing_one(alice: Client, bob: Client) -> None:
    cube = _cube(alice, "alice-private")
    theirs = _error(lambda: bob.stat_cube("alice-private"))
    missing = _error(lambda: bob.stat_cube("no-such-cube"))
    assert type(theirs) is type(missing) is CubeNotFound
    assert theirs.message.replace("alice-private", "X") == missing.message.replace("no-such-cube", "X")
    assert _error(lambda: bob.stat_cube(cube)).reason == "CUBE_NOT_FOUND"
    assert cube not in {c.cube_id for c in bob.list_cubes()}
    assert cube in {c.cube_id for c in alice.list_cubes()}
    for call in (lambda: bob.mount(cube), lambda: list(bob.log(cube)), lambda: bob.evict(cube),
                 lambda: bob.free_cube(cube), lambda: bob.rollback(cube, 1), lambda: bob.grant(cube, "bob", ["read"]),
                 lambda: bob.purge(cube, source="x")):
        assert isinstance(_error(call), CubeNotFound)


def test_someone_elses_mount_id_is_not_found(alice: Client, bob: Client) -> None:
    cube = _cube(alice, "alice-mounted")
    mount = alice.mount(cube, writable=True)
    alice.grant(cube, "bob", ["read", "write"])  # even with rights, a mount belongs to who opened it
    for call in (lambda: bob.read(mount.mount_id, []), lambda: bob.write(mount.mount_id, ["x"]),
                 lambda: bob.commit(mount.mount_id), lambda: bob.unmount(mount.mount_id),
                 lambda: bob.search([mount.mount_id], "owls"), lambda: bob.activate(mount.mount_id)):
        assert isinstance(_error(call), MountNotFound)
    # Alice's mount is open and untouched: nothing was staged through it.
    assert len(mount.read([])) == 2 and not mount.commit().HasField("revision")


def test_rights_are_enforced_per_syscall(alice: Client, bob: Client) -> None:
    cube = _cube(alice, "alice-shared")
    grant = alice.grant(cube, "bob", ["read"])
    assert [t.Right.Name(r) for r in grant.rights] == ["RIGHT_READ"]
    with bob.mount(cube) as ro:
        assert len(list(ro.iter_items())) == 2 and len(ro.search("owls")) > 0
    assert len(list(bob.log(cube))) == 1
    denied = _error(lambda: bob.mount(cube, writable=True))
    assert isinstance(denied, AccessDenied) and "write" in denied.message
    for call in (lambda: bob.rollback(cube, 1), lambda: bob.evict(cube), lambda: bob.free_cube(cube),
                 lambda: bob.grant(cube, "alice", ["read"]), lambda: list(bob.list_grants(cube))):
        assert isinstance(_error(call), AccessDenied)
    alice.grant(cube, "bob", ["write", "grant"])
    with bob.mount(cube, writable=True) as rw:
        rw.write(["bob was here"])
        assert rw.commit("bob").revision.number == 2
    # Bob may pass on what he holds, not more.
    assert isinstance(_error(lambda: bob.grant(cube, "admin", ["admin"])), AccessDenied)
    assert {g.principal_id for g in bob.list_grants(cube)} >= {bob.whoami().principal_id}
    assert cube in {g.cube_id for g in bob.list_grants()}


def test_an_expired_grant_counts_as_none(alice: Client, bob: Client) -> None:
    cube = _cube(alice, "alice-brief")
    past = datetime.now(UTC) - timedelta(seconds=5)
    assert isinstance(_error(lambda: alice.grant(cube, "bob", ["read"], expires=past)), InvalidField)
    # An hour: the calls below run before it expires, however loaded the machine.
    alice.grant(cube, "bob", ["read"], expires=datetime.now(UTC) + timedelta(hours=1))
    mount = bob.mount(cube)
    assert bob.stat_cube(cube).cube_id == cube
    assert [g.expired for g in alice.list_grants(cube) if not g.owner] == [False]
    # Granted again, the grant takes the new expiry, so the wait below is short: 3 s, the time one call has to
    # reach the daemon (an expiry already past is refused), not the time several calls must all fit in.
    alice.grant(cube, "bob", ["read"], expires=datetime.now(UTC) + timedelta(seconds=3))
    # Wait until the daemon itself says it has expired (the deadline only bounds a hang), then check.
    deadline = time.monotonic() + 120
    while [g.expired for g in alice.list_grants(cube) if not g.owner] != [True]:
        assert time.monotonic() < deadline, "the grant never expired"
        time.sleep(0.1)
    assert isinstance(_error(lambda: bob.stat_cube(cube)), CubeNotFound)
    assert isinstance(_error(lambda: mount.read([])), MountNotFound)  # rights are checked on every call


def test_revoke_takes_rights_back_and_closes_mounts(alice: Client, bob: Client) -> None:
    cube = _cube(alice, "alice-revoked")
    alice.grant(cube, "bob", ["read", "activate"])
    mount = bob.mount(cube)
    resp = alice.revoke(cube, "bob", ["activate"])
    assert [t.Right.Name(r) for r in resp.grant.rights] == ["RIGHT_READ"] and resp.mounts_closed == 1
    assert isinstance(_error(lambda: mount.read([])), MountNotFound)
    assert alice.revoke(cube, "bob").grant.rights == []
    assert isinstance(_error(lambda: bob.mount(cube)), CubeNotFound)
    assert isinstance(_error(lambda: alice.revoke(cube, "alice")), InvalidField)  # the owner keeps its rights


def test_generate_never_uses_a_cube_the_caller_cannot_read(alice: Client, bob: Client) -> None:
    cube = _cube(alice, "alice-generate")
    mount = alice.mount(cube)
    assert isinstance(_error(lambda: bob.generate("hi", mounts=[mount.mount_id]).text()), MountNotFound)
    with alice.mount(cube) as own:
        error = _error(lambda: bob.generate("hi", mounts=[own.mount_id], adapter_mount=own.mount_id).text())
        assert isinstance(error, MountNotFound)


def test_jobs_of_invisible_cubes_are_not_found(bob: Client) -> None:
    assert isinstance(_error(lambda: list(bob.watch_job("job_aaaaaaaaaaaaaaaaaaaa"))), JobNotFound)
    assert bob.list_jobs() == []


# --- the audit log -------------------------------------------------------------------------------------


def test_every_call_is_audited_with_what_it_used(daemon: DaemonProcess, admin: Client, alice: Client,
                                                 bob: Client) -> None:
    cube = _cube(alice, "alice-audited")
    with alice.mount(cube) as m:
        items = [i.item_id for i in m.iter_items()]
        m.read(items[:1])
        hits = m.search("owls")
    _error(lambda: bob.stat_cube(cube))
    with Client(daemon.address, token="mtk.nobody.wrong", timeout=30) as stranger:  # this test's own refusal
        assert isinstance(_error(stranger.whoami), AuthenticationFailed)
    records = [r for r in admin.audit() if r.cube_id == cube or r.method == "StatCube"]
    reads = [r for r in records if r.method == "Read" and r.outcome == t.AUDIT_OUTCOME_OK]
    assert reads[-1].item_ids == items[:1] and reads[-1].principal_id == alice.whoami().principal_id
    assert reads[-1].revision == 1 and reads[-1].mount_id == m.mount_id
    search = [r for r in records if r.method == "Search"][-1]
    assert list(search.item_ids) == [h.item.item_id for h in hits]
    refused = [r for r in records if r.method == "StatCube" and r.principal_id == bob.whoami().principal_id][-1]
    assert (refused.outcome, refused.code, refused.reason) == (t.AUDIT_OUTCOME_DENIED, "NOT_FOUND", "CUBE_NOT_FOUND")
    unauthenticated = list(admin.audit(method="WhoAmI", outcome="denied"))
    assert unauthenticated and unauthenticated[-1].code == "UNAUTHENTICATED"
    # Owners read their cube's records; others, nothing.
    assert {r.cube_id for r in alice.audit(cube=cube)} == {cube}
    assert isinstance(_error(lambda: list(alice.audit())), AccessDenied)
    assert isinstance(_error(lambda: list(bob.audit(cube=cube))), CubeNotFound)
    verdict = verify(admin.audit())
    assert verdict.ok and verdict.checked > 20


def test_audit_follow_streams_new_records(admin: Client, alice: Client) -> None:
    start = max(r.seq for r in admin.audit())
    stream = admin.audit(after_seq=start, follow=True, method="WhoAmI", timeout=30)
    alice.whoami()
    record = next(stream)
    assert record.method == "WhoAmI" and record.seq > start
    stream.close()


@pytest.fixture(scope="module")
def audited_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stopped daemon's data dir whose audit chain verifies: each damage below is done to a copy of it (one
    daemon run for the three, not three)."""
    data = tmp_path_factory.mktemp("audited") / "data"
    proc = DaemonProcess(data).start()
    try:
        with Client(proc.address, token=proc.token) as c:
            for _ in range(10):
                c.whoami()
            head = verify(c.audit())
    finally:
        stopped = proc.stop()
    assert head.ok and stopped == 0, proc.log()
    return data


@pytest.mark.parametrize("damage", ["alter", "remove", "reorder"])
def test_verify_finds_the_first_altered_removed_or_reordered_record(tmp_path: Path, audited_data: Path,
                                                                   damage: str) -> None:
    from memosd.store import schema
    from memosd.store.rocks import Store

    shutil.copytree(audited_data, tmp_path / "data")
    store = Store(tmp_path / "data" / "store")
    rows = dict(store.scan_rows(schema.CF_AUDIT))
    key5, key6 = schema.audit_key(5), schema.audit_key(6)
    if damage == "alter":
        store.put_row(schema.CF_AUDIT, key5, bytes(rows[key5]).replace(b"WhoAmI", b"Whoops"), sync=True)
    elif damage == "remove":
        store.delete_row(schema.CF_AUDIT, key5, sync=True)
    else:
        store.put_row(schema.CF_AUDIT, key5, bytes(rows[key6]), sync=True)
        store.put_row(schema.CF_AUDIT, key6, bytes(rows[key5]), sync=True)
    store.close()
    proc = DaemonProcess(tmp_path / "data").start()
    try:
        with Client(proc.address, token=proc.token) as c:
            verdict = verify(c.audit())
            assert not verdict.ok
            assert verdict.bad_seq == (6 if damage == "remove" else 5), verdict
            assert {"alter": "altered", "remove": "removed", "reorder": "reordered"}[damage] in verdict.problem
    finally:
        proc.stop()


# --- TLS -------------------------------------------------------------------------------------------------


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "memosd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, san in (("server", x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])),
                      ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"memosd test {name}")]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(2 if name == "server" else 3)
                   .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1)))
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        files[name] = directory / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"] = directory / f"{name}.key"
        files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        os.chmod(files[f"{name}_key"], 0o600)
    return files


def test_tls_and_mtls(tmp_path: Path) -> None:
    certs = _certificates(tmp_path)
    env = {"MEMOSD_SECURITY__TLS_CERT_FILE": str(certs["server"]),
           "MEMOSD_SECURITY__TLS_KEY_FILE": str(certs["server_key"]),
           "MEMOSD_SECURITY__TLS_CLIENT_CA_FILE": str(certs["ca"])}
    proc = DaemonProcess(tmp_path / "data", env=env).start()
    try:
        with Client(proc.address, token=proc.token, tls_ca=str(certs["ca"]), tls_cert=str(certs["client"]),
                    tls_key=str(certs["client_key"]), timeout=10) as c:
            assert c.whoami().name == "admin"
        # No client certificate: the handshake fails (mTLS), whatever the token.
        with Client(proc.address, token=proc.token, tls_ca=str(certs["ca"]), timeout=5) as c, \
                pytest.raises(MemosError):
            c.whoami()
        # Plain gRPC to a TLS port fails too.
        with grpc.insecure_channel(proc.address) as plain, pytest.raises(grpc.RpcError):
            memos_pb2_grpc.MemOSStub(plain).WhoAmI(memos_pb2.WhoAmIRequest(), timeout=5)
    finally:
        proc.stop()


def test_list_grants_pages_return_every_row_once(daemon: DaemonProcess, admin: Client, alice: Client) -> None:
    with _user(daemon, admin, "dana") as dana:
        owned = [_cube(dana, f"dana-{i}") for i in range(3)]
        for i in range(3):
            alice_cube = _cube(alice, f"for-dana-{i}")
            alice.grant(alice_cube, "dana", ["read"])
        for name in ("admin", "alice"):
            dana.grant(owned[0], name, ["read"])
        with pytest.raises(InvalidField, match="owns cube"):
            dana.grant(owned[0], "dana", ["read"])  # an owner holds every right; no second row for it

        def keys(grants: Iterator[t.CubeGrant]) -> list[tuple[str, str]]:
            return [(g.cube_id, g.principal_id) for g in grants]

        for cube in ("", owned[0]):
            whole = keys(dana.list_grants(cube))
            assert len(whole) == (6 if not cube else 3)
            assert keys(dana.list_grants(cube, page_size=1)) == sorted(whole)
            assert keys(dana.list_grants(cube, page_size=2)) == sorted(whole)
