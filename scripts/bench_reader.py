#!/usr/bin/env python3
"""The MemReader on the LoCoMo dev set: extraction through the real daemon, and what it does to retrieval.

    .venv/bin/python scripts/bench_reader.py --conversations 1 --max-turns 64     # a subset (minutes)
    .venv/bin/python scripts/bench_reader.py --data /work/shared/data/conversations/locomo-dev.json

Starts a daemon with the embedded SmolLM2-135M (in process, on --device, the --engine: vllm, the default,
or transformers) on a temporary data dir; either engine decodes each prompt constrained to the answer's
JSON schema (memosd/reader/schema.py). For each of the first --conversations conversations of the dev set (read in place, never copied) it
ingests the first --max-turns turns into a cube of its own exactly as scripts/bench_conversation.py does
(its ``load``: speaker, text plus the shared image's caption, the session as session id, the session's date
as the turn's time), then runs one Extract job over them (the in-process model, greedy, --max-tokens a
prompt) and waits for it. It reports:

- extraction throughput: turns read / the job's own start-to-end time (turns/s; seconds a prompt);
- items per turn: items the job stored (added + updated) per turn read, and items proposed per turn;
- duplicate rate: kept items reconcile found duplicates of another, of the kept;
- refused rates, of the proposed: unparseable (dropped elements; whole answers that were no JSON array are
  counted apart, per prompt) and unsupported (refused by the support check) separately;
- the support check's pass share: kept / (kept + refused), of the items that parsed; and each stored derived
  item checked again here against its source turns (memosd.reader.support.refusal), which must be all;
- retrieval any@k over the dev questions whose evidence turns were all ingested, Search (hybrid, k=50) at
  the revision before the job (turns only) and at the job's result revision (turns + derived items), scored
  by bench_conversation.score: a derived item in the ranking stands for its source turns (for one of them
  that is evidence, if any).

Prints a table, writes JSON (--json, default bench-out/bench_reader.json), and with --items writes every
stored derived item beside its source turns (for checking them by hand). Only the dev set is read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from bench_conversation import ANY_AT, Conversation, load, mean_rows, score  # noqa: E402
from daemon_proc import DaemonProcess  # noqa: E402
from memosd_client import Client  # noqa: E402
from memosd_client.v1 import types_pb2 as t  # noqa: E402

from memosd.reader.support import refusal  # noqa: E402
from memosd.reader.types import Candidate, SourceTurn  # noqa: E402

SEARCH_K = 50
DEFAULT_DATA = Path("/work/shared/data/conversations/locomo-dev.json")


def ranked_dias(hits: Any, dia_of: dict[str, str], gold: set[str]) -> tuple[list[str], list[str]]:
    """The hits as dia ids (a derived item as one of its source turns: an evidence one if any) and sessions."""
    ranked, sessions = [], []
    for hit in hits:
        item = hit.item
        if item.derived_from:
            dias = [dia_of.get(s, "") for s in item.derived_from]
            dia = next((d for d in dias if d in gold), dias[0])
        else:
            dia = dia_of.get(item.item_id, "")
        ranked.append(dia)
        sessions.append(item.session_id or (f"session_{dia.split(':')[0].lstrip('D')}" if dia else ""))
    return ranked, sessions


def questions_of(conv: Conversation, dias: set[str]) -> list[dict[str, Any]]:
    """The conversation's questions whose every evidence turn was ingested."""
    return [q for q in conv.questions if set(q["evidence"]) <= dias]


def one_conversation(client: Client, conv: Conversation, max_turns: int, max_tokens: int
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    messages, dia_ids = conv.messages[:max_turns], conv.dia_ids[:max_turns]
    cube = f"locomo-{conv.sample_id}"
    client.alloc_cube(cube)
    with client.mount(cube, writable=True) as mount:
        responses = client.ingest_many(mount, messages, commit_message=conv.sample_id)
        turn_ids = [i for r in responses for i in r.item_ids]
        dia_of = dict(zip(turn_ids, dia_ids, strict=True))
        before = responses[-1].revision.number
        job = mount.extract(max_tokens=max_tokens, message=f"bench_reader {conv.sample_id}")
        last_step = [0]

        def show(j: t.Job) -> None:
            if j.step != last_step[0]:
                last_step[0] = j.step
                print(f"  {conv.sample_id}: prompt {j.step}/{j.total_steps}, proposed {j.extract.proposed}, "
                      f"kept {j.extract.kept}", flush=True)

        final = client.wait_job(job.job_id, show)
    if final.state != t.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"the Extract job of {conv.sample_id} ended {t.JobState.Name(final.state)}: {final.error}")
    seconds = (final.end_time.ToNanoseconds() - final.start_time.ToNanoseconds()) / 1e9
    x = final.extract
    after = final.result_revision or before
    questions = questions_of(conv, set(dia_ids))
    rows: dict[str, list[dict[str, float]]] = {"turns": [], "turns+derived": []}
    with client.mount(cube, revision=before) as old, client.mount(cube, revision=after) as new:
        for q in questions:
            gold = set(q["evidence"])
            for name, handle in (("turns", old), ("turns+derived", new)):
                ranked, sessions = ranked_dias(handle.search(q["question"], k=SEARCH_K, mode="hybrid"), dia_of, gold)
                rows[name].append(score(ranked, sessions, q["evidence"]))
        turns = {turn.item_id: turn for turn in new.read(turn_ids)}
        derived = [c.after for c in client.diff(cube, before, after) if c.after.item_id] if after != before else []
    items, supported = [], 0
    for item in derived:
        [kind_tag] = [tag for tag in item.tags if tag.startswith("kind:")]
        kind = kind_tag.removeprefix("kind:")
        sources = [SourceTurn("", s, turns[s].speaker, turns[s].text, turns[s].event_time.ToNanoseconds())
                   for s in item.derived_from]
        ok = refusal(Candidate(kind, item.text, None, tuple(item.derived_from)), sources) == ""  # type: ignore[arg-type]
        supported += ok
        items.append({"conv": conv.sample_id, "item_id": item.item_id, "kind": kind, "text": item.text,
                      "event_time": item.event_time.ToJsonString(), "supported_here": ok,
                      "sources": [{"dia_id": dia_of[s.item_id], "speaker": s.speaker, "text": s.text} for s in sources]})
    result = {
        "conv": conv.sample_id, "turns": len(messages), "prompts": final.total_steps, "seconds": seconds,
        "questions": len(questions), "proposed": x.proposed, "kept": x.kept, "dropped": x.dropped,
        "refused": x.refused, "answers_dropped": x.answers_dropped,
        "dropped_by_reason": dict(x.dropped_by_reason), "refused_by_reason": dict(x.refused_by_reason),
        "answers_dropped_by_reason": dict(x.answers_dropped_by_reason), "added": x.added, "updated": x.updated,
        "retired": x.retired, "duplicates": x.duplicates, "stored": len(derived), "stored_supported": supported,
        "revision_before": before, "revision_after": after, "rows": rows,
    }
    return result, items


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def summarize(convs: list[dict[str, Any]]) -> dict[str, Any]:
    total = {k: sum(c[k] for c in convs) for k in ("turns", "prompts", "seconds", "questions", "proposed", "kept",
                                                    "dropped", "refused", "answers_dropped", "added", "updated",
                                                    "retired", "duplicates", "stored", "stored_supported")}
    retrieval = {}
    for name in ("turns", "turns+derived"):
        rows = [r for c in convs for r in c["rows"][name]]
        retrieval[name] = mean_rows(rows) if rows else {"n": 0}
    return {
        **total,
        "turns_per_s": ratio(total["turns"], total["seconds"]),
        "seconds_per_prompt": ratio(total["seconds"], total["prompts"]),
        "stored_per_turn": ratio(total["added"] + total["updated"], total["turns"]),
        "proposed_per_turn": ratio(total["proposed"], total["turns"]),
        "duplicate_rate": ratio(total["duplicates"], total["kept"]),
        "unparseable_rate": ratio(total["dropped"], total["proposed"]),
        "unsupported_rate": ratio(total["refused"], total["proposed"]),
        "answers_dropped_per_prompt": ratio(total["answers_dropped"], total["prompts"]),
        "support_pass_share": ratio(total["kept"], total["kept"] + total["refused"]),
        "stored_supported_share": ratio(total["stored_supported"], total["stored"]),
        "retrieval": retrieval,
    }


def print_table(summary: dict[str, Any], convs: list[dict[str, Any]]) -> None:
    print(f"\n{'conv':<10}{'turns':>6}{'prompts':>8}{'s':>8}{'prop':>6}{'kept':>6}{'drop':>6}{'refu':>6}"
          f"{'ansdrop':>8}{'dup':>5}{'stored':>7}")
    for c in convs:
        print(f"{c['conv']:<10}{c['turns']:>6}{c['prompts']:>8}{c['seconds']:>8.0f}{c['proposed']:>6}{c['kept']:>6}"
              f"{c['dropped']:>6}{c['refused']:>6}{c['answers_dropped']:>8}{c['duplicates']:>5}{c['stored']:>7}")
    s = summary
    print(f"\nthroughput {s['turns_per_s']:.3f} turns/s ({s['seconds_per_prompt']:.1f} s a prompt); "
          f"stored {s['stored_per_turn']:.3f} items/turn (proposed {s['proposed_per_turn']:.3f}/turn)")
    print(f"of the proposed: unparseable {100 * s['unparseable_rate']:.1f}%, unsupported "
          f"{100 * s['unsupported_rate']:.1f}%; whole answers dropped {s['answers_dropped']} of {s['prompts']} prompts")
    print(f"support check passes {100 * s['support_pass_share']:.1f}% of the parsed; duplicates "
          f"{100 * s['duplicate_rate']:.1f}% of the kept; stored items supported (checked again here) "
          f"{s['stored_supported']}/{s['stored']}")
    cols = [f"any@{k}" for k in ANY_AT] + ["all@10"]
    print(f"\n{'search over':<15}{'n':>5}" + "".join(f"{c:>8}" for c in cols))
    for name, row in s["retrieval"].items():
        if row["n"]:
            print(f"{name:<15}{row['n']:>5}" + "".join(f"{row[c]:>8.1f}" for c in cols))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=ROOT.parent / "shared" / "data" / "conversations" / "locomo-dev.json")
    parser.add_argument("--conversations", type=int, default=1, help="the first N conversations of the set")
    parser.add_argument("--max-turns", type=int, default=64, help="the first N turns of each conversation")
    parser.add_argument("--max-tokens", type=int, default=256, help="the answer budget a prompt (0: the default)")
    parser.add_argument("--device", default="cpu", help="runtime.device: cpu, cuda, auto")
    parser.add_argument("--engine", default="vllm", choices=("vllm", "transformers"), help="runtime.engine")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache",
                        help="where the dequantized model is kept between runs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_reader.json")
    parser.add_argument("--items", type=Path, default=None, help="write the stored derived items and their sources here")
    args = parser.parse_args()
    if not args.data.exists():  # a worktree's ../shared may not be the shared dir
        args.data = DEFAULT_DATA
    convs = load(args.data)[: args.conversations]
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__DEVICE": args.device,
           "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache), "MEMOSD_RUNTIME__ENGINE": args.engine}
    results, items = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"], env=env).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as client:
                while client.stats().model.state == "loading":
                    time.sleep(0.2)
                for conv in convs:
                    print(f"{conv.sample_id}: {min(len(conv.messages), args.max_turns)} of {len(conv.messages)} "
                          "turns", flush=True)
                    result, found = one_conversation(client, conv, args.max_turns, args.max_tokens)
                    results.append(result)
                    items.extend(found)
                model = client.stats().model
        finally:
            daemon.stop()
    summary = summarize(results)
    out = {"machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(), "model": model.name,
           "device": model.device, "engine": model.engine, "conversations": args.conversations,
           "max_turns": args.max_turns, "max_tokens": args.max_tokens, "wall_s": time.perf_counter() - started,
           "summary": summary, "per_conversation": results}
    print_table(summary, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    if args.items is not None:
        args.items.parent.mkdir(parents=True, exist_ok=True)
        args.items.write_text(json.dumps(items, indent=2))
        print(f"wrote {len(items)} stored items to {args.items}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
