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

Everything here is pure and runs where the tokenizer is used: the runtime
worker thread.
"""

from __future__ import annotations

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
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
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
    return encode(tokenizer, render_chat(tokenizer, [message], generation_prompt=False))


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
    text = render_chat(tokenizer, messages, generation_prompt=True)
    if after_block:
        opening = [{"role": "system", "content": ""}]
        head = render_chat(tokenizer, opening, generation_prompt=False)
        whole = render_chat(tokenizer, [*opening, *messages], generation_prompt=True)
        if whole.startswith(head):  # the template renders messages one after another (ChatML and most)
            text = whole[len(head):]
    return encode(tokenizer, text)
