#!/usr/bin/env python3
"""A memosd cluster on one machine: what forwarding costs, one node against three, and moving a cube.

    .venv/bin/python scripts/bench_cluster.py                  # ~3 min on 2 cores
    .venv/bin/python scripts/bench_cluster.py --move-items 2000 --seconds 3 --calls 100   # a quick run

It starts a real 3-member etcd on loopback (tests/cluster/etcd_rig.py: Debian's etcd-server) and three
memosd nodes on temporary data dirs (no model, auth off, cluster.lease_seconds 5), then, with
memosd_client.Client as a user would:
  * forwarding latency: Search (k=5 over 200 items) and Write (one item into an open read-write mount),
    each --calls times against the cube's owner (local) and against another node (forwarded once);
    p50 and p99;
  * throughput: --threads client threads doing Search, then Write+Commit of one item, for --seconds,
    first with three cubes all on one node (every call to it), then one cube on each node (every call to
    its owner); all on the same machine, so the cores bound both (see BENCHMARKS.md);
  * moving a cube of --move-items items (written in batches of 500, 10 commits) to another node
    (MoveCube), with the time of each step;
  * ListCubes through one node, its own cubes (local) against the cluster's (each owner asked for its
    page), with three cubes made on each node; p50 and p99.
  * the OpenAI-compatible HTTP surface (--parts http only; the nodes then load the tiny random Llama of
    tests/tiny_llama.py and open `[http] listen`): POST /v1/chat/completions (8 tokens, greedy) on a cube of
    alpha's with one fact, activated, through alpha (the owner: mounted and generated there) and through
    beta (Mount, Generate and Unmount sent to alpha as gRPC calls), in alternating rounds; p50 and p99.
--parts picks some of them (latency,listing,throughput,move,http): --parts listing --calls 200 takes ~1 min.
Prints a table and writes JSON (--json, default bench-out/bench_cluster.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

from daemon_proc import DaemonProcess  # noqa: E402
from etcd_rig import MISSING, EtcdCluster, etcd_binary  # noqa: E402
from memosd_client import NO_RETRY, Client  # noqa: E402
from memosd_client.v1 import memos_pb2  # noqa: E402

from memosd.cluster.directory import Directory  # noqa: E402

NODES = ("alpha", "beta", "gamma")
WORDS = ("river", "heron", "kettle", "lantern", "orchard", "harbor", "meadow", "violin", "glacier", "compass",
         "saffron", "quarry", "thimble", "beacon", "walnut", "cobalt")


def sentence(i: int) -> str:
    """A short distinct item (the embedder's cost grows with length; these are ~12 tokens)."""
    w = [WORDS[(i * k + k) % len(WORDS)] for k in (1, 3, 5, 7)]
    return f"note {i}: the {w[0]} by the {w[1]}, a {w[2]} and a {w[3]}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(call: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def cube_on(client: Client, directory: Directory, owner: str, name: str) -> str:
    """A new cube placed on ``owner`` (placement decides: allocate until one lands there)."""
    for i in range(60):
        cube = client.alloc_cube(f"{name}-{i}")
        entry = directory.lookup(cube.cube_id)
        if entry is not None and entry.owner == owner:
            return cube.cube_id
        client.free_cube(cube.cube_id)
    raise RuntimeError(f"no cube placed on {owner}")


def fill(client: Client, cube_id: str, count: int, commits: int = 10, start: int = 0) -> None:
    per_commit = max(1, count // commits)
    with client.mount(cube_id, writable=True) as m:
        for first in range(0, count, per_commit):
            for batch in range(first, min(first + per_commit, count), 500):
                m.write([sentence(start + i) for i in range(batch, min(batch + 500, first + per_commit, count))])
            m.commit("bench")


def latency(clients: dict[str, Client], directory: Directory, run: str, calls: int) -> dict[str, float]:
    owner, other = clients["alpha"], clients["beta"]
    cube_id = cube_on(owner, directory, f"alpha-{run}", f"lat-{run}")
    fill(owner, cube_id, 200, commits=2)
    ro = owner.mount(cube_id)
    rw = owner.mount(cube_id, writable=True)
    row: dict[str, float] = {}
    for label, via in (("local", owner), ("forwarded", other)):
        def search_once(via: Client = via) -> object:
            return via.search(ro.mount_id, "the heron by the harbor", k=5)

        def write_once(via: Client = via) -> object:
            return via.write(rw.mount_id, ["a kettle on the stove by the lantern"])

        timed(search_once, 10)  # warm the channel
        search = timed(search_once, calls)
        write = timed(write_once, calls)
        row |= {f"search_{label}_p50_ms": pct(search, 0.5), f"search_{label}_p99_ms": pct(search, 0.99),
                f"write_{label}_p50_ms": pct(write, 0.5), f"write_{label}_p99_ms": pct(write, 0.99)}
    owner.unmount(rw.mount_id)
    owner.unmount(ro.mount_id)
    return row


def listing(clients: dict[str, Client], directory: Directory, run: str, calls: int) -> dict[str, float]:
    """ListCubes through alpha: its own cubes (local) against the cluster's (every owner asked for its page)."""
    for n in NODES:  # a few cubes on each node, so every owner answers a page
        for i in range(3):
            cube_on(clients[n], directory, f"{n}-{run}", f"ls-{run}-{n}-{i}")
    via = clients["alpha"]
    row: dict[str, float] = {"cubes_cluster": float(len(list(via.list_cubes()))),
                             "cubes_local": float(len(list(via.list_cubes(local=True))))}
    for label, local in (("local", True), ("cluster", False)):
        def list_once(local: bool = local) -> object:
            return list(via.list_cubes(local=local))

        timed(list_once, 10)
        took = timed(list_once, calls)
        row |= {f"list_{label}_p50_ms": pct(took, 0.5), f"list_{label}_p99_ms": pct(took, 0.99)}
    return row


def throughput(procs: dict[str, DaemonProcess], cubes: list[tuple[str, str]], threads: int, seconds: float
               ) -> dict[str, float]:
    """Ops/s of ``threads`` threads over ``cubes`` ((cube id, the node to call)): Search, then Write+Commit."""
    result: dict[str, float] = {}
    for kind in ("search", "write_commit"):
        counts = [0] * threads
        stop = threading.Event()

        def work(index: int, kind: str = kind, counts: list[int] = counts, stop: threading.Event = stop) -> None:
            cube_id, node = cubes[index % len(cubes)]
            with Client(procs[node].address, timeout=60, retry=NO_RETRY) as c:
                mount = c.mount(cube_id, writable=kind == "write_commit")
                while not stop.is_set():
                    if kind == "search":
                        c.search(mount.mount_id, "the walnut in the orchard", k=5)
                    else:
                        c.write(mount.mount_id, [f"throughput {index} {counts[index]}"])
                        c.commit(mount.mount_id, "bench")
                    counts[index] += 1
                c.unmount(mount.mount_id)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        time.sleep(seconds)
        stop.set()
        for w in workers:
            w.join()
        result[f"{kind}_ops_per_s"] = sum(counts) / seconds
    return result


def move(clients: dict[str, Client], directory: Directory, run: str, items: int) -> dict[str, object]:
    owner = clients["alpha"]
    cube_id = cube_on(owner, directory, f"alpha-{run}", f"move-{run}")
    started = time.perf_counter()
    fill(owner, cube_id, items)
    fill_s = time.perf_counter() - started
    steps: dict[str, float] = {}
    sizes: list[int] = []

    def seen(step: memos_pb2.MoveCubeProgress) -> None:
        steps[step.step] = step.elapsed_seconds
        sizes.append(step.archive_bytes)

    last = owner.move_cube(cube_id, f"beta-{run}", progress=seen)
    assert clients["gamma"].stat_cube(cube_id).item_count == items
    return {"items": items, "fill_s": fill_s, "move_s": last.elapsed_seconds, "archive_bytes": max(sizes),
            "steps_s": steps}


def http_chat(procs: dict[str, DaemonProcess], clients: dict[str, Client], directory: Directory, run: str,
              calls: int) -> dict[str, float]:
    """A chat on a cube of alpha's, through alpha (its owner) and through beta (sent on to alpha), alternating."""
    owner = clients["alpha"]
    cube_id = cube_on(owner, directory, f"alpha-{run}", f"chat-{run}")
    with owner.mount(cube_id, writable=True) as m:
        m.write(["The launch code for the red rocket is 4471."])
        m.commit("fact")
    with owner.mount(cube_id) as m:
        m.activate()
    body = json.dumps({"model": f"memos:{owner.stat_cube(cube_id).name}", "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is the launch code?"}]}).encode()
    urls = {n: "http://" + json.loads((procs[n].data_dir / "daemon.json").read_text())["http_address"]
            + "/v1/chat/completions" for n in ("alpha", "beta")}

    def chat(node: str) -> float:
        request = urllib.request.Request(urls[node], data=body, headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
        return (time.perf_counter() - started) * 1000

    for node in ("alpha", "beta", "alpha", "beta"):  # warm the model and the channels
        chat(node)
    took: dict[str, list[float]] = {"alpha": [], "beta": []}
    for _ in range(calls):  # alternating rounds: the same load on both
        for node in ("alpha", "beta"):
            took[node].append(chat(node))
    return {"chat_owner_p50_ms": pct(took["alpha"], 0.5), "chat_owner_p99_ms": pct(took["alpha"], 0.99),
            "chat_forwarded_p50_ms": pct(took["beta"], 0.5), "chat_forwarded_p99_ms": pct(took["beta"], 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="calls per latency measurement")
    parser.add_argument("--threads", type=int, default=6, help="client threads for the throughput runs")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each throughput run")
    parser.add_argument("--move-items", type=int, default=10000, help="items in the moved cube")
    parser.add_argument("--parts", default="latency,listing,throughput,move",
                        help="which measurements, comma-separated (default all)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_cluster.json")
    args = parser.parse_args()
    binary = etcd_binary()
    if binary is None:
        sys.exit(MISSING)
    run = uuid.uuid4().hex[:6]
    result: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "etcd").mkdir()
        etcd = EtcdCluster(Path(tmp) / "etcd", binary)
        etcd.start()
        parts = set(args.parts.split(","))
        model: dict[str, str] = {}
        if "http" in parts:  # the tiny random model (torch, transformers) only where a chat is measured
            from tiny_llama import save_tiny_llama
            model = {"MEMOSD_RUNTIME__MODEL": str(save_tiny_llama(Path(tmp) / "tiny-model", context=512)),
                     "MEMOSD_RUNTIME__DEVICE": "cpu", "MEMOSD_HTTP__LISTEN": "127.0.0.1:0"}
        procs = {n: DaemonProcess(Path(tmp) / n, extra_args=["--log-level", "warning"], env={
            "MEMOSD_CLUSTER__ETCD": ",".join(etcd.endpoints), "MEMOSD_CLUSTER__NODE_NAME": f"{n}-{run}",
            "MEMOSD_CLUSTER__LEASE_SECONDS": "5", "MEMOSD_SECURITY__AUTH": "false", **model}) for n in NODES}
        clients: dict[str, Client] = {}
        try:
            for proc in procs.values():
                proc.start()
            clients = {n: Client(p.address, timeout=600, retry=NO_RETRY) for n, p in procs.items()}
            directory = Directory(etcd.client())
            if "latency" in parts:
                result["latency"] = latency(clients, directory, run, args.calls)
            if "listing" in parts:
                result["listing"] = listing(clients, directory, run, args.calls)
            if "throughput" in parts:
                on_alpha = [(cube_on(clients["alpha"], directory, f"alpha-{run}", f"one-{run}-{i}"), "alpha")
                            for i in range(3)]
                spread = [(cube_on(clients[n], directory, f"{n}-{run}", f"three-{run}-{n}"), n) for n in NODES]
                for cube_id, node in on_alpha + spread:
                    fill(clients[node], cube_id, 200, commits=2)
                result["throughput_one_node"] = throughput(procs, on_alpha, args.threads, args.seconds)
                result["throughput_three_nodes"] = throughput(procs, spread, args.threads, args.seconds)
            if "move" in parts:
                result["move"] = move(clients, directory, run, args.move_items)
            if "http" in parts:
                result["http"] = http_chat(procs, clients, directory, run, args.calls)
        finally:
            for c in clients.values():
                c.close()
            for proc in procs.values():
                if proc.proc is not None and proc.proc.poll() is None:
                    proc.stop()
            etcd.stop()
    print(f"\nmemosd cluster, 3 nodes and a 3-member etcd on one machine ({result['machine']}, {result['cpus']} CPUs)")
    lat = result.get("latency")
    if isinstance(lat, dict):
        print(f"{'call':<8} {'local p50':>10} {'p99':>8} {'forwarded p50':>14} {'p99':>8}   (ms, {args.calls} calls)")
        for call in ("search", "write"):
            print(f"{call:<8} {lat[f'{call}_local_p50_ms']:>10.2f} {lat[f'{call}_local_p99_ms']:>8.2f} "
                  f"{lat[f'{call}_forwarded_p50_ms']:>14.2f} {lat[f'{call}_forwarded_p99_ms']:>8.2f}")
    ls = result.get("listing")
    if isinstance(ls, dict):
        print(f"\nListCubes through alpha ({args.calls} calls)   cubes   p50 ms   p99 ms")
        for label in ("local", "cluster"):
            print(f"{label:<38} {ls[f'cubes_{label}']:>5.0f} {ls[f'list_{label}_p50_ms']:>8.2f} "
                  f"{ls[f'list_{label}_p99_ms']:>8.2f}")
    one, three = result.get("throughput_one_node"), result.get("throughput_three_nodes")
    if isinstance(one, dict) and isinstance(three, dict):
        print(f"\nthroughput ({args.threads} client threads, {args.seconds:g} s each)   one node   three nodes")
        for kind in ("search", "write_commit"):
            print(f"{kind + ' ops/s':<44} {one[f'{kind}_ops_per_s']:>9.0f} {three[f'{kind}_ops_per_s']:>13.0f}")
    moved = result.get("move")
    if isinstance(moved, dict):
        steps = moved["steps_s"]
        assert isinstance(steps, dict)
        print(f"\nmove of {moved['items']} items ({moved['archive_bytes']} archive bytes): {moved['move_s']:.2f} s "
              f"(fill took {moved['fill_s']:.1f} s)")
        print("  " + ", ".join(f"{k} at {v:.2f} s" for k, v in steps.items()))
    chats = result.get("http")
    if isinstance(chats, dict):
        print(f"\nPOST /v1/chat/completions, 8 tokens ({args.calls} each, alternating)   p50 ms   p99 ms")
        for label, key in (("through the owner (alpha)", "owner"), ("through beta (run on alpha)", "forwarded")):
            print(f"{label:<62} {chats[f'chat_{key}_p50_ms']:>8.2f} {chats[f'chat_{key}_p99_ms']:>8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
