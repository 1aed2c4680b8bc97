"""Matching a prediction to the truth: `names_topic` (the match every stage uses: the bank's behaviour check,
the evaluation) and `exact_match`.

`names_topic(text, topic)`: every content word of the topic appears in the text as a whole word,
plural-insensitive ("volcanoes" names "volcano"; "a big fan of jazz" names "jazz"; "hip hop" names "hip-hop";
"french" alone does not name "French cuisine"). Accents and case are ignored.
"""

from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache

# Function words that do not carry a topic (a topic is named by its other words).
STOP_WORDS = frozenset(
    "the a an of and in on for to with de la le les du des at by from or its their my your our as into".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _fold(text: str) -> str:
    """Lowercase, accents removed (NFKD, combining marks dropped)."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    """The words of a text: lowercase, accent-free, split at anything but letters and digits (hyphens split;
    a possessive "'s" is dropped)."""
    out = []
    for w in _WORD.findall(_fold(text)):
        out.append(w[:-2] if w.endswith("'s") else w.replace("'", ""))
    return [w for w in out if w]


@lru_cache(maxsize=65536)
def forms(word: str) -> frozenset[str]:
    """The singular candidates of a word (itself, minus -s, minus -es, -ies → -y); two words are the same
    word, plural-insensitively, when their forms meet. Stripped forms shorter than 3 letters are not kept."""
    out = {word}
    if word.endswith("ies") and len(word) > 4:
        out.add(word[:-3] + "y")
    if word.endswith("es") and len(word) > 4:
        out.add(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        out.add(word[:-1])
    return frozenset(out)


def content_words(topic: str) -> list[str]:
    """The words of a topic that must all be named: every word but function words (all of them if that
    leaves none)."""
    ws = words(topic)
    return [w for w in ws if w not in STOP_WORDS] or ws


def names_topic(text: str, topic: str) -> bool:
    """Does `text` name `topic`? Every content word of the topic, as a whole word, plural-insensitive."""
    needed = content_words(topic)
    if not needed:
        return False
    have: set[str] = set()
    for w in words(text):
        have |= forms(w)
    return all(forms(w) & have for w in needed)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (hyphens kept), a leading article and surrounding space: for exact match."""
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation.replace("-", "")))
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"^(the|a|an) ", "", text)


def exact_match(prediction: str, truth: str) -> bool:
    """The one exact match: equal after `normalize` (case, punctuation, a leading article ignored)."""
    return normalize(prediction) == normalize(truth)
