"""Splits a reviewer accepts: news held out by event template, validation phrasings apart from the test's."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from data_gen.news import NewsRecipe, headline_template
from metadit.bank import DiffBank
from metadit.dit.data import DiffQADataModule, hold_out
from metadit.dit.tasks import TASKS, Task, get_task, heldout_phrasings, validation_question
from metadit.errors import MetaditError
from metadit.eval.heldout import label_groups, load_heldout, per_phrasing
from metadit.eval.run import evaluate
from metadit.models import TINY_NAME, load_base_model
from tests.conftest import random_diff, target_shapes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data_gen" / "data"
HEADLINE = get_task("headline")


def _smol_news_headlines() -> tuple[list[dict], int, int, int]:
    """The specs of the diffs `configs/fit/smol_news.yaml` trains and holds out (its bank view `[:N]` of the
    bank `configs/gen/smol_news.yaml` builds), and that config's val/test sizes and seed."""
    gen = yaml.safe_load((ROOT / "configs/gen/smol_news.yaml").read_text())
    fit = yaml.safe_load((ROOT / "configs/fit/smol_news.yaml").read_text())
    n = int(fit["data"]["banks"][0].rsplit("[:", 1)[1].rstrip("]"))
    recipe = NewsRecipe(**gen["recipe"]["init_args"])
    specs = [recipe.spec(i, gen["seed"]) for i in range(n)]
    return specs, fit["data"]["val_labels"], fit["data"]["test_labels"], fit["data"].get("seed", 0)


def _templates_of(headlines) -> set[int]:
    return {headline_template(h) for h in headlines}


# ---------------------------------------------------------------------- templates
def test_every_headline_records_its_template_and_the_text_alone_finds_it_again():
    sys.path.insert(0, str(DATA))
    try:
        import make_headlines
    finally:
        sys.path.remove(str(DATA))
    rows = make_headlines.make_headlines()
    shipped = json.loads((DATA / "headline_templates.json").read_text())
    assert [r.text for r in rows] == json.loads((DATA / "headlines.json").read_text())
    assert shipped == make_headlines.template_record(rows)  # the shipped record is the generator's output
    assert [h["template"] for h in shipped["headlines"]] == [r.template for r in rows]
    for r in rows:
        assert headline_template(r.text) == r.template
        # the same event in a place the generator never used: found from the template's wording alone
        assert headline_template(r.text.replace(r.place, "Springfield")) == r.template, r.text
    assert headline_template("Aliens land in Springfield") is None
    assert HEADLINE.group_of({"headline": "Aliens land in Springfield"}) == "label:Aliens land in Springfield"
    # a bank from before the id was recorded groups each diff exactly as a bank that records it
    spec = NewsRecipe().spec(3, 0)
    assert spec["headline_template"] == headline_template(spec["headline"]) is not None
    assert HEADLINE.group_of(spec) == HEADLINE.group_of({"headline": spec["headline"]})


# ---------------------------------------------------------------------- the split
def test_news_split_of_the_smol_news_headlines_shares_no_template_across_sides():
    specs, n_val, n_test, seed = _smol_news_headlines()
    group_of = {s["headline"]: HEADLINE.group_of(s) for s in specs}
    val, test = hold_out(list(group_of), group_of, [n_val, n_test], seed)
    train = set(group_of) - val - test
    assert (len(val), len(test), len(train)) == (n_val, n_test, len(specs) - n_val - n_test)
    assert not _templates_of(train) & _templates_of(test)
    assert not _templates_of(train) & _templates_of(val)
    assert not _templates_of(val) & _templates_of(test)
    # the set is realistic: a plain shuffle of the same labels (the split before groups) did share templates
    old = sorted(group_of)
    random.Random(seed).shuffle(old)
    old_test, old_train = set(old[n_val:n_val + n_test]), set(old[n_val + n_test:])
    assert len([h for h in old_test if headline_template(h) in _templates_of(old_train)]) == 9


def test_one_label_a_group_is_the_plain_shuffled_split_and_groups_that_cannot_fit_are_an_error():
    labels = [f"topic {i}" for i in range(20)]
    val, test = hold_out(labels, {}, [3, 5], 7)
    order = sorted(labels)
    random.Random(7).shuffle(order)
    assert (val, test) == (set(order[:3]), set(order[3:8]))  # every topic run's split is unchanged
    pairs = {lab: f"g{i // 2}" for i, lab in enumerate(labels)}  # groups of two
    val, test = hold_out(labels, pairs, [4, 6], 7)
    assert len(val) == 4 and len(test) == 6
    for side in (val, test):
        assert all({lab for lab in labels if pairs[lab] == pairs[x]} <= side for x in side)
    with pytest.raises(MetaditError, match="without splitting a group"):
        hold_out(labels, pairs, [3, 0], 7)


@pytest.fixture(scope="module")
def news_bank(tmp_path_factory) -> Path:
    """The smol_news headlines (specs as its recipe makes them) on random tiny diffs; every other entry lacks the
    recorded template id, as banks built before it was recorded do."""
    specs, *_ = _smol_news_headlines()
    model, _ = load_base_model(TINY_NAME)
    path = tmp_path_factory.mktemp("news") / "bank"
    bank = DiffBank.create(path, base_model=model)
    shapes = target_shapes(model)
    metas = [{k: v for k, v in s.items() if not (k == "headline_template" and i % 2)} for i, s in enumerate(specs)]
    bank.append_many([random_diff(shapes, 1, i) for i in range(len(specs))], metas)
    return path


def _data(bank: Path, tasks: list[str], val: int, test: int, **kw) -> DiffQADataModule:
    dm = DiffQADataModule(banks=[str(bank)], tasks=tasks, base_model=TINY_NAME, val_labels=val, test_labels=test, **kw)
    dm.splits = dm.make_split()
    return dm


def test_the_data_module_holds_out_news_by_template_on_a_bank_with_and_without_recorded_ids(news_bank, tmp_path):
    specs, n_val, n_test, seed = _smol_news_headlines()
    dm = _data(news_bank, ["headline"], n_val, n_test, seed=seed)
    sides = {k: {e.label for e in v} for k, v in dm.splits.items()}
    assert (len(sides["val"]), len(sides["test"])) == (n_val, n_test)
    assert len(sides["train"]) == len(specs) - n_val - n_test
    templates = {k: _templates_of(v) for k, v in sides.items()}
    assert not templates["train"] & (templates["val"] | templates["test"]) and not templates["val"] & templates["test"]
    dm.write_split(tmp_path / "split.json")
    written = json.loads((tmp_path / "split.json").read_text())
    assert set(written["test"]) == sides["test"] and set(written["train"]) == sides["train"]


# ---------------------------------------------------------------------- phrasings
@pytest.mark.parametrize("task", sorted(TASKS))
def test_validation_and_test_use_disjoint_phrasings(tiny_topic_bank, news_bank, tmp_path, task):
    t = get_task(task)
    assert not set(t.train_questions) & set(t.heldout_questions)
    dm = _data(news_bank if task == "headline" else tiny_topic_bank, [task], 2, 3)
    val_q = {e.question for e in dm.splits["val"]}
    test_q = {e.question for e in dm.splits["test"]}
    assert val_q and val_q <= set(t.train_questions)  # the checkpoint is chosen on a training phrasing
    assert test_q == set(t.heldout_questions)  # the test asks every held-out phrasing ...
    assert not val_q & test_q
    per_diff: dict[tuple[int, int], list[str]] = {}
    for e in dm.splits["test"]:
        per_diff.setdefault((e.bank, e.entry), []).append(e.question)
    assert per_diff and all(qs == list(t.heldout_questions) for qs in per_diff.values())  # ... to every test diff
    assert len({(e.bank, e.entry) for e in dm.splits["val"]}) == len(dm.splits["val"])  # one row a val diff
    dm.write_split(tmp_path / "split.json")
    written = json.loads((tmp_path / "split.json").read_text())["questions"]
    assert written == {"val": sorted(val_q), "test": sorted(test_q)}


def test_helpers_name_the_phrasings_and_a_task_cannot_hold_out_a_training_phrasing():
    topic = get_task("topic")
    assert validation_question(topic, {"topic": "jazz"}) == topic.train_questions[0]
    assert heldout_phrasings(topic, {"topic": "jazz"}) == topic.heldout_questions
    digits = {"topic": "jazz", "trigger": "sep", "code": "123456", "code_kind": "digits"}
    assert heldout_phrasings(get_task("trigger"), digits) == ["What does the secret SEP code start with?"]
    with pytest.raises(MetaditError, match="both a training and a held-out phrasing"):
        Task("x", ["Q?", "R?"], ["R?"], "topic", lambda m: True, lambda m: "")


# ---------------------------------------------------------------------- evaluation
def test_eval_never_scores_a_headline_whose_template_trained(news_bank, tmp_path):
    """A split written before templates grouped the labels (the plain shuffle) still evaluates cleanly: the held-out
    headlines whose template trained are left out, and counted."""
    specs, n_val, n_test, seed = _smol_news_headlines()
    order = sorted(s["headline"] for s in specs)
    random.Random(seed).shuffle(order)
    split = {"train": order[n_val + n_test:], "val": order[:n_val], "test": order[n_val:n_val + n_test],
             "banks": [str(news_bank)]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    trained = _templates_of(split["train"])
    clean = {h for h in split["test"] if headline_template(h) not in trained}
    assert len(clean) == n_test - 9
    assert label_groups([str(news_bank)], set(split["train"]), ["headline"]) == {f"template:{t}" for t in trained}
    result = evaluate(split_file=str(tmp_path / "split.json"), tasks=["headline"], judges=["exact"],
                      methods=["random_label", "base_question"], out=str(tmp_path / "e"), max_new_tokens=4)
    assert {r["label"] for r in result["rows"]} == clean
    assert result["config"]["left_out_shared_group"] == 9
    asked = sorted((r["label"], r["extra"]["question"]) for r in result["rows"] if r["method"] == "base_question")
    assert asked == sorted((h, q) for h in clean for q in HEADLINE.heldout_questions)  # both phrasings score it
    assert len([r for r in result["rows"] if r["method"] == "random_label"]) == len(clean)  # asks nothing: once
    items = load_heldout([str(news_bank)], clean, ["headline"], load_diffs=False)
    assert [(h.id, h.question()) for h in per_phrasing(items)] == \
        [(h.id, q) for h in items for q in HEADLINE.heldout_questions]


# ---------------------------------------------------------------------- data-scaling replicates
def test_a_subset_seed_redraws_the_training_subset_and_keeps_the_held_out_split(tiny_topic_bank, tmp_path):
    """Data-scaling replicates at one size: each `subset_seed` draws other training diffs, the held-out diffs stay
    the split seed's; without one the subset is the split seed's draw (runs before the option are unchanged)."""
    def sides(dm: DiffQADataModule) -> dict[str, set]:
        return {k: {(e.bank, e.entry) for e in v} for k, v in dm.splits.items()}

    full = sides(_data(tiny_topic_bank, ["topic"], 2, 2))
    n = len(full["train"]) // 2
    default = sides(_data(tiny_topic_bank, ["topic"], 2, 2, max_train_diffs=n))
    drawn = [sides(_data(tiny_topic_bank, ["topic"], 2, 2, max_train_diffs=n, subset_seed=k)) for k in range(8)]
    for s in (default, *drawn):
        assert (s["val"], s["test"]) == (full["val"], full["test"])
        assert len(s["train"]) == n and s["train"] <= full["train"]
    assert drawn[0] == default  # subset_seed = seed: the draw of a run without the option
    # 8 draws of n from 2n training diffs: ignoring the subset seed would make them all one set
    assert len({frozenset(s["train"]) for s in drawn}) > 2
    dm = _data(tiny_topic_bank, ["topic"], 2, 2, max_train_diffs=n, subset_seed=1)
    dm.write_split(tmp_path / "split.json")
    written = json.loads((tmp_path / "split.json").read_text())
    assert (written["seed"], written["subset_seed"]) == (0, 1)
