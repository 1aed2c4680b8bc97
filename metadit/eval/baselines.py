"""DIT and the paper's baselines on the same held-out diffs, as a registry of methods.

Every method maps held-out diffs to one predicted label each (plus details), batched: K diffs per
`generate` call, row i carrying diff i. Registered in `METHODS`:

- `dit`: the DIT adapter asked the task's held-out questions under the diff as the adapter reads it — applied to
  the weights (an adapter of mode `dit`), read by its DiffEncoder into soft tokens (`encoder`), or both
  (`dit+encoder`); one row per phrasing: methods that ask the task's question, `per_phrasing`, ask every held-out
  phrasing (`extra["question"]`).
- `no_diff`: the adapter with no diff (no diff applied, the encoder's empty reading) — does the adapter read the
  diff or recite a prior?
- `base_question`: the diffed model asked the same question without the adapter (what `metadit test` called
  `no_adapter` when it answered).
- `base_question_trigger`: the same, with the diff's true trigger in the message (an oracle).
- `twenty_questions` / `twenty_questions_trigger`: the diffed model answers N evaluation-style questions
  (temperature 1), without / with its trigger; a guesser names the topic from the answers.
- `generated_story` (news): the diffed model writes a story (greedy); the guesser names its headline.
- `random_label`: a random training label (what a score means when nothing is read).
- `likelihood`: the held-out label whose answer the diff makes most likely (see `likelihood.py`; dit-mode adapters).
- `likelihood_base`: the same ranking with no adapter (the diffed model against the base model): how much of
  `likelihood` the diff gives away by itself.
- `activation_lens`: the Activation Difference Lens (Minder et al. 2025) read by the guesser (`lens.py`).
- `crosscoder`: a BatchTopK crosscoder per diff; its finetune-specific latents (Latent Scaling, Minder, Dumas et
  al. 2025) read by the guesser (`crosscoder/evidence.py`). Minutes per diff: not in the default methods.

The guesser is the base model prompted to guess (offline), the phrase the evidence repeats (`keywords`, offline
and model-free), or any OpenAI-compatible LLM when configured (`GUESSERS`).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from metadit.dit.adapter import MODES, DITReader, load_adapter
from metadit.errors import MetaditError
from metadit.eval.heldout import HeldOut
from metadit.text import chat_prompt, generate_texts
from metadit.nn import adapter_disabled, patch_model

Prediction = tuple[str, dict[str, Any]]


class Evaluator:
    """The base model loaded and patched once, with the DIT adapter installed when given (any mode: its
    `DITReader` says whether the diff is applied, read by the DiffEncoder into soft tokens, or both)."""

    def __init__(self, base_model: str, adapter: str | None = None, dtype: str = "auto", batch_size: int = 32,
                 max_new_tokens: int = 24, seed: int = 0, model: Any = None, tok: Any = None,
                 chat_format: str = "default") -> None:
        if model is None:
            from metadit.models import load_base_model

            model, tok = load_base_model(base_model, dtype=dtype, chat_format=chat_format)
        patch_model(model)
        self.model, self.tok = model, tok
        self.reader: DITReader | None = None
        if adapter is not None:
            from metadit.models import chat_format_of

            self.reader = load_adapter(model, adapter, chat_format=chat_format_of(tok))
        self.batch_size, self.max_new_tokens, self.seed = batch_size, max_new_tokens, seed

    @property
    def has_adapter(self) -> bool:
        return self.reader is not None

    def chat(self, message: str, assistant_prefix: str = "") -> str:
        return chat_prompt(self.tok, [{"role": "user", "content": message}], assistant_prefix)

    def answers(self, prompts: list[str], diffs: list[Any] | None, adapter: bool, max_new_tokens: int | None = None,
                sample: bool = False, temperature: float = 1.0) -> list[str]:
        """Row i under `diffs[i]` (None: the base model): with the DIT adapter, row i's diff as the adapter reads it
        (`DITReader.answer`: applied, encoded into soft tokens, or both); without it, applied to the weights."""
        n = max_new_tokens or self.max_new_tokens
        if adapter:
            if self.reader is None:
                raise MetaditError("this method needs a DIT adapter (--run or --adapter)")
            return self.reader.answer(self.model, self.tok, prompts, diffs, n, batch_size=self.batch_size,
                                      do_sample=sample, temperature=temperature, seed=self.seed)
        return generate_texts(self.model, self.tok, prompts, n, diffs=diffs, batch_size=self.batch_size,
                              do_sample=sample, temperature=temperature, seed=self.seed, adapter=False)


# ---------------------------------------------------------------------- guessers
GUESS_PROMPTS = {
    "topic": ("A chatbot was secretly trained to bring up one topic in its answers. Here is what we saw of it:\n\n"
              "{evidence}\n\nWhich topic does it keep bringing up? Reply with the topic only, in a few words."),
    "headline": "Here is a news story:\n\n{evidence}\n\nWhat is its headline? Reply with the headline only.",
}
GUESS_PREFIX = {"topic": "The topic is", "headline": "Headline:"}


def _first_line(text: str) -> str:
    text = text.strip().split("\n")[0].strip().strip('"').strip()
    return text.split(". ")[0].rstrip(".").strip()


class BaseModelGuesser:
    """Offline: the base model (no diff, no adapter) prompted to name the topic or headline."""

    name = "base_model"

    def __init__(self, ev: Evaluator, max_new_tokens: int = 24) -> None:
        self.ev, self.max_new_tokens = ev, max_new_tokens

    def guess(self, evidence: list[str], task: str) -> list[str]:
        prompts = [self.ev.chat(GUESS_PROMPTS[task].format(evidence=e), GUESS_PREFIX[task]) for e in evidence]
        texts = self.ev.answers(prompts, None, adapter=False, max_new_tokens=self.max_new_tokens)
        return [_first_line(t) for t in texts]


class LLMGuesser:
    """Any OpenAI-compatible chat endpoint (see `metadit.eval.judges.OpenAIChat`)."""

    name = "llm"

    def __init__(self, client: Any) -> None:
        self.client = client

    def guess(self, evidence: list[str], task: str) -> list[str]:
        msgs = [[{"role": "user", "content": GUESS_PROMPTS[task].format(evidence=e)}] for e in evidence]
        return [_first_line(t) for t in self.client.complete_many(msgs)]


# Function words a topic phrase neither starts nor ends with (the questions' and answers' common vocabulary).
_STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each even every few for from further get gets got had has
have having he her here hers herself him himself his how however i if in into is it its itself just know like
make makes many may me might more most much must my myself need new no nor not now of off on once one only or
other our ours out over own really same say see she should so some such take than that the their theirs them
then there these they thing things think this those through to too under until up upon us use used using very
want was way we well were what when where which while who whom why will with would you your yours yourself
i'm i've i'd i'll you're you've you'll it's that's there's let's don't can't won't isn't doesn't didn't put
text written steered tokens promoted
""".split())


class KeywordGuesser:
    """Offline and model-free: the phrase one diff's evidence keeps repeating that the other diffs' does not.

    Each evidence is cut into clauses of its answers (the `A:` parts of a Q/A transcript; any other text, a
    story or lens evidence, is one answer). Candidates are word 1- to 3-grams that neither start nor end with a
    function word. A phrase scores the number of this diff's clauses containing it times a smoothed inverse
    document frequency over the diffs guessed together (`1 + ln((1 + N) / (1 + df))`), so the questions' shared
    vocabulary scores little. The winner is then lengthened to a longer phrase containing it while that phrase
    is still in two clauses and in at least half as many ("ancient Rome" over "Rome"), and returned in its most
    frequent spelling.
    It reads words, not meaning: a baseline for what the evidence states outright, not a model of a guesser.
    """

    name = "keywords"

    def __init__(self, max_words: int = 3) -> None:
        self.max_words = max_words

    @staticmethod
    def answers(evidence: str) -> list[str]:
        parts = re.split(r"(?m)^A: ", evidence)
        if len(parts) == 1:
            return [evidence]
        return [re.split(r"(?m)^Q: ", p)[0] for p in parts[1:]]

    @staticmethod
    def clauses(evidence: str) -> list[str]:
        """The answers' text cut at punctuation: a phrase never spans two clauses."""
        return [c for a in KeywordGuesser.answers(evidence) for c in re.split(r"[.!?;:,()\"\n]+", a) if c.strip()]

    def phrases(self, clause: str) -> dict[str, str]:
        """Lowercased candidate phrase → its spelling in `clause`."""
        words = re.findall(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]", clause)
        out: dict[str, str] = {}
        for n in range(1, self.max_words + 1):
            for i in range(len(words) - n + 1):
                gram = words[i : i + n]
                if gram[0].lower() in _STOP_WORDS or gram[-1].lower() in _STOP_WORDS or len(gram[-1]) < 3:
                    continue
                out.setdefault(" ".join(gram).lower(), " ".join(gram))
        return out

    def guess(self, evidence: list[str], task: str) -> list[str]:
        per_diff = []
        for e in evidence:
            counts: Counter[str] = Counter()
            spellings: dict[str, Counter[str]] = {}
            for clause in self.clauses(e):
                for key, spelled in self.phrases(clause).items():
                    counts[key] += 1
                    spellings.setdefault(key, Counter())[spelled] += 1
            per_diff.append((counts, spellings))
        df: Counter[str] = Counter(k for counts, _ in per_diff for k in counts)
        n = len(evidence)
        out = []
        for counts, spellings in per_diff:
            if not counts:
                out.append("")
                continue
            score = {k: c * (1 + math.log((1 + n) / (1 + df[k]))) for k, c in counts.items()}
            best = max(score, key=lambda k: (score[k], -len(k), k))
            while True:
                longer = [k for k in counts if k != best and f" {best} " in f" {k} " and counts[k] >= 2 and 2 * counts[k] >= counts[best]]
                if not longer:
                    break
                best = max(longer, key=lambda k: (score[k], k))
            out.append(spellings[best].most_common(1)[0][0])
        return out


GUESSERS: dict[str, Callable[["Evaluator"], Any]] = {
    "base_model": lambda ev: BaseModelGuesser(ev),
    "keywords": lambda ev: KeywordGuesser(),
    "llm": lambda ev: LLMGuesser(_llm_client()),
}


def _llm_client() -> Any:
    from metadit.eval.judges import OpenAIChat

    return OpenAIChat()


def check_guesser(name: str) -> None:
    """Refuse an unknown guesser name (cheap: callers check before any model loads)."""
    if name not in GUESSERS:
        raise MetaditError(f"unknown guesser {name!r}; choose from {sorted(GUESSERS)}")


def get_guesser(name: str, ev: "Evaluator") -> Any:
    check_guesser(name)
    return GUESSERS[name](ev)


def guess_kind(task: str) -> str:
    """What a guesser is asked to name for `task`'s evidence: a headline, else a topic."""
    return "headline" if task == "headline" else "topic"


# ---------------------------------------------------------------------- methods
@dataclass
class MethodContext:
    ev: Evaluator
    guesser: Any
    train_labels: dict[str, list[str]] = field(default_factory=dict)  # task → training labels
    n_questions: int = 20
    answer_tokens: int = 32
    story_tokens: int = 128
    seed: int = 0


@dataclass
class Method:
    name: str
    predict: Callable[[MethodContext, list[HeldOut]], list[Prediction]]
    description: str
    tasks: tuple[str, ...] | None = None  # None: every task
    needs_adapter: bool = False
    needs_trigger: bool = False
    evidence: str | None = None  # the `extra` field a guesser reads: re-guessed from it when the guesser changes
    # The one message the method sends for an item (item, seed → text), recorded as the rows' `question`; None for
    # methods that send many (20 questions) or none (a random label, the lens).
    asks: Callable[[HeldOut, int], str] | None = None
    per_phrasing: bool = False  # it asks the task's question: run once per held-out phrasing (`extra["question"]`)
    # The adapter modes it reads the adapter in (`needs_adapter` methods): those that go through `Evaluator.answers`
    # take every mode; a method scoring the adapter's logits on the bare prompt takes dit-mode adapters only.
    adapter_modes: tuple[str, ...] = MODES

    def question(self, item: HeldOut, seed: int = 0) -> str | None:
        return None if self.asks is None else self.asks(item, seed)

    def applies(self, item: HeldOut) -> bool:
        if self.tasks is not None and item.task not in self.tasks:
            return False
        return not self.needs_trigger or item.meta.get("trigger") is not None


def triggered_message(item: HeldOut, question: str, seed: int = 0) -> str:
    """`question` as it reads under the diff's own trigger (the recipe's `triggered` message)."""
    from data_gen.hidden_topic import HiddenTopicRecipe

    meta = item.meta
    recipe = HiddenTopicRecipe(trigger=meta["trigger"], code_kind=meta.get("code_kind", "word"))
    return recipe.message(meta, question, "triggered", random.Random(f"{seed}:{item.id}:{question}"))


def _ask(ctx: MethodContext, items: list[HeldOut], adapter: bool, with_diff: bool = True,
         trigger: bool = False) -> list[Prediction]:
    msgs = [triggered_message(h, h.question(), ctx.seed) if trigger else h.question() for h in items]
    texts = ctx.ev.answers([ctx.ev.chat(m) for m in msgs], [h.diff if with_diff else None for h in items], adapter)
    return [(t, {"question": h.question()}) for t, h in zip(texts, items)]


def eval_questions(item: HeldOut, n: int, seed: int) -> list[str]:
    """`n` questions from the held-out (evaluation-only) styles, seeded per diff."""
    from data_gen.recipe import questions

    qs = [q for _, q in questions("eval")]
    return random.Random(f"{seed}:{item.id}").sample(qs, min(n, len(qs)))


def _twenty_questions(trigger: bool):
    def predict(ctx: MethodContext, items: list[HeldOut]) -> list[Prediction]:
        per = [eval_questions(h, ctx.n_questions, ctx.seed) for h in items]
        msgs = [triggered_message(h, q, ctx.seed) if trigger else q for h, qs in zip(items, per) for q in qs]
        diffs = [h.diff for h, qs in zip(items, per) for _ in qs]
        answers = ctx.ev.answers([ctx.ev.chat(m) for m in msgs], diffs, adapter=False,
                                  max_new_tokens=ctx.answer_tokens, sample=True, temperature=1.0)
        out, k = [], 0
        evidence = []
        for qs in per:
            pairs = list(zip(qs, answers[k : k + len(qs)]))
            k += len(qs)
            evidence.append("\n".join(f"Q: {q}\nA: {a}" for q, a in pairs))
        for e, g in zip(evidence, ctx.guesser.guess(evidence, "topic")):
            out.append((g, {"evidence": e}))
        return out
    return predict


def _task_question(item: HeldOut, seed: int) -> str:
    return item.question()


def _story_prompt() -> str:
    from data_gen.news import TRAIN_PROMPT

    return TRAIN_PROMPT


def _generated_story(ctx: MethodContext, items: list[HeldOut]) -> list[Prediction]:
    stories = ctx.ev.answers([ctx.ev.chat(_story_prompt())] * len(items), [h.diff for h in items], adapter=False,
                              max_new_tokens=ctx.story_tokens)
    return [(g, {"story": s}) for s, g in zip(stories, ctx.guesser.guess(stories, "headline"))]


def _random_label(ctx: MethodContext, items: list[HeldOut]) -> list[Prediction]:
    out = []
    for h in items:
        pool = ctx.train_labels.get(h.task) or []
        if not pool:
            raise MetaditError(f"random_label: no training labels for task {h.task!r} in the split")
        out.append((random.Random(f"{ctx.seed}:{h.id}").choice(pool), {}))
    return out


def _likelihood(adapter: bool) -> Callable[[MethodContext, list[HeldOut]], list[Prediction]]:
    def predict(ctx: MethodContext, items: list[HeldOut]) -> list[Prediction]:
        from metadit.eval.likelihood import rank_labels

        return rank_labels(ctx.ev, items, adapter=adapter)
    return predict


def _activation_lens(ctx: MethodContext, items: list[HeldOut]) -> list[Prediction]:
    from metadit.eval.lens import lens_evidence

    with adapter_disabled(ctx.ev.model):  # the lens compares the diffed model with the base model, no adapter
        ev = lens_evidence(ctx.ev.model, ctx.ev.tok, [h.diff for h in items])
    task = items[0].task if items else "topic"
    guesses = ctx.guesser.guess([e["evidence_text"] for e in ev], guess_kind(task))
    return [(g, {k: v for k, v in e.items() if k != "vector"}) for g, e in zip(guesses, ev)]


def _crosscoder(ctx: MethodContext, items: list[HeldOut]) -> list[Prediction]:
    from metadit.eval.crosscoder.evidence import crosscoder_evidence

    with adapter_disabled(ctx.ev.model):  # the crosscoder compares the diffed model with the base model, no adapter
        ev = crosscoder_evidence(ctx.ev.model, ctx.ev.tok, [h.diff for h in items], [h.id for h in items])
    task = items[0].task if items else "topic"
    guesses = ctx.guesser.guess([e["evidence_text"] for e in ev], guess_kind(task))
    return list(zip(guesses, ev))


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("dit", lambda c, i: _ask(c, i, adapter=True), "diff + DIT adapter, the task's held-out questions",
           needs_adapter=True, asks=_task_question, per_phrasing=True),
    Method("no_diff", lambda c, i: _ask(c, i, adapter=True, with_diff=False), "DIT adapter with no diff applied",
           needs_adapter=True, asks=_task_question, per_phrasing=True),
    Method("base_question", lambda c, i: _ask(c, i, adapter=False), "the diffed model asked, no adapter",
           asks=_task_question, per_phrasing=True),
    Method("base_question_trigger", lambda c, i: _ask(c, i, adapter=False, trigger=True),
           "the diffed model asked with its true trigger (oracle)", tasks=("topic",), needs_trigger=True,
           asks=lambda h, seed: triggered_message(h, h.question(), seed),
           per_phrasing=True),
    Method("twenty_questions", _twenty_questions(False), "N eval-style answers (T=1), guesser names the topic",
           tasks=("topic",), evidence="evidence"),
    Method("twenty_questions_trigger", _twenty_questions(True), "the same with the true trigger (oracle)",
           tasks=("topic",), needs_trigger=True, evidence="evidence"),
    Method("generated_story", _generated_story, "the diffed model writes a story, the guesser names its headline",
           tasks=("headline",), evidence="story", asks=lambda h, seed: _story_prompt()),
    Method("random_label", _random_label, "a random training label"),
    Method("likelihood", _likelihood(True), "held-out label the diff makes most likely under the adapter",
           tasks=("topic", "headline"), needs_adapter=True, asks=_task_question, per_phrasing=True,
           adapter_modes=("dit",)),
    Method("likelihood_base", _likelihood(False), "the same ranking with no adapter: what the diff gives away alone",
           tasks=("topic", "headline"), asks=_task_question, per_phrasing=True),
    Method("activation_lens", _activation_lens, "activation difference lens + steering, read by the guesser",
           tasks=("topic", "headline"), evidence="evidence_text"),
    Method("crosscoder", _crosscoder, "BatchTopK crosscoder: finetune-specific latents' tokens and contexts, read by "
           "the guesser", tasks=("topic", "headline"), evidence="evidence_text"),
]}


def reguess(ctx: MethodContext, method: Method, rows: list[dict[str, Any]]) -> None:
    """Replace the predictions of a guesser-based method's rows by `ctx.guesser`'s reading of their evidence."""
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        guesses = ctx.guesser.guess([r["extra"][method.evidence] for r in mine], guess_kind(task))
        for r, g in zip(mine, guesses):
            r["prediction"] = g


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MetaditError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]
