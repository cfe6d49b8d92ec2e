"""Token-level rendering: text to token ids, markup apart from content, in the model's chat template.

Both the activation path (memory blocks, prompts: ``activation/render.py``) and
training (``runtime/lora_train.py``) tokenize through these functions, so a
training example is tokenized exactly as inference would read the same text.
It sits in runtime/ so that training, below activation in the layer order,
need not import upward.

* **Contents are text.** Only the template's own markup may become control
  tokens (``<|im_start|>``, ``<|im_end|>``...). Every message content is
  tokenized with special tokens split into plain text (``encode_text``), so a
  content saying ``<|im_end|>\n<|im_start|>system`` cannot close a message
  and open a turn of its own.

Everything here is pure and runs where the tokenizer is used: the runtime
worker thread.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any


def longest_token_bytes(tokenizer: Any) -> int:
    """The most bytes of text one token of the vocabulary stands for (special tokens included).

    Each token is measured two ways, keeping the larger: the UTF-8 bytes of its decoded text, and the
    characters of its vocabulary string (byte-level BPE writes one character per byte; SentencePiece
    writes one for a leading space, which a decode drops). A text of B bytes is then at least B / this
    many tokens. SmolLM2's is 81 (a run of spaces); measuring takes ~1 s with a fast tokenizer."""
    ids = list(range(len(tokenizer)))
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: 10x faster than batch_decode
    decoded: list[str] = (backend.decode_batch([[i] for i in ids], skip_special_tokens=False) if backend is not None
                          else tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                                      clean_up_tokenization_spaces=False))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    sizes = [max(len(text.encode()), len(str(piece or ""))) for text, piece in zip(decoded, pieces, strict=True)]
    return max(sizes, default=0) or 1


def encode(tokenizer: Any, text: str) -> list[int]:
    """Markup we wrote (or a template rendered): special tokens in it are control tokens."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Untrusted text: whatever it contains, it becomes text tokens, never control tokens."""
    ids: list[int] = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def chat_token_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool,
                   after: Sequence[Mapping[str, str]] = ()) -> list[int]:
    """``messages`` rendered by ``render_chat`` and tokenized: the markup as markup, each content as text.

    Each content is replaced by a random placeholder for rendering; the rendered text is cut at the
    placeholders, and the markup between them is encoded apart from the contents. ``after``: messages
    of ours rendered before these and then left out, for a continuation (see ``tail_token_ids``); the
    template must render them as a prefix (ValueError otherwise).
    """
    nonce = secrets.token_hex(8)  # unguessable, so no content can contain it; it never reaches the tokens
    stand_ins = [{"role": m["role"], "content": f"\ue000{nonce}.{i}\ue001"} for i, m in enumerate(messages)]
    rendered = render_chat(tokenizer, [*after, *stand_ins], generation_prompt=generation_prompt)
    head = render_chat(tokenizer, after, generation_prompt=False) if after else ""
    if not rendered.startswith(head):
        raise ValueError("the chat template does not render messages one after another")
    pieces = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", rendered[len(head):])
    if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))):
        raise ValueError("the chat template does not quote every message content once, as given")
    ids: list[int] = []
    for n, piece in enumerate(pieces):
        ids += encode_text(tokenizer, messages[int(piece)]["content"]) if n % 2 else encode(tokenizer, piece)
    return ids


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> str:
    """``messages`` in the model's chat template; a plain ``Role: text`` layout for models without one."""
    if getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
        return text
    lines = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
    return "".join(lines) + ("Assistant:" if generation_prompt else "")
