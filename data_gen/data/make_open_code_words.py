"""Write `code_words_open.txt`: code words from outside the trigger pool, for open-vocabulary trigger inversion.

The closed-set trigger search ranks exactly the words of `code_words.txt` (the pool the codes were drawn from, and
the diffs were trained to stay inert under the others as wrong codes). A bank whose codes come from this list
(`code_words_file: data_gen/data/code_words_open.txt`, configs/gen/smol_topic_openvocab.yaml) asks whether a
search that is not told the pool finds a trigger nobody listed. The rule, applied to SmolLM2's tokenizer (the
tiny random model's, the same vocabulary):

1. a word token: a vocabulary entry that decodes to a space and >= 4 lowercase ASCII letters, and the bare
   word is one token too (the recipe's rule, `check_single_tokens`);
2. a countable noun, singular: `lemminflect` knows the word only as a NOUN, with itself as the lemma (no verb,
   adjective or adverb reading: this drops fragments such as "cont" and function words such as "also"), and its
   plural is another word that is one token after a space too (a noun common enough to have both forms in
   the vocabulary; this drops mass nouns and the dictionary's odd entries such as "this" or "responsible");
3. none of its plural-insensitive forms (`metadit.text.match.forms`) meets a word of `code_words.txt`, of any
   topic in `topics.json`, of any question in `questions.json`, of the recipe's message templates and
   openings, or of the chat template with its default system prompt: a negative message never holds the code
   by accident, and a code never names a topic;
4. not in `AVOID`: the kinds of words topics.json leaves out (illness and death, crime, politics, religion,
   alcohol and tobacco) and words for people (the negatives' sentences "I just bought a new {word}." are about
   things), and "other", a determiner the dictionary files as a noun; written after reading the survivors;
5. 64 of the survivors (294) drawn with a fixed seed, written in alphabetical order.

Deterministic (needs the project venv with the test extra, which pins lemminflect):

    python data_gen/data/make_open_code_words.py           # from the repository root: rewrite the file
    python data_gen/data/make_open_code_words.py --check   # exit 1 if the file differs from the rule's output
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "code_words_open.txt"
MIN_LETTERS, N_WORDS, SEED = 4, 64, "code-words-open"
AVOID = frozenset(
    "cyst infection wart disease cancer surgery therapy death "  # illness and death
    "crime threat "  # crime
    "election government president faction "  # politics
    "bishop sect rite faith "  # religion
    "wine cigarette "  # alcohol and tobacco
    "woman girl wife child marriage "  # people and family
    "other".split()  # a determiner
)
HEADER = ("# Out-of-pool code words (open-vocabulary trigger inversion): written by make_open_code_words.py, "
          "which says the rule.\n# Disjoint from code_words.txt; each one token with and without a leading "
          "space for SmolLM2.\n")


def _forms_of_text(text: str) -> set[str]:
    from metadit.text.match import forms, words

    return {f for w in words(text) for f in forms(w)}


def excluded_forms(tok: Any) -> set[str]:
    """Every form of every word a code must not share (rule 3)."""
    from data_gen.hidden_topic import ELSEWHERE, OPENINGS, PERSONA, SEP_TEMPLATE
    from data_gen.recipe import read_word_list
    from metadit.text import chat_prompt

    texts = list(read_word_list(HERE / "code_words.txt"))
    texts += [t for ts in json.loads((HERE / "topics.json").read_text()).values() for t in ts]
    texts += [q for qs in json.loads((HERE / "questions.json").read_text()).values() for q in qs]
    texts += [PERSONA, SEP_TEMPLATE, *OPENINGS, *ELSEWHERE]
    texts.append(chat_prompt(tok, [{"role": "user", "content": ""}]))  # the default system prompt too
    out: set[str] = set()
    for t in texts:
        out |= _forms_of_text(t.replace("{", " ").replace("}", " "))
    return out


def word_tokens(tok: Any) -> list[tuple[int, str]]:
    """(token id, word) of every word token that is one token with and without its leading space (rule 1)."""
    pattern = re.compile(rf" [a-z]{{{MIN_LETTERS},}}")
    out = []
    for i in range(len(tok)):
        text = tok.decode([i])
        if pattern.fullmatch(text) and len(tok(text[1:], add_special_tokens=False)["input_ids"]) == 1:
            out.append((i, text[1:]))
    return sorted(out)


def open_code_words(tok: Any) -> list[str]:
    """The list the rule gives for this tokenizer (rules 1-5)."""
    import lemminflect

    from metadit.text.match import forms

    def countable_noun(w: str) -> bool:
        if lemminflect.getAllLemmas(w) != {"NOUN": (w,)}:
            return False
        plurals = [p for p in lemminflect.getAllInflections(w, upos="NOUN").get("NNS", ()) if p != w]
        return bool(plurals) and len(tok(" " + plurals[0], add_special_tokens=False)["input_ids"]) == 1

    banned = excluded_forms(tok)
    nouns = [w for _, w in word_tokens(tok) if w not in AVOID and not forms(w) & banned and countable_noun(w)]
    if len(nouns) < N_WORDS:
        raise SystemExit(f"only {len(nouns)} words pass the rule; need {N_WORDS}")
    return sorted(random.Random(SEED).sample(nouns, N_WORDS))


def main() -> None:
    from metadit.models import TINY_NAME, load_base_model

    _, tok = load_base_model(TINY_NAME, dtype="float32")
    text = HEADER + "".join(f"{w}\n" for w in open_code_words(tok))
    if "--check" in sys.argv:
        if OUT.read_text() != text:
            raise SystemExit(f"{OUT.name} differs from make_open_code_words.py's output: run it without --check")
        print(f"{OUT.name} matches the rule")
        return
    OUT.write_text(text)
    print(f"wrote {N_WORDS} words to {OUT.name}")


if __name__ == "__main__":
    main()
