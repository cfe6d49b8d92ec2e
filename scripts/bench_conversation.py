#!/usr/bin/env python3
"""Conversation-memory retrieval through the whole system: gRPC -> kernel -> indexes.

    .venv/bin/python scripts/bench_conversation.py [--modes hybrid,lexical,dense] [--json PATH]
        [--dump PATH] [--k 50] [--set search.session_match_weight=0]

``--dump`` writes every question's ranked turns per mode (``--k 100`` for the full lists a hybrid search
fuses, to re-rank them offline); ``--set`` passes daemon config, e.g. to turn the session match off.

Starts a daemon on a temporary data dir (no model: MEMOSD_RUNTIME__MODEL=none, as
tests/daemon_proc.py does) and ingests each conversation of the LoCoMo dev set
(../shared/data/conversations/locomo-dev.json, read in place) into its own cube
through ``Ingest``: one turn per message, speaker, text plus
" [shares image: <caption>]" when the turn shares an image, the session as
session id and the session's date as the turn's time. Every question of
categories 1-4 then runs through Search (k=50) in each mode, and is scored
against its evidence turns:

- any@k: some evidence turn is in the top k (k = 1, 5, 10, 20);
- all@10: every evidence turn is in the top 10;
- session any@3: an evidence turn's session is among the first 3 distinct
  sessions of the ranked turns.

Prints one table overall and per category (1 multi-hop, 2 temporal,
3 open-domain, 4 single-hop) for each mode, Search latency p50/p99 (server
side ``took_us`` and client round trip) and ingest throughput, and writes JSON
(--json, default bench-out/bench_conversation.json). Only the dev set is read;
the held-out conversations are never touched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from daemon_proc import DaemonProcess  # noqa: E402
from memos import Client  # noqa: E402

MODES = ("hybrid", "lexical", "dense")
ANY_AT = (1, 5, 10, 20)
SEARCH_K = 50
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
COLUMNS = ("any@1", "any@5", "any@10", "any@20", "all@10", "sess@3")


def session_time(text: str) -> datetime:
    """LoCoMo's "1:56 pm on 8 May, 2023" as a UTC datetime."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


@dataclass
class Conversation:
    sample_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    dia_ids: list[str] = field(default_factory=list)  # parallel to messages
    questions: list[dict[str, Any]] = field(default_factory=list)


def load(path: Path) -> list[Conversation]:
    out = []
    for sample in json.loads(path.read_text()):
        conv = Conversation(sample["sample_id"])
        turns = sample["conversation"]
        n = 1
        while f"session_{n}" in turns:
            when = session_time(turns[f"session_{n}_date_time"])
            for turn in turns[f"session_{n}"]:
                text = turn["text"]
                if turn.get("blip_caption"):
                    text += f" [shares image: {turn['blip_caption']}]"
                conv.messages.append({"speaker": turn["speaker"], "text": text, "session_id": f"session_{n}",
                                      "time": when})
                conv.dia_ids.append(turn["dia_id"])
            n += 1
        conv.questions = [q for q in sample["qa"] if q.get("category") in CATEGORIES and q.get("evidence")]
        out.append(conv)
    return out


def session_of(dia_id: str) -> str:
    """"D3:12" -> "session_3" (LoCoMo's evidence ids name the session)."""
    return f"session_{dia_id.split(':')[0].lstrip('D')}"


def score(ranked: list[str], sessions: list[str], evidence: list[str]) -> dict[str, float]:
    gold = set(evidence)
    row = {f"any@{k}": float(bool(gold & set(ranked[:k]))) for k in ANY_AT}
    row["all@10"] = float(gold <= set(ranked[:10]))
    top_sessions = list(dict.fromkeys(sessions))[:3]
    row["sess@3"] = float(bool({session_of(e) for e in gold} & set(top_sessions)))
    return row


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {c: 100.0 * sum(r[c] for r in rows) / len(rows) for c in COLUMNS} | {"n": len(rows)}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(client: Client, convs: list[Conversation], modes: list[str], dump: Path | None,
        search_k: int = SEARCH_K) -> dict[str, Any]:
    ingest_s = 0.0
    turns = 0
    rows: dict[str, list[tuple[int, dict[str, float]]]] = {m: [] for m in modes}
    took: dict[str, list[float]] = {m: [] for m in modes}
    rtt: dict[str, list[float]] = {m: [] for m in modes}
    dumped: list[dict[str, Any]] = []
    for conv in convs:
        cube = f"locomo-{conv.sample_id}"
        client.alloc_cube(cube)
        with client.mount(cube, writable=True) as mount:
            t0 = time.perf_counter()
            responses = client.ingest_many(mount, conv.messages, commit_message=f"{conv.sample_id}")
            ingest_s += time.perf_counter() - t0
            turns += len(conv.messages)
            item_ids = [i for r in responses for i in r.item_ids]
            dia_of = dict(zip(item_ids, conv.dia_ids, strict=True))
            print(f"{conv.sample_id}: {len(conv.messages)} turns, {len(conv.questions)} questions", flush=True)
            for q in conv.questions:
                entry: dict[str, Any] = {"conv": conv.sample_id, "question": q["question"],
                                         "category": q["category"], "evidence": q["evidence"]}
                for mode in modes:
                    t1 = time.perf_counter()
                    hits = mount.search(q["question"], k=search_k, mode=mode)
                    rtt[mode].append((time.perf_counter() - t1) * 1000)
                    took[mode].append(hits.took_us / 1000)
                    ranked = [dia_of.get(h.item.item_id, "") for h in hits]
                    sessions = [h.item.session_id for h in hits]
                    rows[mode].append((q["category"], score(ranked, sessions, q["evidence"])))
                    entry[mode] = [(dia_of.get(h.item.item_id, ""), h.score) for h in hits]
                dumped.append(entry)
    if dump is not None:
        dump.parent.mkdir(parents=True, exist_ok=True)
        dump.write_text(json.dumps(dumped))
    results: dict[str, Any] = {"turns": turns, "ingest_turns_per_s": turns / ingest_s, "modes": {}}
    for mode in modes:
        per_cat = {CATEGORIES[c]: mean_rows([r for cat, r in rows[mode] if cat == c]) for c in CATEGORIES}
        results["modes"][mode] = {
            "overall": mean_rows([r for _, r in rows[mode]]),
            "categories": per_cat,
            "search_ms": {"server_p50": statistics.median(took[mode]), "server_p99": percentile(took[mode], 99),
                          "client_p50": statistics.median(rtt[mode]), "client_p99": percentile(rtt[mode], 99)},
        }
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"\ningest: {results['turns']} turns, {results['ingest_turns_per_s']:.0f} turns/s")
    header = f"{'mode':<8}{'category':<13}{'n':>5}" + "".join(f"{c:>8}" for c in COLUMNS)
    print(header)
    for mode, res in results["modes"].items():
        for name, row in [("overall", res["overall"]), *res["categories"].items()]:
            print(f"{mode:<8}{name:<13}{row['n']:>5}" + "".join(f"{row[c]:>8.1f}" for c in COLUMNS))
    print(f"\n{'mode':<8}{'server p50':>11}{'p99':>8}{'client p50':>12}{'p99':>8}   (ms)")
    for mode, res in results["modes"].items():
        s = res["search_ms"]
        print(f"{mode:<8}{s['server_p50']:>11.1f}{s['server_p99']:>8.1f}{s['client_p50']:>12.1f}"
              f"{s['client_p99']:>8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=ROOT.parent / "shared" / "data" / "conversations" / "locomo-dev.json")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_conversation.json")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated search modes")
    parser.add_argument("--dump", type=Path, default=None, help="also write every question's ranked turns here")
    parser.add_argument("--k", type=int, default=SEARCH_K, help="Search's k (the dump's depth; scores read the top 20)")
    parser.add_argument("--set", action="append", default=[], help="daemon config override, e.g. search.rrf_k=30")
    args = parser.parse_args()
    if not args.data.exists():  # a worktree's ../shared may not be the shared dir
        args.data = Path("/work/shared/data/conversations/locomo-dev.json")
    modes = [m for m in args.modes.split(",") if m]
    convs = load(args.data)
    extra = ["--log-level", "warning"] + [a for s in args.set for a in ("--set", s)]
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=extra).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as client:
                results = run(client, convs, modes, args.dump, args.k)
        finally:
            daemon.stop()
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
