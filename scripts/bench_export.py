#!/usr/bin/env python3
"""Cube archives: ExportCube and ImportCube time and archive size, through gRPC against real daemons.

    .venv/bin/python scripts/bench_export.py                    # 1k and 10k items
    .venv/bin/python scripts/bench_export.py --sizes 2000       # a quick run

It starts two daemons on temporary data dirs (no model: plaintext memory needs none). For each size it
fills a cube on the first with the shared BEIR passages in 10 commits (so the archive holds history),
then measures, with memosd_client.Client as a user would:
  * export: Client.export_cube to a file (the daemon spools, then streams; the client checks the sha256);
  * import on the other daemon (the cube keeps its id: a move), and beside the source (a new id: a copy);
  * the archive's size, per item version;
  * how long the export held the cube's lock (commits to that cube wait meanwhile), from the daemon's log.
Prints a table and writes JSON (--json, default bench-out/bench_export.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench_common import load_passages  # noqa: E402
from daemon_proc import DaemonProcess  # noqa: E402
from memosd_client import Client  # noqa: E402

COMMITS = 10


def fill(client: Client, name: str, texts: list[str]) -> None:
    client.alloc_cube(name)
    step = max(1, len(texts) // COMMITS)
    with client.mount(name, writable=True) as m:
        for start in range(0, len(texts), step):
            for batch in range(start, min(start + step, len(texts)), 512):
                m.write(texts[batch:min(batch + 512, start + step, len(texts))])
            m.commit("bench")


def locked_ms(daemon: DaemonProcess, cube_id: str) -> float:
    """How long the daemon's last export of the cube held the cube's lock (its export_cube log event)."""
    lines = [line for line in daemon.full_log().splitlines() if "event=export_cube" in line and cube_id in line]
    found = re.search(r"locked_ms=([0-9.]+)", lines[-1]) if lines else None
    return float(found.group(1)) if found else float("nan")


def measure(a: Client, b: Client, name: str, path: Path, size: int) -> dict[str, float]:
    """Export from ``a``, import on ``b`` (the id is free there: a move) and beside the source (a copy)."""
    started = time.perf_counter()
    archive = a.export_cube(name, path)
    exported = time.perf_counter()
    moved = b.import_cube(path, name)
    imported = time.perf_counter()
    copied = a.import_cube(path, f"{name}-copy")
    copy_s = time.perf_counter() - imported
    assert moved.kept_cube_id and not copied.kept_cube_id
    export_s, move_s = exported - started, imported - exported
    return {"items": size, "revisions": archive.revisions, "archive_mb": archive.size_bytes / 1e6,
            "bytes_per_item": archive.size_bytes / size, "export_s": export_s, "import_other_daemon_s": move_s,
            "import_same_daemon_s": copy_s, "export_items_per_s": size / export_s,
            "import_items_per_s": size / move_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_export.json")
    args = parser.parse_args()
    passages = load_passages()
    texts = (passages * (max(args.sizes) // len(passages) + 1))[:max(args.sizes)]
    texts = [f"{t} [{i}]" for i, t in enumerate(texts)]  # distinct items
    result: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "commits": COMMITS, "rows": []}
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        source = DaemonProcess(Path(tmp) / "source", extra_args=["--log-level", "info"]).start()
        target = DaemonProcess(Path(tmp) / "target", extra_args=["--log-level", "warning"]).start()
        try:
            with Client(source.address, token=source.token, timeout=600) as a, \
                    Client(target.address, token=target.token, timeout=600) as b:
                for size in args.sizes:
                    name = f"bench-{size}"
                    fill(a, name, texts[:size])
                    row = measure(a, b, name, Path(tmp) / f"{name}.memcube", size)
                    row["export_locked_ms"] = locked_ms(source, a.stat_cube(name).cube_id)
                    rows.append(row)
        finally:
            source.stop()
            target.stop()
    result["rows"] = rows
    print(f"\nmemosd cube archives ({result['machine']}, {result['cpus']} CPUs, {COMMITS} commits a cube)")
    print(f"{'items':>7} {'MB':>7} {'B/item':>7} {'export s':>9} {'lock ms':>8} {'import s (move)':>16} "
          f"{'import s (copy)':>16}")
    for r in rows:
        print(f"{r['items']:>7} {r['archive_mb']:>7.1f} {r['bytes_per_item']:>7.0f} {r['export_s']:>9.2f} "
              f"{r['export_locked_ms']:>8.0f} {r['import_other_daemon_s']:>16.2f} {r['import_same_daemon_s']:>16.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
