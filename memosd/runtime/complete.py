"""Greedy chat completion on the in-process model, for the MemReader's extractor (on the runtime worker).

Greedy (deterministic: the same turns give the same answer), bounded in new tokens, on the base model
(the caller puts the adapter pool in its base state first). The chat goes through ``chat_token_ids``, so a
turn's text is encoded as text and cannot forge the template's control tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from memosd.runtime.model import LoadedModel
from memosd.runtime.tokens import chat_token_ids, encode_text


class PromptTooLong(Exception):
    """The chat and its answer budget do not fit in the model's context."""


def greedy_complete(loaded: LoadedModel, messages: Sequence[tuple[str, str]], max_new_tokens: int,
                    prefix: str = "") -> str:
    """The model's answer to ``messages`` ((role, content) pairs), greedy, at most ``max_new_tokens``; with
    ``prefix``, the answer is made to start with it (its tokens follow the prompt, and it is returned too):
    "[" keeps a small model on a JSON array instead of a preamble."""
    import torch

    ids = chat_token_ids(loaded.tokenizer, [{"role": r, "content": c} for r, c in messages], generation_prompt=True)
    ids += encode_text(loaded.tokenizer, prefix) if prefix else []
    if len(ids) + max_new_tokens > loaded.context_length:
        raise PromptTooLong(f"{len(ids)} prompt tokens + {max_new_tokens} > {loaded.context_length}")
    model = loaded.model
    eos = loaded.tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]  # transformers' generate is untyped here
            torch.tensor([ids], device=model.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                                 device=model.device),
            max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            pad_token_id=eos, eos_token_id=eos)
    return prefix + str(loaded.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))
