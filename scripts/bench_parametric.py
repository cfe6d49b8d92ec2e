#!/usr/bin/env python3
"""Parametric memory benchmark, through gRPC against a real memosd running the embedded SmolLM2.

    .venv/bin/python scripts/bench_parametric.py                    # all parts (~15 min on 2 cores)
    .venv/bin/python scripts/bench_parametric.py --adapters 20 --facts 0   # quick: no training

It starts its own daemon on a temporary data dir and measures:
  * switch: Generate (max_tokens=1) alternating between two resident adapters;
    the daemon's own switch time (Stats: switch_us_total / switches) and the
    TTFT of alternating vs repeating one adapter;
  * cold activate: Evict a one-item cube with a rank-8 adapter (unloads it),
    then Activate it: the adapter is read from RocksDB, checked and loaded
    (Activation.took_us, and the daemon's adapter load time from Stats);
  * memory: the daemon's RSS with no adapter, then with --adapters adapters
    imported (one per cube) and 8 of them resident;
  * TTFT of Generate with an adapter and with the base model;
  * training: Train on --facts synthetic facts about invented countries
    (scripts/eval_memory_training.py makes them), the job's time, then
    closed-book exact-match recall through Generate with the adapter
    (no retrieval, no activation) against the base model.
Adapters are rank 8 on all attention and MLP projections, random weights (made
with peft on the dequantized model). Prints a table, writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from daemon_proc import DaemonProcess  # noqa: E402
from eval_memory_training import make_facts, score  # noqa: E402
from memosd_client import Client  # noqa: E402
from memosd_client.v1 import types_pb2 as t  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = "Say hello."


def make_adapters(model_dir: Path, out: Path, n: int) -> list[Path]:
    """``n`` distinct rank-8 LoRA adapter directories for the model (one made by peft, the rest perturbed)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    first = out / "adapter-000"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                     init_lora_weights=False)).save_pretrained(str(first))
    config = json.loads((first / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    (first / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(first / "adapter_model.safetensors"))
    dirs = [first]
    for i in range(1, n):
        d = out / f"adapter-{i:03d}"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config))
        g = torch.Generator().manual_seed(i)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tensors.items()},
                  str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def one_token_ms(client: Client, adapter_mount: str | None) -> float:
    started = time.perf_counter()
    client.generate(QUESTION, [], max_tokens=1, retrieve_k=0, adapter_mount=adapter_mount).text()
    return (time.perf_counter() - started) * 1000


def cube_with_adapter(client: Client, name: str, adapter: Path) -> str:
    client.alloc_cube(name)
    mount = client.mount(name, writable=True)
    mount.write([f"Cube {name} holds one adapter."])
    mount.import_adapter(adapter)
    mount.commit("adapter")
    return mount.mount_id


def bench_training(client: Client, n_facts: int, steps: int) -> dict[str, Any]:
    facts = make_facts(n_facts)
    client.alloc_cube("facts")
    mount = client.mount("facts", writable=True)
    mount.write([f.sentence for f in facts])
    mount.commit("facts")
    started = time.perf_counter()
    job = client.wait_job(client.train(mount.mount_id, steps=steps).job_id)
    seconds = time.perf_counter() - started
    if job.state != t.JOB_STATE_SUCCEEDED:
        return {"facts": n_facts, "state": t.JobState.Name(job.state), "error": job.error}
    trained = client.mount("facts").mount_id
    by_attr: dict[str, set[str]] = {}
    for f in facts:
        by_attr.setdefault(f.attribute, set()).add(f.value)
    result: dict[str, Any] = {"facts": n_facts, "train_seconds": seconds, "steps": job.step, "loss": job.loss}
    for label, adapter in (("base", None), ("trained", trained)):
        hits = [score(client.generate(f.question, [], max_tokens=24, retrieve_k=0, adapter_mount=adapter).text(),
                      f, by_attr[f.attribute]) for f in facts]
        result[f"{label}_recall_contains"] = sum(c for c, _ in hits) / len(hits)
        result[f"{label}_recall_strict"] = sum(s for _, s in hits) / len(hits)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=100, help="adapters registered for the memory figure")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--facts", type=int, default=50, help="facts to train on (0 skips training)")
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the daemon's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_parametric.json")
    args = parser.parse_args()

    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__DEVICE": args.device,
           "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache), "MEMOSD_RUNTIME__MAX_ADAPTERS": "8"}
    result: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
                              "adapter_rank": 8, "adapter_targets": TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"], env=env).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as client:
                while client.stats().model.state == "loading":
                    time.sleep(0.2)
                model_dir = next((args.model_cache / "models").glob("*/config.json")).parent
                adapters = make_adapters(model_dir, Path(tmp), max(2, args.adapters))
                result["adapter_bytes"] = sum(f.stat().st_size for f in adapters[0].iterdir())
                for _ in range(3):
                    one_token_ms(client, None)
                rss_base = client.stats().rss_bytes

                a = cube_with_adapter(client, "a", adapters[0])
                b = cube_with_adapter(client, "b", adapters[1])
                # Cold activation: the adapter comes from RocksDB each time.
                cold = []
                for _ in range(5):
                    client.evict("a")
                    cold.append(client.activate(a).took_us / 1000)
                s0 = client.stats().adapters
                client.activate(b)
                s1 = client.stats().adapters
                result["activate_cold_ms"] = statistics.median(cold)
                result["adapter_load_ms"] = (s1.load_us_total - s0.load_us_total) / 1000 / max(1, s1.loads - s0.loads)
                # Switching between two resident adapters.
                one_token_ms(client, a)
                one_token_ms(client, b)
                s0 = client.stats().adapters
                alternating = [one_token_ms(client, (a, b)[i % 2]) for i in range(args.reps)]
                s1 = client.stats().adapters
                same = [one_token_ms(client, a) for _ in range(args.reps)]
                base = [one_token_ms(client, None) for _ in range(args.reps)]
                result["switch_ms"] = (s1.switch_us_total - s0.switch_us_total) / 1000 / max(1, s1.switches - s0.switches)
                result["switches_counted"] = s1.switches - s0.switches
                result["ttft_alternating_ms"] = statistics.median(alternating)
                result["ttft_same_adapter_ms"] = statistics.median(same)
                result["ttft_base_ms"] = statistics.median(base)
                # Memory: every adapter registered, 8 resident.
                mounts = [a, b] + [cube_with_adapter(client, f"m{i}", d) for i, d in enumerate(adapters[2:])]
                for mount in mounts[-8:]:
                    client.activate(mount)
                stats = client.stats()
                result["adapters_registered"] = stats.adapters.stored
                result["adapters_resident"] = stats.adapters.resident
                result["rss_no_adapter_mb"] = rss_base / 2**20
                result["rss_with_adapters_mb"] = stats.rss_bytes / 2**20
                result["store_mb"] = stats.store_bytes / 2**20
                if args.facts:
                    result["training"] = bench_training(client, args.facts, args.steps)
        finally:
            daemon.stop()

    print(f"\nmemosd parametric benchmark ({result['machine']}, {result['cpus']} CPUs), rank-8 adapters on "
          f"{len(TARGETS)} projections ({result['adapter_bytes'] / 2**20:.1f} MiB each)")
    rows = [
        ("switch between two resident adapters (daemon)", f"{result['switch_ms']:.2f} ms", "<= 5 ms"),
        ("activate cold from RocksDB (Activation.took_us)", f"{result['activate_cold_ms']:.1f} ms", "<= 100 ms"),
        ("  of which loading the adapter (daemon)", f"{result['adapter_load_ms']:.1f} ms", ""),
        ("TTFT, base model", f"{result['ttft_base_ms']:.1f} ms", ""),
        ("TTFT, one adapter", f"{result['ttft_same_adapter_ms']:.1f} ms", ""),
        ("TTFT, alternating two adapters", f"{result['ttft_alternating_ms']:.1f} ms", ""),
        (f"RSS, {result['adapters_registered']} adapters registered, {result['adapters_resident']} resident",
         f"{result['rss_with_adapters_mb']:.0f} MiB (no adapter: {result['rss_no_adapter_mb']:.0f})", ""),
    ]
    training = result.get("training")
    if training and "train_seconds" in training:
        rows += [
            (f"training on {training['facts']} facts ({training['steps']} steps)",
             f"{training['train_seconds']:.0f} s", ""),
            ("closed-book recall (contains / strict), base",
             f"{training['base_recall_contains']:.0%} / {training['base_recall_strict']:.0%}", "~0%"),
            ("closed-book recall (contains / strict), trained",
             f"{training['trained_recall_contains']:.0%} / {training['trained_recall_strict']:.0%}", ">= 80%"),
        ]
    elif training:
        rows.append(("training", f"{training['state']}: {training['error']}", ""))
    for name, value, target in rows:
        print(f"{name:<58}{value:>28}  {target}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
