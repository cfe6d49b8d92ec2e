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

The token-level part (markup apart from content, the chat template) is
``runtime/tokens.py``, shared with training. Everything here is pure and runs
where the tokenizer is used: the runtime worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from memosd.runtime.tokens import chat_token_ids

BLOCK_HEADER = "Memory from cube {name}. Each line is one remembered item:\n"
RETRIEVED_HEADER = "Memory items that may be relevant to the user's last message:\n"


def item_line(text: str) -> str:
    # One line per item: newlines inside an item are kept as spaces, so an
    # item cannot forge the start of another.
    return "- " + " ".join(text.split()) + "\n"


def block_text(cube_name: str, texts: Sequence[str]) -> str:
    return BLOCK_HEADER.format(name=cube_name) + "".join(item_line(t) for t in texts)


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
