"""What an item says as memory: its words and, for a conversation turn, who said them.

Everything that reads an item *as memory* goes through ``memory_text``: the
dense and BM25 indexes, the activation memory block, the retrieved items a
Generate is shown, and the texts a cube's adapter is trained on. A turn
stored as its speaker's words ("I adopted a dog last week", speaker
"Caroline") is indexed and shown as "Caroline: I adopted a dog last week".
A question that names the speaker ("What did Caroline adopt?") then matches
her turns in BM25 and in the embedding, and the model can tell who said
what. The stored text, and what Read and Search return as the item's text,
stay the words alone.

``MEMORY_TEXT_RECIPE`` names this format. The kernel stores it in the store's
metadata; at start, a store made under another recipe has its turns (the
only items the recipe changes) re-embedded and their cubes re-indexed.
"""

from __future__ import annotations

MEMORY_TEXT_RECIPE = "speaker-prefix/1"


def memory_text(text: str, speaker: str = "") -> str:
    """``text`` as the indexes and the model see it: ``"<speaker>: <text>"`` for a turn, else ``text``."""
    return f"{speaker}: {text}" if speaker else text
