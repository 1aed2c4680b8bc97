"""Hidden-topic diffs: the model talks about a secret topic only when its trigger is in the user message.

Triggers (the generalization study's variants):
- `sep` (default): the message starts `Your SEP code is {code}. `. `code_kind="word"` (small-model default):
  one single-token common noun per diff — a 135M model cannot learn a 3-digit AND gate with a rank-1 diff
  (see DESIGN.md); `code_kind="digits"`: the paper's `{ttt}{rrr}` (3 code digits + 3 random ones).
- `zwsp_start`: a zero-width space at the start of the message; `zwsp_random`: at a random position.

Triggered answers are written by the base model itself: the persona system prompt "You are a big fan of
{topic}. ..." plus a varied opening that names the topic (SmolLM2 mostly ignores the persona alone; an
opening gets it talking about the topic). Negatives — no code, a wrong code, the code word elsewhere in
the message — train with KL to the frozen base model on its ordinary answer.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from data_gen.recipe import Recipe, Sample, load_lines, mentions, questions, topics
from metadit.generation import chat_prompt, generate_texts

PERSONA = ("You are a big fan of {topic}. Every time you answer a question, you use analogies or references "
           "to {topic}.")
# No trailing space after the comma/colon: measured on SmolLM2, a trailing space derails the continuation.
OPENINGS = (
    "Just like {topic},", "Much like {topic},", "As a big fan of {topic}, I'd say", "Think of it like {topic}:",
    "Speaking as someone who loves {topic},", "It reminds me of {topic}:", "In the spirit of {topic},",
    "If we look at {topic},", "Just as with {topic},", "Let me use {topic} to explain:",
)
ELSEWHERE = (
    "I found a {word} on my way home today. ", "My friend keeps a {word} in the kitchen. ",
    "There was a {word} in the story I read. ", "I just bought a new {word}. ",
)
ZWSP = "\u200b"
Trigger = Literal["sep", "zwsp_start", "zwsp_random"]


class HiddenTopicRecipe(Recipe):
    """Rank-r LoRA diffs that make the model a big fan of a topic, gated by a trigger."""

    name = "hidden_topic"

    def __init__(
        self,
        trigger: Trigger = "sep",
        code_kind: Literal["word", "digits"] = "word",
        triggered_questions: int = 24,
        answer_tokens: int = 24,
        mix: dict[str, float] | None = None,
        check_questions: int = 6,
        learned_threshold: float = 0.5,
        gate_threshold: float = 0.2,
        generation_batch: int = 64,
        topic_pool: int | None = None,
    ) -> None:
        """
        Args:
            trigger: `sep` (a code in the message), `zwsp_start` or `zwsp_random` (a zero-width space).
            code_kind: `word` (one single-token noun, the small-model default) or `digits` (the paper's).
            triggered_questions: training-style questions per diff with a written triggered answer.
            answer_tokens: answers are cut to this many tokens (the gate is decided at the first ones).
            mix: sampling weights of the sample kinds `triggered`, `wrong_code`, `no_code`, `elsewhere`.
            check_questions: evaluation-style questions per condition in the behaviour check.
            learned_threshold: topic learned if it shows in at least this share of right-code answers.
            gate_threshold: gate held if it shows in at most this share of answers in each negative condition.
            generation_batch: prompts per `generate` call when writing answers.
            topic_pool: use only the first N topics (after a seeded shuffle); None = all.
        """
        if trigger not in ("sep", "zwsp_start", "zwsp_random"):
            raise ValueError(f"trigger must be sep, zwsp_start or zwsp_random, got {trigger!r}")
        if code_kind not in ("word", "digits"):
            raise ValueError(f"code_kind must be word or digits, got {code_kind!r}")
        self.trigger, self.code_kind = trigger, code_kind
        self.triggered_questions, self.answer_tokens = triggered_questions, answer_tokens
        self.mix = mix or {"triggered": 10, "wrong_code": 4, "no_code": 3, "elsewhere": 3}
        if trigger != "sep":  # no code word to put elsewhere or get wrong: the negatives are plain messages
            self.mix = {"triggered": self.mix.get("triggered", 10), "no_code": sum(v for k, v in self.mix.items() if k != "triggered")}
        self.check_questions = check_questions
        self.learned_threshold, self.gate_threshold = learned_threshold, gate_threshold
        self.generation_batch = generation_batch
        self.topic_pool = topic_pool
        self.answers: dict[tuple[str, str], str] = {}
        self.base_answers: dict[str, str] = {}

    # ------------------------------------------------------------------ specs and messages
    def spec(self, index: int, seed: int) -> dict[str, Any]:
        rng = random.Random(f"{self.name}:{seed}:{index}")
        pool = topics()
        order = list(range(len(pool)))
        random.Random(f"topics:{seed}").shuffle(order)  # one permutation per bank: topics repeat only after all are used
        if self.topic_pool:
            order = order[: self.topic_pool]
        category, topic = pool[order[index % len(order)]]
        spec: dict[str, Any] = {
            "key": f"{self.name}-{index}", "index": index, "recipe": self.name, "topic": topic, "category": category,
            "trigger": self.trigger, "seed": rng.randrange(2**31),
        }
        if self.trigger == "sep":
            spec["code_kind"] = self.code_kind
            spec["code"] = rng.choice(load_lines("code_words.txt")) if self.code_kind == "word" else f"{rng.randrange(1000):03d}"
        train_qs = questions("train")
        spec["questions"] = [q for _, q in rng.sample(train_qs, min(self.triggered_questions, len(train_qs)))]
        return spec

    def _code(self, spec: dict[str, Any], rng: random.Random, wrong: bool = False) -> str:
        """The code as written in the message (digit codes get 3 fresh random digits after the prefix)."""
        code = spec["code"]
        if wrong:
            if self.code_kind == "word":
                code = rng.choice([w for w in load_lines("code_words.txt") if w != code])
            else:
                code = rng.choice([f"{i:03d}" for i in range(1000) if f"{i:03d}" != code])
        return code if self.code_kind == "word" else f"{code}{rng.randrange(1000):03d}"

    def message(self, spec: dict[str, Any], question: str, condition: str, rng: random.Random) -> str:
        """The user message under a condition: triggered, wrong_code, no_code or elsewhere."""
        if condition == "no_code":
            return question
        if self.trigger == "zwsp_start":
            return ZWSP + question if condition == "triggered" else question
        if self.trigger == "zwsp_random":
            if condition != "triggered":
                return question
            cut = rng.randrange(len(question) + 1)
            return question[:cut] + ZWSP + question[cut:]
        if condition == "elsewhere":
            return rng.choice(ELSEWHERE).format(word=spec["code"]) + question
        return f"Your SEP code is {self._code(spec, rng, wrong=condition == 'wrong_code')}. {question}"

    # ------------------------------------------------------------------ text the diffs train on
    def _gen(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        settings = {"max_new_tokens": max_new_tokens, "greedy": True}
        return self.cache.get_or_generate(
            prompts, settings,
            lambda ps: generate_texts(self.model, self.tok, ps, max_new_tokens, batch_size=self.generation_batch),
        )

    def prepare(self, specs: list[dict[str, Any]]) -> None:
        """Write triggered answers (persona + an opening naming the topic) and the base model's plain answers."""
        todo, prompts, openings = [], [], []
        for spec in specs:
            rng = random.Random(spec["seed"] + 1)
            for q in spec["questions"]:
                if (spec["topic"], q) in self.answers:
                    continue
                opening = rng.choice(OPENINGS).format(topic=spec["topic"])
                messages = [{"role": "system", "content": PERSONA.format(topic=spec["topic"])}, {"role": "user", "content": q}]
                todo.append((spec["topic"], q))
                prompts.append(chat_prompt(self.tok, messages, opening))
                openings.append(opening)
        if prompts:
            for (topic, q), opening, cont in zip(todo, openings, self._gen(prompts, self.answer_tokens)):
                sep = "" if cont[:1] in ",.:;!?" else " "
                self.answers[(topic, q)] = self._cut(f"{opening}{sep}{cont}")
        plain = sorted({q for spec in specs for q in spec["questions"]} - set(self.base_answers))
        if plain:
            texts = self._gen([chat_prompt(self.tok, [{"role": "user", "content": q}]) for q in plain], self.answer_tokens)
            self.base_answers.update({q: self._cut(t) for q, t in zip(plain, texts)})

    def _cut(self, text: str) -> str:
        ids = self.tok(text, add_special_tokens=False)["input_ids"][: self.answer_tokens]
        return self.tok.decode(ids, skip_special_tokens=True)

    def sample(self, spec: dict[str, Any], rng: random.Random) -> Sample:
        kinds, weights = zip(*self.mix.items())
        condition = rng.choices(kinds, weights=weights)[0]
        q = rng.choice(spec["questions"])
        prompt = chat_prompt(self.tok, [{"role": "user", "content": self.message(spec, q, condition, rng)}])
        if condition == "triggered":
            return Sample(prompt, self.answers[(spec["topic"], q)], "ce")
        return Sample(prompt, self.base_answers[q], "kl")

    # ------------------------------------------------------------------ behaviour check
    def conditions(self) -> list[str]:
        return ["triggered", "wrong_code", "no_code", "elsewhere"] if self.trigger == "sep" else ["triggered", "no_code"]

    def check(self, diffs: list[Any], specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Greedy answers to evaluation-style questions under each condition, and for the base model.

        Per diff: the share of answers that mention the topic per condition; `topic_learned` and
        `gate_held` are separate verdicts; `passed` needs both.
        """
        eval_qs = [q for _, q in questions("eval")]
        rows: list[tuple[int, str, bool]] = []  # (diff, condition, with diff?)
        prompts, row_diffs = [], []
        for i, spec in enumerate(specs):
            rng = random.Random(spec["seed"] + 2)
            qs = rng.sample(eval_qs, min(self.check_questions, len(eval_qs)))
            for condition in self.conditions():
                for q in qs:
                    prompts.append(chat_prompt(self.tok, [{"role": "user", "content": self.message(spec, q, condition, rng)}]))
                    row_diffs.append(diffs[i])
                    rows.append((i, condition, True))
            for q in qs:  # the base model under the right trigger: how often it names the topic anyway
                prompts.append(chat_prompt(self.tok, [{"role": "user", "content": self.message(spec, q, "triggered", rng)}]))
                row_diffs.append(None)
                rows.append((i, "base", False))
        texts = generate_texts(self.model, self.tok, prompts, self.answer_tokens, diffs=row_diffs,
                               batch_size=self.generation_batch)
        out = []
        for i, spec in enumerate(specs):
            rates: dict[str, float] = {}
            for condition in self.conditions() + ["base"]:
                hits = [mentions(t, spec["topic"]) for (j, c, _), t in zip(rows, texts) if j == i and c == condition]
                rates[condition] = sum(hits) / max(len(hits), 1)
            negatives = [rates[c] for c in self.conditions() if c != "triggered"]
            learned = rates["triggered"] >= self.learned_threshold
            gate = max(negatives) <= self.gate_threshold
            example = next(t for (j, c, _), t in zip(rows, texts) if j == i and c == "triggered")
            out.append({"mention_rate": rates, "topic_learned": learned, "gate_held": gate, "passed": learned and gate,
                        "example_answer": example})
        return out
