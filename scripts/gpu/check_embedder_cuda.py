"""GPU check of the embedder's CUDA path (run on a machine with CUDA; not part of CI).

    python3 scripts/gpu/check_embedder_cuda.py

A tiny random BERT saved as a local sentence-transformers model (the builtin
model's 90 MB do not travel to the GPU machine): Embedder.load(device="auto")
must pick cuda, and its vectors must match the CPU's.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers import models as st_models  # type: ignore[attr-defined]
from transformers import BertConfig, BertModel, BertTokenizer


def load_embedder_class() -> Any:
    """embedder.py alone: the GPU image lacks usearch and tantivy, which memosd.index imports."""
    spec = importlib.util.spec_from_file_location("embedder", "memosd/index/embedder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Embedder


def tiny_model(root: Path) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *map(chr, range(97, 123)), "the", "gpu", "memory"]
    (root / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizer(vocab_file=str(root / "vocab.txt"))
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    torch.manual_seed(0)
    bert_dir = root / "tiny" / "bert"
    bert_dir.mkdir(parents=True)
    BertModel(config).save_pretrained(bert_dir)  # type: ignore[no-untyped-call,unused-ignore]
    tokenizer.save_pretrained(bert_dir)
    word = st_models.Transformer(str(bert_dir))
    model = SentenceTransformer(modules=[word, st_models.Pooling(word.get_word_embedding_dimension())])
    model.save(str(root / "tiny"))
    return root / "tiny"


def main() -> None:
    embedder_class = load_embedder_class()
    path = tiny_model(Path(tempfile.mkdtemp()))
    texts = ["the gpu memory", "a b c", "memory of the gpu"] * 40
    gpu = embedder_class.load(str(path), device="auto", batch_size=32)
    cpu = embedder_class.load(str(path), device="cpu", batch_size=32)
    print("resolved device:", gpu.device, "-", torch.cuda.get_device_name(0))
    started = time.perf_counter()
    on_gpu = gpu.embed(texts)
    took_ms = (time.perf_counter() - started) * 1000
    on_cpu = cpu.embed(texts)
    norm_error = float(np.abs(np.linalg.norm(on_gpu, axis=1) - 1).max())
    print(f"shape {on_gpu.shape} {on_gpu.dtype}, max |norm-1| {norm_error:.1e}, "
          f"max |gpu-cpu| {float(np.abs(on_gpu - on_cpu).max()):.1e}, {took_ms:.1f} ms")
    assert gpu.device == "cuda" and gpu.fingerprint == cpu.fingerprint
    assert np.allclose(on_gpu, on_cpu, atol=1e-4)
    print("GPU EMBEDDER CHECK OK")


if __name__ == "__main__":
    main()
