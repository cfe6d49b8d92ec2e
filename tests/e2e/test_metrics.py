"""Prometheus metrics: scrape a real daemon, make calls through the client, scrape again, see what moved.

The daemon runs the tiny random Llama (calls take milliseconds) so Generate's
TTFT and the KV pool can be watched too; its metrics listen on port 0 and
daemon.json says where. Each test compares two scrapes around its own calls,
so the tests do not depend on each other's order.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from daemon_proc import DaemonProcess
from memos import Client, CubeNotFound
from memos.v1 import types_pb2 as t
from prometheus_client.parser import text_string_to_metric_families
from tiny_llama import save_tiny_llama

from memosd.config import ConfigError, load_config
from memosd.metrics import Metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
_names = itertools.count()


def metrics_address(daemon: DaemonProcess) -> str:
    address: str = json.loads((daemon.data_dir / "daemon.json").read_text())["metrics_address"]
    return address


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series that does not exist (yet), as Prometheus would treat a new one."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    model = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0, context=256)
    env = {"MEMOSD_RUNTIME__MODEL": str(model), "MEMOSD_RUNTIME__DEVICE": "cpu",
           "MEMOSD_RUNTIME__MAX_TOKENS": "8",
           # The dense index is on disk only once saved: save often, so its bytes show up in seconds.
           "MEMOSD_INDEX__SAVE_INTERVAL_SECONDS": "0.5"}
    proc = DaemonProcess(tmp_path_factory.mktemp("memosd-metrics") / "data", env=env).start()
    yield proc
    code = proc.stop()
    assert code == 0, f"daemon exited with {code} on SIGTERM:\n{proc.log()}"


@pytest.fixture(scope="module")
def address(metered: DaemonProcess) -> str:
    return metrics_address(metered)


@pytest.fixture
def client(metered: DaemonProcess) -> Iterator[Client]:
    with Client(metered.address, token=metered.token, timeout=60) as c:
        yield c


@pytest.fixture
def cube_name() -> str:
    return f"m{next(_names)}"


def seed_cube(client: Client, name: str, texts: list[str]) -> None:
    client.alloc_cube(name)
    with client.mount(name, writable=True) as m:
        m.write(texts)
        m.commit()


def test_daemon_json_names_a_port_zero_metrics_endpoint(metered: DaemonProcess, address: str) -> None:
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert f"metrics={address}" in metered.log()  # the serving line says where, for operators
    assert value(scrape(address), "process_resident_memory_bytes") > 0


def test_syscall_counter_counts_ok_and_not_found_by_method_and_code(
        client: Client, address: str, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    before = scrape(address)
    client.stat_cube(cube_name)
    client.stat_cube(cube_name)
    with pytest.raises(CubeNotFound):
        client.stat_cube(f"{cube_name}-missing")
    after = scrape(address)
    assert moved(before, after, "memosd_syscalls_total", method="StatCube", code="OK") == 2
    assert moved(before, after, "memosd_syscalls_total", method="StatCube", code="NOT_FOUND") == 1


def test_syscall_latency_histogram_observes_every_call(client: Client, address: str, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    before = scrape(address)
    for _ in range(3):
        client.stat_cube(cube_name)
    with pytest.raises(CubeNotFound):
        client.stat_cube(f"{cube_name}-missing")  # refusals are timed too
    after = scrape(address)
    assert moved(before, after, "memosd_syscall_seconds_count", method="StatCube") == 4
    assert moved(before, after, "memosd_syscall_seconds_bucket", method="StatCube", le="+Inf") == 4
    assert 0 < moved(before, after, "memosd_syscall_seconds_sum", method="StatCube") < 60


def test_generate_observes_ttft_and_tokens(client: Client, address: str, cube_name: str) -> None:
    seed_cube(client, cube_name, ["The capital of France is Paris."])
    with client.mount(cube_name) as m:
        m.activate()
        before = scrape(address)
        generation = client.generate("What is the capital of France?", [m])
        generation.text()
    summary = generation.summary
    assert summary is not None and summary.completion_tokens > 0
    after = scrape(address)
    assert moved(before, after, "memosd_generate_ttft_seconds_count") == 1
    assert moved(before, after, "memosd_generate_ttft_seconds_sum") == pytest.approx(summary.ttft_us / 1e6)
    assert moved(before, after, "memosd_generate_tokens_total", kind="completion") == summary.completion_tokens
    assert moved(before, after, "memosd_generate_tokens_total", kind="reused") == summary.reused_tokens > 0
    assert moved(before, after, "memosd_syscalls_total", method="Generate", code="OK") == 1


def test_kv_pool_bytes_grow_on_activate_and_second_activate_is_a_hit(
        client: Client, address: str, cube_name: str) -> None:
    seed_cube(client, cube_name, ["A KV cache is reusable only as an exact token prefix of the same model."])
    before = scrape(address)
    with client.mount(cube_name) as m:
        first = m.activate()
        computed = scrape(address)
        second = m.activate()
    after = scrape(address)
    assert first.source == t.ACTIVATION_SOURCE_COMPUTED and second.source == t.ACTIVATION_SOURCE_POOL
    assert moved(before, computed, "memosd_kv_pool_bytes") == first.pool_bytes > 0
    assert moved(before, computed, "memosd_kv_pool_entries") == 1
    assert moved(before, computed, "memosd_kv_pool_misses_total") == 1  # not pooled yet: computed
    assert moved(before, computed, "memosd_kv_pool_hits_total") == 0
    assert moved(computed, after, "memosd_kv_pool_hits_total") == 1  # the second one is served from the pool
    assert moved(computed, after, "memosd_kv_pool_bytes") == 0
    assert value(after, "memosd_kv_pool_budget_bytes") == 1 << 30  # runtime.pool_bytes' default
    assert value(after, "memosd_kv_persisted_bytes") >= first.persisted_bytes > 0


def test_runtime_gauges_report_queue_depth_and_model_state(client: Client, address: str, cube_name: str) -> None:
    seed_cube(client, cube_name, ["The capital of France is Paris."])
    with client.mount(cube_name) as m:
        m.activate()  # waits for the model to load
    samples = scrape(address)
    stats = client.stats()
    assert ("memosd_runtime_queue_depth", ()) in samples
    assert value(samples, "memosd_runtime_queue_depth") == stats.model.queue_depth == 0  # idle between calls
    assert value(samples, "memosd_active_generations") == 0
    assert value(samples, "memosd_model_ready") == 1
    assert value(samples, "memosd_adapters_max_resident") == stats.adapters.max_resident == 8
    assert value(samples, "memosd_adapters_resident") == 0


def test_index_bytes_and_counts_grow_with_writes_and_commit(client: Client, address: str, cube_name: str) -> None:
    before = scrape(address)
    seed_cube(client, cube_name, [f"note {i} about the harbour" for i in range(3)])
    after = scrape(address)
    assert moved(before, after, "memosd_cubes") == 1
    assert moved(before, after, "memosd_items") == 3
    assert moved(before, after, "memosd_index_bytes", kind="lexical") > 0  # committed with the Commit
    deadline = time.monotonic() + 30
    while moved(before, after, "memosd_index_bytes", kind="dense") <= 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the dense index reaches the disk at the next save (every 0.5 s here)
        after = scrape(address)
    assert moved(before, after, "memosd_index_bytes", kind="dense") > 0
    assert value(after, "memosd_store_bytes") > 0


def test_audit_records_counter_counts_every_call(client: Client, address: str) -> None:
    before = scrape(address)
    client.whoami()
    with pytest.raises(CubeNotFound):
        client.stat_cube("no-such-cube")  # refused calls are audited too
    after = scrape(address)
    assert moved(before, after, "memosd_audit_records_total") == 2


# -- off, and a taken port -------------------------------------------------------------------------


def _listening_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_metrics_off_serves_nothing_and_the_daemon_works(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data", env={"MEMOSD_METRICS__LISTEN": ""}).start()
    try:
        assert metrics_address(daemon) == ""
        assert "metrics=off" in daemon.log()
        assert daemon.proc is not None
        # The gRPC port is the only one it listens on: no metrics endpoint anywhere.
        assert _listening_ports(daemon.proc.pid) == {int(daemon.address.rpartition(":")[2])}
        with Client(daemon.address, token=daemon.token, timeout=60) as c:
            c.alloc_cube("plain")
            assert c.stat_cube("plain").name == "plain"
            assert c.stats().cube_count == 1
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_metrics_port_in_use_fails_startup_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = DaemonProcess(tmp_path / "data", env={"MEMOSD_METRICS__LISTEN": f"127.0.0.1:{port}"})
        with pytest.raises(RuntimeError, match="exited with 1") as failed:
            daemon.start()
    assert f"cannot serve metrics on 127.0.0.1:{port}" in str(failed.value)
    assert "set metrics.listen" in str(failed.value)


# -- without a daemon ------------------------------------------------------------------------------


def test_metrics_listen_config_defaults_to_loopback_accepts_off_and_rejects_bad_addresses(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}  # an empty home: no real ~/.config/memosd/memosd.toml
    assert load_config([], env).metrics.listen == "127.0.0.1:9464"
    assert load_config([], {**env, "MEMOSD_METRICS__LISTEN": ""}).metrics.listen == ""
    assert load_config(["--set", "metrics.listen=[::1]:0"], env).metrics.listen == "[::1]:0"
    for bad in ("9464", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match=r"invalid metrics\.listen"):
            load_config([], {**env, "MEMOSD_METRICS__LISTEN": bad})


def test_two_metrics_objects_keep_separate_registries() -> None:
    one, two = Metrics(), Metrics()  # the global registry would refuse the second set of names
    one.observe_call("StatCube", "OK", 0.001)
    assert one.registry.get_sample_value("memosd_syscalls_total", {"method": "StatCube", "code": "OK"}) == 1
    assert two.registry.get_sample_value("memosd_syscalls_total", {"method": "StatCube", "code": "OK"}) is None
