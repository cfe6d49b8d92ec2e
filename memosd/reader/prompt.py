"""The extraction prompt: a few conversation turns in, a JSON array of memory items out.

Each turn is shown with a short ref ("t1"), its date, its speaker and its words with their relative dates
resolved (kernel/memory_text.py, as every other reader of a turn sees it), so an item's ``date`` can be an
absolute day the turn supports. Short refs rather than item ids: a small model copies "t3" reliably and a
26-character id less so; parse.py maps the refs back and drops any ref that was not shown.

A turn is one line of the prompt whatever its text holds: its line breaks are written as the two characters
"\\n" (and a backslash as two), so a speaker cannot write a line that looks like another turn ("[t2] ...
Melanie: ...") or an instruction. The chat template's control tokens cannot be forged either: the messages
are encoded as text (runtime/tokens.chat_token_ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from memosd.kernel.memory_text import memory_text
from memosd.reader.types import SourceTurn, is_context

SYSTEM = (
    "You extract long-term memory from a conversation. Answer with a JSON array only, no other text. "
    'Each element is an object with exactly these keys: "kind" (one of "fact", "preference", "event"), '
    '"text" (one short sentence in the third person, naming the speaker, using only what the turns say), '
    '"date" (the day an event happened as "YYYY-MM-DD", or null when the turns do not say), '
    '"sources" (the refs of the turns that say it, like ["t1"]). '
    "Leave out greetings, questions and anything the turns do not state. If there is nothing to remember, "
    "answer []."
)
# Two items, not one: with a one-item example SmolLM2-135M splits an item's keys over two objects; with two
# it writes whole objects (measured on two turns: 0 of 2 proposed items parsed, then 2 of 2).
EXAMPLE_TURNS = ("[t1] 2023-05-08 Caroline: I went to a support group yesterday [yesterday: 7 May 2023]\n"
                 "[t2] 2023-05-08 Melanie: I like jazz")
EXAMPLE_ANSWER = ('[{"kind": "event", "text": "Caroline went to a support group.", "date": "2023-05-07", '
                  '"sources": ["t1"]}, {"kind": "preference", "text": "Melanie likes jazz.", "date": null, '
                  '"sources": ["t2"]}]')


def turn_date(event_ns: int) -> str:
    return datetime.fromtimestamp(event_ns / 1e9, tz=UTC).date().isoformat() if event_ns > 0 else "unknown"


CONTEXT_NOTE = "The assistant's turns are context: take no item from them."
# Every line break str.splitlines knows, so no renderer or model sees a new line inside a turn.
_LINE_BREAKS = str.maketrans({c: "\\n" for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"} | {"\\": "\\\\"})


def one_line(text: str) -> str:
    """``text`` with its line breaks escaped ("\\n") and its backslashes doubled: one line, reversibly."""
    return text.replace("\r\n", "\n").translate(_LINE_BREAKS)


def render_turn(turn: SourceTurn) -> str:
    text = memory_text(turn.text, turn.speaker or "someone", turn.event_ns)
    return f"[{turn.ref}] {turn_date(turn.event_ns)} {one_line(text)}"


def extraction_messages(turns: Sequence[SourceTurn]) -> list[tuple[str, str]]:
    """The chat (role, content) pairs asking for ``turns``' memory items: the instructions, one worked
    example, then the turns."""
    return [
        ("system", SYSTEM),
        ("user", "Turns:\n" + EXAMPLE_TURNS),
        ("assistant", EXAMPLE_ANSWER),
        ("user", "Turns:\n" + "\n".join(render_turn(t) for t in turns)
         + ("\n" + CONTEXT_NOTE if any(is_context(t.speaker) for t in turns) else "")),
    ]


def refs_for(item_ids: Sequence[str]) -> list[str]:
    """The prompt refs of ``item_ids``, in order: "t1", "t2", ..."""
    return [f"t{i}" for i in range(1, len(item_ids) + 1)]
