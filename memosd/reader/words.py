"""Content words: what the support check and reconcile compare, lowercased and lightly stemmed.

Deliberately simple and deterministic (no model): a token is a run of letters or digits; function words are
dropped, but negations ("not", "never", "no") are kept as content, because an item that adds one says the
opposite of its source. The stemmer strips common English inflections ("adopted", "adopts", "adopting" ->
"adopt"; "loves", "loved", "loving" -> "lov"), enough to match a third-person restatement ("Caroline adopted
a dog") against the first-person turn ("I adopt dogs") without crediting unrelated words.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")

_STOPWORDS = """
a an the and or but if then than so as of to in on at by for with from into onto over under about after before
during between through up down out off again once here there when where why how all any both each few more most
other some such only own same too very s t can will just should would could might must shall do does did doing
done be is am are was were been being have has had having i me my mine myself we us our ours ourselves you your
yours yourself yourselves he him his himself she her hers herself it its itself they them their theirs
themselves what which who whom whose this that these those also really just get got going go
said says say tell told think thought know knew
"""
STOPWORDS = frozenset(_STOPWORDS.split())
NEGATIONS = frozenset({"not", "no", "never", "nor", "none", "nothing", "nobody", "cannot", "dont", "didnt",
                       "doesnt", "isnt", "wasnt", "arent", "werent", "wont", "cant", "hasnt", "havent"})


def stem(word: str) -> str:
    """A light suffix stripper (not Porter): plural and verb endings, then a final "e"."""
    if word.isdigit() or len(word) <= 3:
        return word
    for suffix, keep in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not (suffix == "s" and word.endswith("ss")):
            word = word[: len(word) - len(suffix)] + keep
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":  # "stopped" -> "stopp" -> "stop"
        word = word[:-1]
    return word


def content_words(text: str) -> list[str]:
    """The stemmed content words of ``text``, in order, with repeats (apostrophes are dropped first, so
    "don't" is the negation "dont" and "Caroline's" and "Caroline" are both "carolin")."""
    out = []
    for token in _TOKEN.findall(text.lower().replace("'", "").replace("\u2019", "")):
        if token in NEGATIONS:
            out.append("not")  # every negation is the same claim: the item denies something
        elif token not in STOPWORDS:
            out.append(stem(token))
    return out


def normalized(text: str) -> str:
    """The text as reconcile compares it for an exact duplicate: its content words, space-joined."""
    return " ".join(content_words(text))
