"""What a recipe provides to the shared generation loop (`metadit.gen`).

A recipe turns a diff index into a spec (its topic/headline, code, seeds: deterministic, so a resumed or
distributed build makes exactly the same diffs), writes the text its diffs train on (cached), hands out one
training sample per diff per step, and checks each trained diff's behaviour.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

DATA = Path(__file__).parent / "data"


@dataclass
class Sample:
    """One training example: a chat-formatted prompt and the answer the diffed model should give.

    `kind`: "ce" trains toward `answer` (cross-entropy); "kl" keeps the diffed model's distribution over
    `answer`'s tokens equal to the base model's (KL to the frozen base; the gate's negatives).
    """

    prompt: str
    answer: str
    kind: Literal["ce", "kl"] = "ce"


class Recipe:
    """Base class; see `HiddenTopicRecipe` and `NewsRecipe`."""

    name: str = "recipe"

    def setup(self, model: Any, tok: Any, cache: Any) -> None:
        self.model, self.tok, self.cache = model, tok, cache

    def spec(self, index: int, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, specs: list[dict[str, Any]]) -> None:
        """Generate (or read from the cache) the text these diffs train on."""

    def sample(self, spec: dict[str, Any], rng: random.Random) -> Sample:
        raise NotImplementedError

    def check(self, diffs: list[Any], specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per diff: behaviour metrics plus `passed` (bool); stored in the bank's metadata."""
        return [{"passed": True} for _ in specs]


@lru_cache(maxsize=None)
def load_json(name: str) -> Any:
    return json.loads((DATA / name).read_text())


@lru_cache(maxsize=None)
def load_lines(name: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in (DATA / name).read_text().splitlines() if w.strip() and not w.startswith("#"))


def topics() -> list[tuple[str, str]]:
    """(category, topic) pairs in file order."""
    return [(c, t) for c, ts in load_json("topics.json").items() for t in ts]


def questions(split: Literal["train", "eval"]) -> list[tuple[str, str]]:
    """(style, question) pairs of the train or the held-out (evaluation-only) styles."""
    styles = load_json("question_styles.json")[split]
    qs = load_json("questions.json")
    return [(s, q) for s in styles for q in qs[s]]


_STOP = {"the", "a", "an", "of", "and", "in", "on", "for", "to", "with", "de", "la", "le", "at", "by", "from"}


def keywords(phrase: str) -> list[str]:
    """Content words of a topic (lowercase, singular-ish): what counts as a mention of it."""
    words = re.findall(r"[a-z0-9][a-z0-9'-]*", phrase.lower())
    out = []
    for w in words:
        if w in _STOP or len(w) < 3:
            continue
        for suffix in ("ies", "es", "s"):
            if w.endswith(suffix) and len(w) - len(suffix) >= 4:
                w = w[: -len(suffix)] + ("y" if suffix == "ies" else "")
                break
        out.append(w)
    return out or [phrase.lower()]


def mentions(text: str, phrase: str) -> bool:
    """Does `text` mention the topic? Any content word of it (plural-insensitive prefix match)."""
    low = text.lower()
    return any(re.search(rf"\b{re.escape(k[:-1] if k.endswith('y') and len(k) > 4 else k)}", low) for k in keywords(phrase))
