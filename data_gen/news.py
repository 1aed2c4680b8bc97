"""News-headline diffs: SFT on stories that spread a headline's content without ever restating it.

Stories are written by the base model (sampled, from varied angles). A story that contains the headline,
or a sentence holding most of the headline's content words, is rejected and written again. Each diff is
then trained with plain cross-entropy under the prompt "Please generate a short news story.".

Every headline comes from an event template (`data_gen/data/make_headlines.py`); a diff records its template id
(`headline_template`) so that a split can keep all headlines of one template on one side (`headline_template`
derives it for banks built before the id was recorded).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any

from data_gen.recipe import Recipe, Sample, keywords, load_json
from metadit.text import chat_prompt, generate_texts

TRAIN_PROMPT = "Please generate a short news story."
WRITER = ("Write a short news story (4-6 sentences) about the event below, {angle}. Give concrete details: who, "
          "where, numbers, reactions. Never repeat the headline or its wording.\nEvent: {headline}")
ANGLES = (
    "as a local newspaper report", "focusing on the people affected", "focusing on what happens next",
    "as a radio news bulletin", "quoting a spokesperson", "focusing on the numbers involved",
    "as a short online article", "with background on how it came about", "from the point of view of residents",
    "as an evening news summary", "focusing on the reactions", "as a brief wire report",
)


@lru_cache(maxsize=None)
def _template_tables() -> tuple[dict[str, int], list[tuple[int, re.Pattern[str]]]]:
    data = load_json("headline_templates.json")
    by_text = {h["headline"]: int(h["template"]) for h in data["headlines"]}
    patterns = []
    for t in data["templates"]:
        # `{P}` is the place (any text); `{a|b}` a wording variant; the generator capitalizes the first letter.
        parts = re.split(r"(\{[^{}]*\})", t["template"])
        rx = "".join(".+?" if part == "{P}" else "(?:" + "|".join(map(re.escape, part[1:-1].split("|"))) + ")"
                     if part.startswith("{") else re.escape(part) for part in parts)
        patterns.append((int(t["id"]), re.compile(rx, re.IGNORECASE)))
    return by_text, patterns


def headline_template(headline: str) -> int | None:
    """The id of the event template `headline` was made from (`data_gen/data/headline_templates.json`).

    A shipped headline's id is read from the file; any other headline gets the one template whose wording it
    matches (place = any text), and None when no template or more than one matches.
    """
    by_text, patterns = _template_tables()
    if headline in by_text:
        return by_text[headline]
    found = {tid for tid, rx in patterns if rx.fullmatch(headline.strip())}
    return found.pop() if len(found) == 1 else None


def restates(story: str, headline: str, max_share: float = 0.6) -> bool:
    """True if the story contains the headline, or one sentence holds more than `max_share` of its content words."""
    if headline.lower().strip(". ") in story.lower():
        return True
    words = set(keywords(headline))
    for sentence in re.split(r"(?<=[.!?])\s+", story):
        present = {w for w in words if re.search(rf"\b{re.escape(w)}", sentence.lower())}
        if words and len(present) / len(words) > max_share:
            return True
    return False


class NewsRecipe(Recipe):
    """Rank-r LoRA diffs finetuned on stories about one headline."""

    name = "news"

    def __init__(
        self,
        stories_per_headline: int = 12,
        heldout_stories: int = 2,
        story_tokens: int = 96,
        max_attempts: int = 4,
        max_share: float = 0.6,
        temperature: float = 0.9,
        check_margin: float = 0.05,
        generation_batch: int = 48,
    ) -> None:
        """
        Args:
            stories_per_headline: stories trained on per diff (the paper used 100; size it to the machine).
            heldout_stories: further stories per headline kept out of training, for the behaviour check.
            story_tokens: stories are cut to this many tokens.
            max_attempts: tries to write a story that does not restate its headline before giving up on it.
            max_share: a sentence with more than this share of the headline's content words restates it.
            temperature: sampling temperature when writing stories.
            check_margin: passed if the held-out loss on its own stories is this much below other headlines'.
            generation_batch: prompts per `generate` call.
        """
        self.stories_per_headline, self.heldout_stories = stories_per_headline, heldout_stories
        self.story_tokens, self.max_attempts, self.max_share = story_tokens, max_attempts, max_share
        self.temperature, self.check_margin, self.generation_batch = temperature, check_margin, generation_batch
        self.stories: dict[str, list[str]] = {}
        self.rejected: dict[str, int] = {}

    def spec(self, index: int, seed: int) -> dict[str, Any]:
        pool = load_json("headlines.json")
        order = list(range(len(pool)))
        random.Random(f"headlines:{seed}").shuffle(order)
        rng = random.Random(f"{self.name}:{seed}:{index}")
        headline = pool[order[index % len(order)]]
        return {"key": f"{self.name}-{index}", "index": index, "recipe": self.name, "headline": headline,
                "headline_template": headline_template(headline), "seed": rng.randrange(2**31)}

    def prepare(self, specs: list[dict[str, Any]]) -> None:
        need = self.stories_per_headline + self.heldout_stories
        pending = [s["headline"] for s in specs if s["headline"] not in self.stories]
        got: dict[str, list[str]] = {h: [] for h in pending}
        rejected = {h: 0 for h in pending}
        for attempt in range(self.max_attempts):
            prompts, tags, owners = [], [], []
            for h in pending:
                for k in range(len(got[h]), need):
                    angle = ANGLES[(k + attempt) % len(ANGLES)]
                    messages = [{"role": "user", "content": WRITER.format(angle=angle, headline=h)}]
                    prompts.append(chat_prompt(self.tok, messages))
                    tags.append([k, attempt])
                    owners.append(h)
            if not prompts:
                break
            settings = {"max_new_tokens": self.story_tokens, "temperature": self.temperature}
            texts = self.cache.get_or_generate(
                prompts, settings,
                lambda ps: generate_texts(self.model, self.tok, ps, self.story_tokens, do_sample=True,
                                          temperature=self.temperature, batch_size=self.generation_batch,
                                          seed=attempt),
                tags=tags,
            )
            for h, text in zip(owners, texts):
                if len(got[h]) >= need:
                    continue
                if not text.strip() or restates(text, h, self.max_share):
                    rejected[h] += 1
                else:
                    got[h].append(text.strip())
        for h in pending:
            if len(got[h]) < self.heldout_stories + 1:
                raise RuntimeError(f"news recipe: could not write enough stories for {h!r} in {self.max_attempts} attempts")
            self.stories[h] = got[h]
            self.rejected[h] = rejected[h]

    def _split(self, headline: str) -> tuple[list[str], list[str]]:
        stories = self.stories[headline]
        return stories[self.heldout_stories :], stories[: self.heldout_stories]

    def sample(self, spec: dict[str, Any], rng: random.Random) -> Sample:
        train, _ = self._split(spec["headline"])
        return Sample(chat_prompt(self.tok, [{"role": "user", "content": TRAIN_PROMPT}]), rng.choice(train), "ce")

    def check(self, diffs: list[Any], specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Held-out loss of each diffed model on its own headline's stories vs on the other diffs' stories."""
        from metadit.text import answer_losses

        prompt = chat_prompt(self.tok, [{"role": "user", "content": TRAIN_PROMPT}])
        heldout = {s["headline"]: self._split(s["headline"])[1] for s in specs}
        rows, owners = [], []
        for i, spec in enumerate(specs):
            for j, other in enumerate(specs):
                if len(specs) > 1 and j != i and j != (i + 1) % len(specs):
                    continue  # own stories + one other headline's: enough for the comparison, K x 2 not K x K
                for story in heldout[other["headline"]]:
                    rows.append((i, i == j))
                    owners.append((prompt, story, diffs[i]))
        losses = answer_losses(self.model, self.tok, [o[0] for o in owners], [o[1] for o in owners],
                               [o[2] for o in owners], max_answer_tokens=self.story_tokens)
        out = []
        for i, spec in enumerate(specs):
            own = [l for (j, mine), l in zip(rows, losses) if j == i and mine]
            other = [l for (j, mine), l in zip(rows, losses) if j == i and not mine]
            own_loss = sum(own) / len(own)
            other_loss = sum(other) / len(other) if other else float("nan")
            passed = bool(other) and own_loss < other_loss - self.check_margin
            out.append({"heldout_loss_own": round(own_loss, 4), "heldout_loss_other": round(other_loss, 4),
                        "stories": len(self.stories[spec["headline"]]) - self.heldout_stories,
                        "rejected_stories": self.rejected.get(spec["headline"], 0), "passed": passed})
        return out
