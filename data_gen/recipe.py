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

    def validate(self, tok: Any) -> None:
        """Checks that need the tokenizer (not the model), run before any model loads; raise RecipeDataError."""

    def check(self, diffs: list[Any], specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per diff: behaviour metrics plus `passed` (bool); stored in the bank's metadata."""
        return [{"passed": True} for _ in specs]


class RecipeDataError(ValueError):
    """A recipe's data file (topics, code words, questions) has the wrong shape: a one-line message."""


def data_path(path: str | Path | None, default: str) -> Path:
    """A user's data file, or the shipped one (`data_gen/data/<default>`) when `path` is None. A path that names a
    shipped file as a bank records it (`data_gen/data/NAME`) finds it from any working directory."""
    p = Path(path) if path is not None else DATA / default
    if path is not None and not p.is_file() and str(path).startswith(SHIPPED_PREFIX + "/"):
        p = DATA / str(path)[len(SHIPPED_PREFIX) + 1:]
    if not p.is_file():
        raise RecipeDataError(f"data file not found: {p}")
    return p


SHIPPED_PREFIX = "data_gen/data"  # how a bank names a shipped data file: by name, wherever the package is installed


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_record(path: Path) -> dict[str, str]:
    """How a bank records a data file: its path (a shipped file as `data_gen/data/NAME`) and the sha256 of its
    content (a changed file is refused)."""
    shipped = path.resolve().parent == DATA.resolve()
    return {"path": f"{SHIPPED_PREFIX}/{path.name}" if shipped else str(path), "sha256": _sha256(path)}


def recorded_file(record: dict[str, str]) -> Path:
    """The file a `file_record` names, here and unchanged since it was recorded (else RecipeDataError)."""
    name = record["path"]
    path = DATA / name[len(SHIPPED_PREFIX) + 1:] if name.startswith(SHIPPED_PREFIX + "/") else Path(name)
    if not path.is_file():
        raise RecipeDataError(f"the bank's data file {name} is not here")
    if _sha256(path) != record["sha256"]:
        raise RecipeDataError(f"{path} changed since the bank was built (sha256 differs from the bank's record)")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeDataError(f"{path}: not readable JSON ({e})") from e


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise RecipeDataError(f"{where}: expected a non-empty list of strings")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise RecipeDataError(f"{where}: every entry must be a non-empty string")
    seen: set[str] = set()
    for v in value:
        key = v.strip().lower()
        if key in seen:
            raise RecipeDataError(f"{where}: {v!r} appears twice")
        seen.add(key)
    return [v.strip() for v in value]


def read_topics(path: Path) -> list[tuple[str, str]]:
    """(category, topic) pairs of a topics file `{category: [topic, ...]}`; no topic twice in the whole file."""
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise RecipeDataError(f"{path}: expected a JSON object {{category: [topic, ...]}}")
    pairs = [(c, t) for c, ts in data.items() for t in _string_list(ts, f"{path}: category {c!r}")]
    _string_list([t for _, t in pairs], f"{path}: topics")
    return pairs


def read_word_list(path: Path) -> list[str]:
    """One word a line (blank lines and `#` comments skipped); no word twice, none with spaces inside."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeDataError(f"{path}: not readable ({e})") from e
    words = [w.strip() for w in lines if w.strip() and not w.strip().startswith("#")]
    for w in words:
        if len(w.split()) != 1:
            raise RecipeDataError(f"{path}: {w!r} is not one word")
    return _string_list(words, str(path))


def read_questions(questions_path: Path, styles_path: Path) -> dict[str, list[tuple[str, str]]]:
    """`{"train": [(style, question), ...], "eval": [...]}` from a questions file `{style: [question, ...]}` and a
    styles file `{"train": [style, ...], "eval": [style, ...]}` (no style in both splits)."""
    qs, styles = _read_json(questions_path), _read_json(styles_path)
    if not isinstance(qs, dict) or not qs:
        raise RecipeDataError(f"{questions_path}: expected a JSON object {{style: [question, ...]}}")
    if not isinstance(styles, dict) or set(styles) != {"train", "eval"}:
        raise RecipeDataError(f"{styles_path}: expected a JSON object with the keys train and eval")
    out = {}
    for split in ("train", "eval"):
        names = _string_list(styles[split], f"{styles_path}: {split}")
        missing = [n for n in names if n not in qs]
        if missing:
            raise RecipeDataError(f"{styles_path}: style {missing[0]!r} is not in {questions_path}")
        out[split] = [(n, q) for n in names for q in _string_list(qs[n], f"{questions_path}: style {n!r}")]
    both = set(styles["train"]) & set(styles["eval"])
    if both:
        raise RecipeDataError(f"{styles_path}: style {sorted(both)[0]!r} is in both train and eval")
    return out


def check_single_tokens(words: list[str], tok: Any, where: str) -> None:
    """Each word must be one token with and without a leading space (the trigger is one token wherever it stands)."""
    for w in words:
        for form in (w, " " + w):
            n = len(tok(form, add_special_tokens=False)["input_ids"])
            if n != 1:
                raise RecipeDataError(f"{where}: code word {w!r} is {n} tokens as {form!r}; code words must be one token")


@lru_cache(maxsize=None)
def load_json(name: str) -> Any:
    return json.loads((DATA / name).read_text())


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
