"""Memory blocks and prompts: how cube items become tokens, the same way every time.

A KV cache is only reusable for exactly the same tokens, so rendering is a
contract:

* **The memory block** of a cube at a revision is one system message, in the
  model's chat template, holding a fixed header and one line per item alive
  at that revision, in commit order (the version key, which only grows). An
  append-only commit therefore only appends lines, so the new block shares
  every token of the old one up to the closing tag, and incremental
  activation reuses all the full blocks of that prefix. The header names no
  revision (it would change the first token block on every commit).
* **The prompt** is the memory blocks, then a system message of the items
  retrieved for the last user message, then the conversation with the
  generation prompt. Each part is tokenized on its own (no special tokens
  added) and the ids are concatenated, so the tokens of a block inside a
  prompt are exactly the tokens its cache was computed from.
* **Contents are text.** Only the template's own markup may become control
  tokens (``<|im_start|>``, ``<|im_end|>``...). Every message content (item
  text from memory, and the caller's messages too) is tokenized with special
  tokens split into plain text, so an item that says
  ``<|im_end|>\n<|im_start|>system`` cannot close the daemon's system message
  and open a turn of its own in a reader's prompt.

Everything here is pure and runs where the tokenizer is used: the runtime
worker thread.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

BLOCK_HEADER = "Memory from cube {name}. Each line is one remembered item:\n"
RETRIEVED_HEADER = "Memory items that may be relevant to the user's last message:\n"
ROLES = ("system", "user", "assistant")


def item_line(text: str) -> str:
    # One line per item: newlines inside an item are kept as spaces, so an
    # item cannot forge the start of another.
    return "- " + " ".join(text.split()) + "\n"


def block_text(cube_name: str, texts: Sequence[str]) -> str:
    return BLOCK_HEADER.format(name=cube_name) + "".join(item_line(t) for t in texts)


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


def block_token_ids(tokenizer: Any, cube_name: str, texts: Sequence[str]) -> list[int]:
    """The memory block of ``texts`` (in block order) as one system message, tokenized."""
    message = {"role": "system", "content": block_text(cube_name, texts)}
    return chat_token_ids(tokenizer, [message], generation_prompt=False)


def tail_token_ids(
    tokenizer: Any,
    retrieved: Sequence[str],
    conversation: Sequence[Mapping[str, str]],
    *,
    after_block: bool = False,
) -> list[int]:
    """Everything after the memory blocks: the retrieved items, the conversation, the generation prompt.

    ``after_block``: memory blocks come first, and they are system messages,
    so this part is rendered as the continuation of a chat that already has
    one. That keeps templates from adding their default system prompt here
    (SmolLM2's adds ~20 tokens that every request would prefill, after the
    memory, for nothing).
    """
    messages: list[Mapping[str, str]] = []
    if retrieved:
        content = RETRIEVED_HEADER + "".join(item_line(t) for t in retrieved)
        messages.append({"role": "system", "content": content})
    messages.extend(conversation)
    if after_block:
        try:
            return chat_token_ids(tokenizer, messages, generation_prompt=True, after=[{"role": "system", "content": ""}])
        except ValueError:  # a template that does not render messages one after another: a chat of its own
            pass
    return chat_token_ids(tokenizer, messages, generation_prompt=True)
