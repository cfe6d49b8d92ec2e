"""The JSON schema of one extraction answer, for schema-constrained decoding.

The in-process model decodes under this schema (runtime/complete.py on the transformers engine, vLLM's
structured outputs on the vllm engine), so its answer is a JSON array of whole items whatever a 135M model
would have written. The schema is a *subset* of what parse.py accepts, never a replacement for it: the parse
stays strict (a bound the grammar cannot say, such as "printable" or "a real calendar day", is checked
there), and the support check and the refusals stay as they are. An endpoint gets no schema (not every
OpenAI-compatible server takes one); its answer goes through the same parse.

Tighter than parse.py on purpose: at most ``MAX_ITEMS`` items of at most ``MAX_TEXT_CHARS`` characters, so a
whole answer fits the default budget of 256 new tokens. A grammar forces the array to be well formed only
if it is allowed to end: a model that repeats itself (SmolLM2-135M does) would otherwise be cut by the budget
mid-array, and a cut answer is not JSON (measured: BENCHMARKS.md, "The MemReader on LoCoMo dev").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memosd.kernel import validate
from memosd.reader.types import ITEM_KINDS

MAX_ITEMS = 4  # items one constrained answer may hold (parse.py takes up to validate.MAX_EXTRACTED_ITEMS)
MAX_TEXT_CHARS = 160  # an item's text in a constrained answer (parse.py: validate.MAX_EXTRACTED_TEXT_CHARS)
MAX_SOURCES = 4  # refs one item may name in a constrained answer (parse.py: validate.MAX_EXTRACTED_SOURCES)
DAY_PATTERN = r"^\d{4}-\d{2}-\d{2}$"  # parse.py checks it is a real day

assert MAX_ITEMS <= validate.MAX_EXTRACTED_ITEMS and MAX_TEXT_CHARS <= validate.MAX_EXTRACTED_TEXT_CHARS
assert MAX_SOURCES <= validate.MAX_EXTRACTED_SOURCES


def answer_schema(refs: Sequence[str]) -> dict[str, Any]:
    """The schema of an answer to a prompt that showed the turns ``refs`` ("t1", ...): an array of objects
    with exactly kind / text / date / sources, in that order, the sources among ``refs``."""
    return {
        "type": "array",
        "maxItems": MAX_ITEMS,
        "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["kind", "text", "date", "sources"],
            "properties": {
                "kind": {"type": "string", "enum": list(ITEM_KINDS)},
                "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS},
                "date": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": DAY_PATTERN}]},
                "sources": {"type": "array", "minItems": 1, "maxItems": MAX_SOURCES,
                            "items": {"type": "string", "enum": list(refs)}},
            },
        },
    }
