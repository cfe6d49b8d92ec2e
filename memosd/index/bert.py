"""A BERT sentence encoder in plain torch, for the embedder's start time.

Why this exists: loading a model through sentence-transformers imports
transformers' model machinery (its generation, dynamo and sklearn imports), which
takes ~5 s of a daemon's ~7 s start on a 2-core machine, before the first call
can be served. A BERT encoder followed by mean or CLS pooling is small enough to
write once: torch, the model's ``tokenizer.json`` (through ``tokenizers``) and
its safetensors weights are all it needs. ``load_bert_encoder`` takes a
sentence-transformers directory only when its pipeline is exactly
Transformer(BERT) -> Pooling(mean or CLS) -> optional Normalize, and answers
None for anything else, which the embedder then loads through
sentence-transformers as before. tests/unit/test_embedder.py checks that both
give the same vectors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclass(frozen=True)
class BertShape:
    layers: int
    heads: int
    hidden: int
    layer_norm_eps: float
    max_positions: int


@dataclass(frozen=True)
class Pipeline:
    """What a sentence-transformers directory asks for, when this module can do it."""

    pooling: str  # "mean" | "cls"
    normalize: bool
    max_seq_length: int
    shape: BertShape


def read_pipeline(path: Path) -> Pipeline | None:
    """The directory's pipeline if it is BERT -> mean/CLS pooling -> optional Normalize, else None."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        config = json.loads((path / "config.json").read_text())
        types = [m["type"] for m in modules]
        if types[:2] != [_TRANSFORMER, _POOLING] or types[2:] not in ([], [_NORMALIZE]):
            return None
        if modules[0].get("path", "") != "" or not (path / "tokenizer.json").is_file():
            return None
        if not (path / "model.safetensors").is_file():
            return None
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            return None
        if config.get("position_embedding_type", "absolute") != "absolute":
            return None
        pooling_config = json.loads((path / modules[1]["path"] / "config.json").read_text())
        modes = [mode for key, mode in _POOLING_MODES.items() if pooling_config.get(key)]
        others = [key for key, on in pooling_config.items()
                  if key.startswith("pooling_mode") and on and key not in _POOLING_MODES]
        if len(modes) != 1 or others:
            return None
        st_config_path = path / "sentence_bert_config.json"
        st_config = json.loads(st_config_path.read_text()) if st_config_path.is_file() else {}
        if st_config.get("do_lower_case"):
            return None  # sentence-transformers lowercases before the tokenizer; not done here
        shape = BertShape(layers=int(config["num_hidden_layers"]), heads=int(config["num_attention_heads"]),
                          hidden=int(config["hidden_size"]), layer_norm_eps=float(config["layer_norm_eps"]),
                          max_positions=int(config["max_position_embeddings"]))
        max_len = int(st_config.get("max_seq_length") or shape.max_positions)
        return Pipeline(pooling=modes[0], normalize=types[2:] == [_NORMALIZE],
                        max_seq_length=min(max_len, shape.max_positions), shape=shape)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


class BertEncoder:
    """Texts -> pooled float32 vectors, exactly the sentence-transformers pipeline it was read from."""

    def __init__(self, pipeline: Pipeline, weights: dict[str, torch.Tensor], tokenizer: Any, device: str) -> None:
        self.pipeline = pipeline
        self.dim = pipeline.shape.hidden
        self.device = device
        self._w = {name: tensor.to(device) for name, tensor in weights.items()}
        self._tokenizer = tokenizer

    def get_embedding_dimension(self) -> int:
        """sentence-transformers' name for it, so the embedder reads either model's width one way."""
        return self.dim

    def encode(self, texts: Sequence[str], batch_size: int) -> npt.NDArray[np.float32]:
        import torch

        encodings = self._tokenizer.encode_batch(list(texts))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Longest first, like sentence-transformers: each batch pads to a similar length.
        order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(encodings[i].ids) for i in rows)
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.bool)
                for r, i in enumerate(rows):
                    n = len(encodings[i].ids)
                    ids[r, :n] = torch.tensor(encodings[i].ids, dtype=torch.long)
                    mask[r, :n] = True
                ids, mask = ids.to(self.device), mask.to(self.device)
                pooled = self._pool(self._forward(ids, mask), mask)
                if self.pipeline.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
                out[rows] = pooled.float().cpu().numpy()
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch
        from torch.nn import functional

        shape, w = self.pipeline.shape, self._w
        eps = shape.layer_norm_eps
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = functional.layer_norm(x, (shape.hidden,), w["embeddings.LayerNorm.weight"],
                                  w["embeddings.LayerNorm.bias"], eps)
        batch, width = ids.shape
        head_dim = shape.hidden // shape.heads
        attend = mask[:, None, None, :]  # every query sees the real tokens only

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, width, shape.heads, head_dim).transpose(1, 2)

        for n in range(shape.layers):
            p = f"encoder.layer.{n}."

            def linear(name: str, t: torch.Tensor, prefix: str = p) -> torch.Tensor:
                return functional.linear(t, w[f"{prefix}{name}.weight"], w[f"{prefix}{name}.bias"])

            q, k, v = (heads(linear(f"attention.self.{name}", x)) for name in ("query", "key", "value"))
            context = functional.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                                              scale=1.0 / math.sqrt(head_dim))
            context = context.transpose(1, 2).reshape(batch, width, shape.hidden)
            x = functional.layer_norm(linear("attention.output.dense", context) + x, (shape.hidden,),
                                      w[f"{p}attention.output.LayerNorm.weight"],
                                      w[f"{p}attention.output.LayerNorm.bias"], eps)
            hidden = functional.gelu(linear("intermediate.dense", x))
            x = functional.layer_norm(linear("output.dense", hidden) + x, (shape.hidden,),
                                      w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"], eps)
        return x

    def _pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pipeline.pooling == "cls":
            return x[:, 0]
        weights = mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def load_bert_encoder(path: Path, device: str) -> BertEncoder | None:
    """The plain-torch encoder for ``path``, or None when its pipeline is not one this module runs."""
    pipeline = read_pipeline(path)
    if pipeline is None:
        return None
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=pipeline.max_seq_length)
    tokenizer.no_padding()
    weights = {name.removeprefix("bert."): t for name, t in load_file(str(path / "model.safetensors")).items()}
    needed = _needed_weights(pipeline.shape)
    if not needed <= weights.keys():
        return None
    return BertEncoder(pipeline, {name: weights[name] for name in needed}, tokenizer, device)


def _needed_weights(shape: BertShape) -> set[str]:
    names = {f"embeddings.{e}.weight" for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    names |= {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
    for n in range(shape.layers):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense", "attention.output.LayerNorm", "output.LayerNorm"):
            names |= {f"encoder.layer.{n}.{part}.weight", f"encoder.layer.{n}.{part}.bias"}
    return names
