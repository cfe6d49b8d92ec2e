"""GPU check of the model runtime's CUDA path (run on a machine with CUDA; not part of CI).

    python3 scripts/gpu/check_runtime_cuda.py

A tiny random Llama saved as a local model directory (the embedded SmolLM2's
GGUF does not travel to the GPU machine) is loaded with device "auto" on the
runtime worker: it must land on cuda in bfloat16, give the same fingerprint on
every load, and generate greedily from a prefix KV cache exactly as from a full
prefill.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from memosd.runtime import ModelSpec, RuntimeWorker, load_model


def tiny_llama(root: Path) -> Path:
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    (root / "vocab.json").write_text(__import__("json").dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = GPT2Tokenizer(vocab_file=str(root / "vocab.json"), merges_file=str(root / "merges.txt"))
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(vocab), max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "tiny")  # type: ignore[no-untyped-call,unused-ignore]
    tokenizer.save_pretrained(root / "tiny")
    return root / "tiny"


def main() -> None:
    path = tiny_llama(Path(tempfile.mkdtemp()))
    worker = RuntimeWorker()
    spec = ModelSpec(source=str(path), device="auto")
    loaded = worker.call(lambda: load_model(spec, Path(tempfile.mkdtemp())))
    again = worker.call(lambda: load_model(spec, Path(tempfile.mkdtemp())))
    print("device", loaded.device, "dtype", loaded.dtype, "fingerprint", loaded.fingerprint, torch.cuda.get_device_name(0))
    assert str(loaded.device).startswith("cuda") and loaded.fingerprint == again.fingerprint

    def prefix_equals_full() -> float:
        model = loaded.model
        ids = torch.randint(0, 90, (1, 40), device=model.device)
        with torch.no_grad():
            full = model(ids).logits[:, -1]
            prefix = model(ids[:, :30], use_cache=True).past_key_values
            reused = model(ids[:, 30:], past_key_values=copy.deepcopy(prefix)).logits[:, -1]
        return float((full.float() - reused.float()).abs().max())

    diff = worker.call(prefix_equals_full)
    print(f"max |full prefill - prefix cache| logits: {diff:.3e}")
    assert diff < 5e-2  # bfloat16
    worker.shutdown()
    print("GPU RUNTIME CHECK OK")


if __name__ == "__main__":
    main()
