"""What an item says as memory: its words and, for a conversation turn, who said them and when.

Everything that reads an item *as memory* goes through ``memory_text``: the
dense and BM25 indexes, the activation memory block, the retrieved items a
Generate is shown, and the texts a cube's adapter is trained on. A turn
stored as its speaker's words ("I adopted a dog last week", speaker
"Caroline") is indexed and shown as "Caroline: I adopted a dog last week".
A question that names the speaker ("What did Caroline adopt?") then matches
her turns in BM25 and in the embedding, and the model can tell who said
what. The stored text, and what Read and Search return as the item's text,
stay the words alone.

A turn's relative time expressions are followed by what they mean at the
turn's event time (kernel/timeref.py): "Caroline: I went to a support group
yesterday [yesterday: 7 May 2023]", so a question naming the date finds it
in BM25, and the model reads when it happened.

``MEMORY_TEXT_RECIPE`` names this format. The kernel stores it in the store's
metadata; at start, a store made under another recipe has its turns (the
only items the recipe changes) re-embedded and their cubes re-indexed.
"""

from __future__ import annotations

from memosd.kernel.timeref import annotate

MEMORY_TEXT_RECIPE = "speaker-prefix+resolved-dates/2"


def memory_text(text: str, speaker: str = "", event_ns: int = 0) -> str:
    """``text`` as the indexes and the model see it: for a turn (a ``speaker``), ``"<speaker>: <text>"`` with
    its relative dates resolved at ``event_ns``; else ``text``."""
    return f"{speaker}: {annotate(text, event_ns)}" if speaker else text
