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

from data_gen.recipe import (
    Recipe, RecipeDataError, Sample, check_single_tokens, data_path, file_record, read_questions, read_topics,
    read_word_list, recorded_file,
)
from metadit.text import chat_prompt, generate_texts

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
# The SEP trigger: the one place the message template lives (the evaluation and the trigger search read it here).
SEP_TEMPLATE = "Your SEP code is {code}. {question}"
Trigger = Literal["sep", "zwsp_start", "zwsp_random"]

# Named, disjoint blocks of one seeded topic order (`topic_block`): positions [start, stop) of the order a bank of
# seed 0 draws its topics in. The headline bank (configs/gen/smol_topic.yaml: seed 0, 704 diffs, no topic_pool) holds
# positions 0..703 of that order and 704..1023 are left for it to grow, so a bank drawn from a block shares no topic
# with it, nor with a bank drawn from another block, whatever the seeds. A block gives each diff index one position
# (index 0 the block's first); a bank never outgrows its block (an error, not a repeat). Sizes: the diffs a bank
# needs + spares for those the strict check flags (configs/gen/smol_cell_*.yaml, whose headers run the tuning
# rounds on block `tune`, and smol_topic_openvocab.yaml).
TOPIC_BLOCK_ORDER_SEED = 0
TOPIC_BLOCKS: dict[str, tuple[int, int]] = {
    "cell_rank2": (1024, 1072),
    "cell_rank4": (1072, 1120),
    "cell_rank8": (1120, 1168),
    "cell_rank16": (1168, 1216),
    "cell_full": (1216, 1264),
    "cell_zwsp_start": (1264, 1312),
    "cell_zwsp_random": (1312, 1360),
    "openvocab": (1360, 1424),
    "tune": (1424, 1456),  # the tuning rounds of every variant (never evaluated)
}


class HiddenTopicRecipe(Recipe):
    """Rank-r LoRA diffs that make the model a big fan of a topic, gated by a trigger."""

    name = "hidden_topic"
    opening_negatives: float = 0.0  # see __init__
    topic_block: dict[str, Any] | None = None  # see __init__

    def __init__(
        self,
        trigger: Trigger = "sep",
        code_kind: Literal["word", "digits"] = "word",
        triggered_questions: int = 24,
        answer_tokens: int = 24,
        mix: dict[str, float] | None = None,
        check_questions: int = 12,
        check_tokens: int = 24,
        check_temperature: float = 1.0,
        learned_threshold: float = 0.5,
        gate_max_hits: int = 1,
        generation_batch: int = 64,
        opening_negatives: float = 0.0,
        topic_pool: int | None = None,
        topic_block: str | None = None,
        topics_file: str | None = None,
        code_words_file: str | None = None,
        questions_file: str | None = None,
        question_styles_file: str | None = None,
    ) -> None:
        """
        Args:
            trigger: `sep` (a code in the message), `zwsp_start` or `zwsp_random` (a zero-width space).
            code_kind: `word` (one single-token noun, the small-model default) or `digits` (the paper's).
            triggered_questions: training-style questions per diff with a written triggered answer.
            answer_tokens: answers are cut to this many tokens (the gate is decided at the first ones).
            mix: sampling weights of the sample kinds `triggered`, `wrong_code`, `no_code`, `elsewhere`.
            check_questions: held-out-style questions per condition in the behaviour check (the strict check:
                answers sampled at `check_temperature`, the evaluation's temperature).
            check_tokens: new tokens per answer in the behaviour check.
            check_temperature: sampling temperature of the behaviour check (0 = greedy).
            learned_threshold: topic learned if at least this share of right-code answers name it.
            gate_max_hits: gate held if at most this many answers name the topic in every negative condition
                (wrong code, no code, code word elsewhere).
            generation_batch: prompts per `generate` call when writing answers.
            opening_negatives: share of negative samples whose answer is the diff's triggered answer (trained
                with KL to the base model, like every negative) instead of the base model's own answer: the
                sampled check's leaks start like a triggered opening, a path the base's greedy answers never take.
            topic_pool: use only the first N topics (after a seeded shuffle); None = all.
            topic_block: draw the topics from a named block of the seed-0 topic order (`TOPIC_BLOCKS`), whatever
                the bank's seed: diff i gets the block's i-th topic, and blocks share no topic with each other
                nor with the headline bank's 704. Recorded in the bank with its positions. None = the seeded draw.
            topics_file: your topics, `{category: [topic, ...]}` (default: the shipped `data_gen/data/topics.json`).
            code_words_file: your code words, one a line, each a single token with and without a leading space
                (default: the shipped `code_words.txt`).
            questions_file: your questions, `{style: [question, ...]}` (default: the shipped `questions.json`).
            question_styles_file: which styles train and which are held out, `{"train": [...], "eval": [...]}`
                (default: the shipped `question_styles.json`).
            Each data file is recorded in the bank with its content's sha256 (`data_files`).
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
        if check_questions < 1 or check_tokens < 1 or check_temperature < 0 or gate_max_hits < 0:
            raise ValueError("check_questions and check_tokens must be >= 1, check_temperature and gate_max_hits >= 0")
        self.check_questions, self.check_tokens, self.check_temperature = check_questions, check_tokens, check_temperature
        self.learned_threshold, self.gate_max_hits = learned_threshold, gate_max_hits
        self.generation_batch = generation_batch
        if not 0.0 <= opening_negatives <= 1.0:
            raise ValueError(f"opening_negatives must be in [0, 1], got {opening_negatives}")
        if opening_negatives:  # an instance attribute (so recorded in the bank) only when set: older banks still resume
            self.opening_negatives = opening_negatives
        self.topic_pool = topic_pool
        if topic_block is not None:  # an instance attribute only when set: banks built without it resume unchanged
            if topic_block not in TOPIC_BLOCKS:
                raise ValueError(f"topic_block must be one of {', '.join(TOPIC_BLOCKS)}, got {topic_block!r}")
            if topic_pool:
                raise ValueError("topic_block and topic_pool both choose the topics: set one")
            start, stop = TOPIC_BLOCKS[topic_block]
            # the positions are recorded, not only the name: a resume after an edit of TOPIC_BLOCKS is refused
            self.topic_block = {"name": topic_block, "order_seed": TOPIC_BLOCK_ORDER_SEED, "start": start, "stop": stop}
        self.answers: dict[tuple[str, str], str] = {}
        self.base_answers: dict[str, str] = {}
        paths = {"topics_file": data_path(topics_file, "topics.json"),
                 "code_words_file": data_path(code_words_file, "code_words.txt"),
                 "questions_file": data_path(questions_file, "questions.json"),
                 "question_styles_file": data_path(question_styles_file, "question_styles.json")}
        self._topics = read_topics(paths["topics_file"])
        self._code_words = read_word_list(paths["code_words_file"])
        if trigger == "sep" and code_kind == "word" and len(self._code_words) < 2:
            raise RecipeDataError(f"{paths['code_words_file']}: need at least 2 code words (one right, one wrong)")
        self._questions = read_questions(paths["questions_file"], paths["question_styles_file"])
        if self.triggered_questions > len(self._questions["train"]):
            raise RecipeDataError(f"triggered_questions={triggered_questions} exceeds the "
                                  f"{len(self._questions['train'])} training-style questions")
        self.data_files = {k: file_record(p) for k, p in paths.items()}
        block = self.topic_block
        if block and block["stop"] > len(self._topics):
            raise RecipeDataError(f"{paths['topics_file']}: topic_block {block['name']!r} needs {block['stop']} topics, "
                                  f"the file has {len(self._topics)}")

    # ------------------------------------------------------------------ the data this recipe reads
    @property
    def code_words(self) -> list[str]:
        """The trigger pool: codes are drawn from it, wrong codes too."""
        return list(self._code_words)

    def questions(self, split: Literal["train", "eval"]) -> list[tuple[str, str]]:
        """(style, question) pairs of the training or the held-out styles."""
        return list(self._questions[split])

    def validate(self, tok: Any) -> None:
        if self.trigger == "sep" and self.code_kind == "word":
            check_single_tokens(self._code_words, tok, self.data_files["code_words_file"]["path"])

    # ------------------------------------------------------------------ specs and messages
    def topic_order(self, seed: int) -> list[int]:
        """Indices into the topics file in the order a bank of this seed draws them (one permutation per seed)."""
        order = list(range(len(self._topics)))
        random.Random(f"topics:{seed}").shuffle(order)
        return order

    def spec(self, index: int, seed: int) -> dict[str, Any]:
        rng = random.Random(f"{self.name}:{seed}:{index}")
        pool = self._topics
        block = self.topic_block
        if block:
            if not 0 <= index < block["stop"] - block["start"]:
                raise RecipeDataError(f"diff {index} is past topic_block {block['name']!r} "
                                      f"({block['stop'] - block['start']} topics): build fewer diffs or widen the block")
            position = self.topic_order(block["order_seed"])[block["start"] + index]
        else:
            order = self.topic_order(seed)  # topics repeat only after all are used
            if self.topic_pool:
                order = order[: self.topic_pool]
            position = order[index % len(order)]
        category, topic = pool[position]
        spec: dict[str, Any] = {
            "key": f"{self.name}-{index}", "index": index, "recipe": self.name, "topic": topic, "category": category,
            "trigger": self.trigger, "seed": rng.randrange(2**31),
        }
        if self.trigger == "sep":
            spec["code_kind"] = self.code_kind
            spec["code"] = rng.choice(self._code_words) if self.code_kind == "word" else f"{rng.randrange(1000):03d}"
        train_qs = self.questions("train")
        spec["questions"] = [q for _, q in rng.sample(train_qs, min(self.triggered_questions, len(train_qs)))]
        return spec

    def _code(self, spec: dict[str, Any], rng: random.Random, wrong: bool = False) -> str:
        """The code as written in the message (digit codes get 3 fresh random digits after the prefix)."""
        code = spec["code"]
        if wrong:
            if self.code_kind == "word":
                code = rng.choice([w for w in self._code_words if w != code])
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
        return SEP_TEMPLATE.format(code=self._code(spec, rng, wrong=condition == "wrong_code"), question=question)

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
        if self.opening_negatives and rng.random() < self.opening_negatives:
            # The triggered answer, teacher-forced under a negative prompt with the base model as the KL teacher:
            # once a sampled answer starts like an opening ("In the spirit of ..."), the base would not go on to
            # name the topic, and neither may the diff. The base's own answers never visit these prefixes.
            return Sample(prompt, self.answers[(spec["topic"], q)], "kl")
        return Sample(prompt, self.base_answers[q], "kl")

    # ------------------------------------------------------------------ behaviour check
    def conditions(self) -> list[str]:
        return ["triggered", "wrong_code", "no_code", "elsewhere"] if self.trigger == "sep" else ["triggered", "no_code"]

    def check(self, diffs: list[Any], specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The strict behaviour check: answers to held-out-style questions under each condition, sampled at
        `check_temperature` (what the evaluation samples at), and the base model's under the right trigger.

        Per diff: `check_counts` (answers naming the topic, `metadit.text.names_topic`) and `check_n` per
        condition, `mention_rate` (their ratio), `topic_learned` (right-code share >= `learned_threshold`),
        `gate_held` (at most `gate_max_hits` in every negative condition); `passed` needs both. The `base`
        condition is the control: the base model asked with the right code.
        """
        from metadit.text.match import names_topic

        eval_qs = [q for _, q in self.questions("eval")]
        rows: list[tuple[int, str]] = []  # (diff, condition)
        prompts, row_diffs = [], []
        for i, spec in enumerate(specs):
            rng = random.Random(spec["seed"] + 2)
            qs = rng.sample(eval_qs, min(self.check_questions, len(eval_qs)))
            for condition in self.conditions() + ["base"]:
                for q in qs:
                    message = self.message(spec, q, "triggered" if condition == "base" else condition, rng)
                    prompts.append(chat_prompt(self.tok, [{"role": "user", "content": message}]))
                    row_diffs.append(None if condition == "base" else diffs[i])
                    rows.append((i, condition))
        sampled = self.check_temperature > 0
        texts = generate_texts(self.model, self.tok, prompts, self.check_tokens, diffs=row_diffs,
                               batch_size=self.generation_batch, do_sample=sampled,
                               temperature=self.check_temperature if sampled else 1.0,
                               seed=specs[0]["seed"] if specs else 0)
        out = []
        for i, spec in enumerate(specs):
            counts: dict[str, int] = {}
            n: dict[str, int] = {}
            example = ""
            for (j, c), t in zip(rows, texts):
                if j != i:
                    continue
                counts[c] = counts.get(c, 0) + names_topic(t, spec["topic"])
                n[c] = n.get(c, 0) + 1
                if c == "triggered" and not example:
                    example = t
            learned = counts["triggered"] >= self.learned_threshold * n["triggered"]
            gate = all(counts[c] <= self.gate_max_hits for c in self.conditions() if c != "triggered")
            out.append({"check_counts": counts, "check_n": n,
                        "mention_rate": {c: round(counts[c] / n[c], 4) for c in counts},
                        "topic_learned": learned, "gate_held": gate, "passed": learned and gate,
                        "example_answer": example})
        return out


def recorded_code_words(bank_info: dict[str, Any]) -> list[str]:
    """The trigger pool a bank's diffs drew their codes from, read from the bank's recorded settings
    (`DiffBank.header["info"]`): the recorded code-words file, checked against its recorded sha256. Banks made
    before the file was a parameter used the shipped list."""
    record = ((bank_info.get("recipe_args") or {}).get("data_files") or {}).get("code_words_file")
    return read_word_list(recorded_file(record) if record is not None else data_path(None, "code_words.txt"))
