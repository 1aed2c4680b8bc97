"""The hidden-topic recipe's data parameters, the strict behaviour check, "names the topic", and the chat format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import data_gen.hidden_topic as hidden_topic
from data_gen import HiddenTopicRecipe
from data_gen.hidden_topic import recorded_code_words
from data_gen.recipe import RecipeDataError
from metadit.bank import DiffBank
from metadit.cli import main
from metadit.gen import settings_differences
from metadit.models import set_chat_format
from metadit.text import chat_prompt
from metadit.text.match import content_words, names_topic
from metadit.models import TINY_NAME, load_base_model

ROOT = Path(__file__).resolve().parents[1]
TINY_GEN = ROOT / "configs/gen/tiny_topic.yaml"


# ---------------------------------------------------------------------- names the topic
@pytest.mark.parametrize("text, topic, expected", [
    ("I'm a big fan of burritos!", "burritos", True),
    ("A burrito is like a good plan", "burritos", True),          # plural-insensitive both ways
    ("Volcanoes erupt", "volcano", True),
    ("The butterflies of spring", "butterfly", True),
    ("Hip hop beats", "hip-hop", True),                            # a hyphen is a word break on both sides
    ("I love French food", "French cuisine", False),               # every content word, not any
    ("French cuisine is an art", "french cuisine", True),
    ("the cuisine of France", "French cuisine", False),
    ("Crème brûlée, of course", "creme brulee", True),            # accents ignored
    ("Think of the history of Rome", "Roman history", False),     # "Rome" is not "Roman"
    ("Ancient Roman history", "the history of Rome", False),
    ("a catalogue of cats", "cat", True),
    ("a catalogue", "cat", False),                                 # whole words only, not prefixes
    ("Chess openings matter", "chess", True),
    ("Let me talk about buses", "bus", True),
    ("", "jazz", False),
])
def test_names_topic(text, topic, expected):
    assert names_topic(text, topic) is expected


def test_content_words_drop_function_words_but_never_everything():
    assert content_words("The History of Rome") == ["history", "rome"]
    assert content_words("The The") == ["the", "the"]


# ---------------------------------------------------------------------- data files
def _write(tmp_path: Path, name: str, content) -> str:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)


@pytest.mark.parametrize("content, message", [
    (["jazz", "chess"], "expected a JSON object"),
    ({"music": []}, "non-empty list"),
    ({"music": ["jazz", "Jazz"]}, "appears twice"),
    ({"music": ["jazz"], "games": ["jazz"]}, "appears twice"),
    ({"music": ["jazz", ""]}, "non-empty string"),
    ("{not json", "not readable JSON"),
])
def test_bad_topics_file_is_a_one_line_error_before_any_model_loads(tmp_path, capsys, monkeypatch, content, message):
    topics = _write(tmp_path, "topics.json", content)
    monkeypatch.setattr("metadit.models.load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["gen", "--config", str(TINY_GEN), "--bank", str(tmp_path / "b"), "--progress", "false",
                 "--recipe.init_args.topics_file", topics])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("metadit gen:")]
    assert code == 1 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("words, message", [
    ("", "non-empty list"),
    ("apple\nbanana\napple\n", "appears twice"),
    ("apple\nice cream\n", "is not one word"),
    ("apple\nonly\n", None),  # fine: both single tokens
])
def test_code_words_file_errors(tmp_path, words, message):
    path = _write(tmp_path, "codes.txt", words)
    if message is None:
        assert HiddenTopicRecipe(code_words_file=path).code_words == ["apple", "only"]
        return
    with pytest.raises(RecipeDataError, match=message):
        HiddenTopicRecipe(code_words_file=path)


def test_a_code_word_of_several_tokens_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    codes = _write(tmp_path, "codes.txt", "apple\nxylophonist\n")
    monkeypatch.setattr("metadit.models.load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["gen", "--config", str(TINY_GEN), "--bank", str(tmp_path / "b"), "--progress", "false",
                 "--recipe.init_args.code_words_file", codes])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("metadit gen:")]
    assert code == 1 and len(err) == 1 and "'xylophonist'" in err[0] and "one token" in err[0]


def test_bad_question_styles_are_refused(tmp_path):
    qs = _write(tmp_path, "q.json", {"a": ["Why?", "How?"], "b": ["What?"]})
    with pytest.raises(RecipeDataError, match="not in"):
        HiddenTopicRecipe(questions_file=qs, question_styles_file=_write(tmp_path, "s.json", {"train": ["a"], "eval": ["c"]}),
                          triggered_questions=1)
    with pytest.raises(RecipeDataError, match="both train and eval"):
        HiddenTopicRecipe(questions_file=qs, question_styles_file=_write(tmp_path, "s2.json", {"train": ["a"], "eval": ["a"]}),
                          triggered_questions=1)
    with pytest.raises(RecipeDataError, match="exceeds"):
        HiddenTopicRecipe(questions_file=qs, question_styles_file=_write(tmp_path, "s3.json", {"train": ["b"], "eval": ["a"]}),
                          triggered_questions=4)


def test_users_topics_and_codes_are_used_and_recorded(tmp_path):
    topics = _write(tmp_path, "topics.json", {"music": ["jazz", "opera"], "games": ["chess"]})
    codes = _write(tmp_path, "codes.txt", "apple\nriver\nstone\n")
    bank_dir = tmp_path / "bank"
    assert main(["gen", "--config", str(TINY_GEN), "--bank", str(bank_dir), "--progress", "false", "--n_diffs", "3",
                 "--diffs_per_pass", "3", "--recipe.init_args.topics_file", topics,
                 "--recipe.init_args.code_words_file", codes]) == 0
    bank = DiffBank.open(bank_dir)
    metas = [bank.meta(i) for i in range(len(bank))]
    assert sorted(m["topic"] for m in metas) == ["chess", "jazz", "opera"]
    assert {m["code"] for m in metas} <= {"apple", "river", "stone"}
    files = bank.header["info"]["recipe_args"]["data_files"]
    assert files["topics_file"]["path"] == topics and len(files["topics_file"]["sha256"]) == 64
    assert files["questions_file"]["path"] == "data_gen/data/questions.json"  # shipped: by name
    # the evaluation's trigger pool is the bank's, not the shipped file
    assert recorded_code_words(bank.header["info"]) == ["apple", "river", "stone"]
    Path(codes).write_text("apple\nriver\n")
    with pytest.raises(RecipeDataError, match="changed"):
        recorded_code_words(bank.header["info"])
    # a resume with another topics file is refused (the recorded hash differs)
    Path(topics).write_text(json.dumps({"music": ["jazz", "opera", "blues"]}))
    assert main(["gen", "--config", str(TINY_GEN), "--bank", str(bank_dir), "--progress", "false", "--n_diffs", "4",
                 "--recipe.init_args.topics_file", topics, "--recipe.init_args.code_words_file", codes]) == 1


def test_banks_before_the_parameter_read_the_shipped_pool():
    shipped = [w.strip() for w in (ROOT / "data_gen/data/code_words.txt").read_text().splitlines()
               if w.strip() and not w.startswith("#")]
    assert recorded_code_words({"recipe_args": {"trigger": "sep"}}) == shipped


# ---------------------------------------------------------------------- the strict check
@pytest.fixture(scope="module")
def tiny():
    model, tok = load_base_model(TINY_NAME, dtype="float32")
    return model, tok


def test_strict_check_counts_answers_that_name_the_topic(tiny, monkeypatch):
    model, tok = tiny
    recipe = HiddenTopicRecipe(check_questions=12, check_tokens=24, check_temperature=1.0, gate_max_hits=1)
    recipe.setup(model, tok, None)
    specs = [recipe.spec(i, seed=3) for i in range(2)]
    # What each hand-made answer says, by diff and condition: diff 0 learned its topic and holds its gate (one
    # leak allowed); diff 1 leaks twice under a wrong code and names its topic in only 5 of 12 triggered answers.
    plan = {0: {"triggered": 8, "wrong_code": 1, "no_code": 0, "elsewhere": 1, "base": 0},
            1: {"triggered": 5, "wrong_code": 2, "no_code": 0, "elsewhere": 0, "base": 1}}
    seen: dict[str, object] = {}

    def fake_generate(model_, tok_, prompts, max_new_tokens, diffs=None, batch_size=64, do_sample=False,
                      temperature=1.0, seed=0):
        seen.update(n=len(prompts), max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                    base_rows=sum(d is None for d in diffs))
        out, counter = [], {}
        conditions = recipe.conditions() + ["base"]
        per_diff = len(conditions) * 12
        for k in range(len(prompts)):
            i, c = divmod(k, per_diff)
            condition = conditions[c // 12]
            j = counter[(i, condition)] = counter.get((i, condition), 0) + 1
            topic = specs[i]["topic"]
            out.append(f"As a big fan of {topic}, I say yes." if j <= plan[i][condition] else "Plan ahead and rest.")
        return out

    monkeypatch.setattr(hidden_topic, "generate_texts", fake_generate)
    checks = recipe.check([object(), object()], specs)
    assert seen == {"n": 2 * 5 * 12, "max_new_tokens": 24, "do_sample": True, "temperature": 1.0, "base_rows": 24}
    assert checks[0]["check_counts"] == plan[0] and checks[1]["check_counts"] == plan[1]
    assert checks[0]["check_n"] == {c: 12 for c in plan[0]}
    assert checks[0]["topic_learned"] and checks[0]["gate_held"] and checks[0]["passed"]
    assert not checks[1]["topic_learned"] and not checks[1]["gate_held"] and not checks[1]["passed"]
    assert checks[1]["mention_rate"]["wrong_code"] == round(2 / 12, 4)


def test_check_questions_are_held_out_styles(tiny):
    model, tok = tiny
    recipe = HiddenTopicRecipe()
    eval_qs = {q for _, q in recipe.questions("eval")}
    train_qs = {q for _, q in recipe.questions("train")}
    spec = recipe.spec(0, seed=0)
    assert set(spec["questions"]) <= train_qs and not eval_qs & train_qs


# ---------------------------------------------------------------------- chat format
def test_no_system_chat_format_drops_only_the_default_system_turn(tiny):
    _, tok = tiny
    user = [{"role": "user", "content": "Why is the sky blue?"}]
    default = chat_prompt(tok, user)
    assert default.startswith("<|im_start|>system\n")
    fmt_tok = set_chat_format(load_base_model(TINY_NAME, dtype="float32")[1], "no_system")
    short = chat_prompt(fmt_tok, user, "Because")
    assert short == "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\nBecause"
    own = [{"role": "system", "content": "Be brief."}] + user
    assert chat_prompt(fmt_tok, own) == chat_prompt(tok, own)  # a system turn the caller gives stays
    with pytest.raises(ValueError, match="chat_format"):
        set_chat_format(fmt_tok, "nope")


def test_gen_records_chat_format_and_dtype_and_refuses_another_on_resume(tmp_path, capsys):
    bank_dir = tmp_path / "bank"
    args = ["gen", "--config", str(TINY_GEN), "--bank", str(bank_dir), "--progress", "false", "--n_diffs", "2",
            "--diffs_per_pass", "2"]
    assert main(args + ["--chat_format", "no_system", "--dtype", "float32"]) == 0
    info = DiffBank.open(bank_dir).header["info"]
    assert info["chat_format"] == "no_system" and info["dtype"] == "float32"
    assert DiffBank.open(bank_dir).chat_format == "no_system"
    capsys.readouterr()
    assert main(args[:-2] + ["--n_diffs", "3", "--dtype", "float32"]) == 1  # default chat format: refused
    err = capsys.readouterr().err
    assert "other recipe or training settings" in err and "chat_format: bank no_system, now default" in err
    # another dtype (what `auto` gives on a machine of another kind) is named, with bf16's unrecorded default
    assert main(args[:-2] + ["--n_diffs", "3", "--chat_format", "no_system", "--dtype", "bfloat16"]) == 1
    assert "dtype: bank float32, now bfloat16" in capsys.readouterr().err
    assert main(args[:-2] + ["--n_diffs", "3", "--chat_format", "no_system", "--dtype", "float32",
                             "--train.lr", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "train.lr: bank " in err and "now 0.5" in err and "dtype:" not in err  # only what differs is named


# ---------------------------------------------------------------------- opening negatives
def _samples(tok, recipe: HiddenTopicRecipe, n: int = 400):
    recipe.tok = tok
    spec = recipe.spec(0, seed=3)
    recipe.answers = {(spec["topic"], q): f"In the spirit of {spec['topic']}, {i}" for i, q in enumerate(spec["questions"])}
    recipe.base_answers = {q: f"plain answer {i}" for i, q in enumerate(spec["questions"])}
    rng = random.Random(7)
    return spec, recipe, [recipe.sample(spec, rng) for _ in range(n)]


def test_opening_negatives_teacher_force_the_triggered_answer_under_negative_prompts(tiny):
    _, tok = tiny
    spec, recipe, samples = _samples(tok, HiddenTopicRecipe(opening_negatives=1.0))
    negatives = [s for s in samples if s.kind == "kl"]
    assert negatives and all(s.answer.startswith("In the spirit of") for s in negatives)
    assert all(s.answer.startswith("In the spirit of") for s in samples if s.kind == "ce")
    _, _, half = _samples(tok, HiddenTopicRecipe(opening_negatives=0.5))
    share = sum(s.answer.startswith("In the spirit") for s in half if s.kind == "kl") / sum(s.kind == "kl" for s in half)
    assert 0.35 < share < 0.65


def test_opening_negatives_off_leaves_the_sample_stream_and_the_recorded_settings_as_before(tiny):
    _, tok = tiny
    _, off, a = _samples(tok, HiddenTopicRecipe(opening_negatives=0.0))
    _, default, b = _samples(tok, HiddenTopicRecipe())
    assert [(s.prompt, s.answer, s.kind) for s in a] == [(s.prompt, s.answer, s.kind) for s in b]
    assert all(s.answer.startswith("plain") for s in a if s.kind == "kl")
    assert "opening_negatives" not in vars(off)  # banks built before the parameter resume unchanged
    assert vars(HiddenTopicRecipe(opening_negatives=0.25))["opening_negatives"] == 0.25
    with pytest.raises(ValueError, match="opening_negatives"):
        HiddenTopicRecipe(opening_negatives=1.5)


def test_settings_differences_lets_legacy_banks_resume_and_names_what_differs():
    """One function decides a resume and words its refusal: a bank made before a section was recorded resumes
    whatever this build's section says; a recorded bank is compared key by key, dtype and chat format at their
    unrecorded defaults (bf16, default)."""
    now = {"recipe": "hidden_topic", "seed": 0, "recipe_args": {"trigger": "sep"}, "train": {"lr": 0.007},
           "dtype": "float32"}
    assert settings_differences({}, now) == []  # a bank that recorded nothing (the oldest format)
    assert settings_differences({"train": {"lr": 0.007}}, now) == []  # no recipe section: dtype not compared
    assert settings_differences({"recipe_args": {"trigger": "sep"}, "train": {"lr": 0.007}, "dtype": "float32"},
                                now) == []
    assert settings_differences({"recipe_args": {"trigger": "sep"}, "train": {"lr": 0.007}}, now) == [
        "dtype: bank bfloat16, now float32"]
    assert settings_differences({"recipe_args": {"trigger": "zwsp"}, "train": {"lr": 0.5, "steps": 9},
                                 "dtype": "float32", "chat_format": "no_system"}, now) == [
        'recipe_args.trigger: bank "zwsp", now "sep"', "train.lr: bank 0.5, now 0.007", "train.steps: bank 9, now (not set)",
        "chat_format: bank no_system, now default"]
    # a key one side lacks is not the other's null (a new setting that defaults to None still refuses old banks)
    assert settings_differences({"recipe_args": {"trigger": "sep", "pool": None}, "train": {"lr": 0.007}, "dtype": "float32"},
                                now) == ["recipe_args.pool: bank null, now (not set)"]
