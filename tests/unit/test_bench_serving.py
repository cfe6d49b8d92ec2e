"""The serving benchmark's arithmetic and its failure handling: what its table and ratios say is what ran."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_serving
from bench_serving import percentile, run_concurrently, summarize, targets


def stream(ttft_ms: float, wall_s: float, tokens: int, daemon_ms: float | None = None) -> dict[str, Any]:
    return {"ttft_ms": ttft_ms, "daemon_ttft_ms": daemon_ms, "wall_s": wall_s, "completion_tokens": tokens,
            "prompt_tokens": 700, "reused_tokens": 640}


def test_percentile_interpolates_and_p99_of_few_is_near_the_max() -> None:
    assert percentile([10, 20, 30, 40], 50) == 25
    assert percentile([10, 20, 30, 40], 0) == 10
    assert percentile([10, 20, 30, 40], 100) == 40
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 99) == 99


def test_summarize_aggregate_is_all_tokens_over_the_rounds_wall_time() -> None:
    # Round 1: 2 streams, 32 + 16 tokens in 2 s = 24 tok/s; round 2: 64 tokens in 4 s = 16 tok/s.
    rounds = [(2.0, [stream(100, 2.0, 32, 90), stream(300, 1.0, 16, 280)]),
              (4.0, [stream(200, 4.0, 32, 190), stream(400, 4.0, 32, 390)])]
    row = summarize(2, rounds)
    assert row["aggregate_tok_s_runs"] == [24.0, 16.0]
    assert row["aggregate_tok_s"] == 20.0  # the median of the rounds
    assert row["ttft_p50_ms"] == 250  # over all four streams
    assert row["ttft_max_ms"] == 400
    assert row["daemon_ttft_p50_ms"] == 235
    assert row["stream_tok_s_p50"] == 12.0  # 16, 16, 8, 8 tok/s
    assert row["completion_tokens_mean"] == 28


def test_summarize_without_daemon_ttft_reports_none() -> None:
    row = summarize(1, [(1.0, [stream(100, 1.0, 32)])])
    assert row["daemon_ttft_p50_ms"] is None
    assert row["daemon_ttft_p99_ms"] is None


def test_targets_are_the_issue_ratios_and_none_where_a_leg_failed() -> None:
    def leg(agg1: float, agg8: float, ttft1: float, ttft8: float) -> dict[str, Any]:
        return {"ok": True, "rows": [{"streams": 1, "aggregate_tok_s": agg1, "ttft_p50_ms": ttft1},
                                     {"streams": 8, "aggregate_tok_s": agg8, "ttft_p50_ms": ttft8}]}

    got = targets({"vllm": leg(20, 90, 100, 150), "transformers": leg(10, 10, 200, 5000),
                   "bare": leg(25, 100, 90, 120)})
    assert got["vllm_over_transformers_aggregate_n8"] == 9.0
    assert got["vllm_over_bare_aggregate_n8"] == 0.9
    assert got["vllm_ttft_p50_n8_over_n1"] == 1.5
    assert got["transformers_ttft_p50_n8_over_n1"] == 25.0
    failed = targets({"vllm": {"ok": False, "error": "x"}, "transformers": leg(10, 10, 200, 5000)})
    assert failed["vllm_over_transformers_aggregate_n8"] is None
    assert failed["vllm_ttft_p50_n8_over_n1"] is None
    assert failed["transformers_ttft_p50_n8_over_n1"] == 25.0


def test_run_concurrently_starts_all_and_raises_a_streams_error() -> None:
    wall, records = run_concurrently(3, lambda i: stream(i, 0.0, i))
    assert sorted(r["completion_tokens"] for r in records) == [0, 1, 2]
    assert wall >= 0

    def boom(i: int) -> dict[str, Any]:
        if i == 1:
            raise RuntimeError("stream 1 failed")
        return stream(0, 0.0, 1)

    with pytest.raises(RuntimeError, match="stream 1 failed"):
        run_concurrently(2, boom)


def test_a_failing_leg_is_reported_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(engine: str, plan: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
        raise RuntimeError(f"memosd exited with 2: unknown key 'runtime.engine' ({engine})")

    monkeypatch.setattr(bench_serving, "daemon_leg", fail)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"cube": "serve-00"}]))
    out = tmp_path / "leg.json"
    args = argparse.Namespace(leg="vllm", plan=plan, leg_out=out, streams=[1])
    assert bench_serving.leg_main(args) == 1
    result = json.loads(out.read_text())
    assert result["ok"] is False
    assert "unknown key 'runtime.engine' (vllm)" in result["error"]
    assert "Traceback" in result["traceback"]
