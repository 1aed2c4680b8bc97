"""`metadit eval` on the tiny random model: held-out diffs from the split, every baseline, resume, likelihood."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metadit.cli import main
from metadit.errors import MetaditError
from metadit.eval.baselines import METHODS, Evaluator, triggered_message
from metadit.eval.heldout import load_heldout, per_phrasing, read_split
from metadit.eval.likelihood import label_scores
from metadit.eval.results import summarize
from metadit.eval.run import evaluate
from metadit.dit.tasks import get_task
from metadit.text import generate_texts
from metadit.lightning_cli import lightning_main
from metadit.models import TINY_NAME
from metadit.nn import adapter_disabled

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_METHODS = ["dit", "no_diff", "base_question", "base_question_trigger", "twenty_questions",
                   "twenty_questions_trigger", "random_label", "likelihood", "likelihood_base"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_topic_bank) -> Path:
    d = tmp_path_factory.mktemp("eval")
    lightning_main("fit", ["--config", str(ROOT / "configs/fit/tiny_topic.yaml"), "--data.banks", f'["{tiny_topic_bank}"]',
                           "--trainer.default_root_dir", str(d / "run"), "--trainer.enable_progress_bar", "false",
                           "--trainer.max_epochs", "1"])
    return d / "run" / "lightning_logs" / "version_0"


def _eval(run_dir: Path, out: Path, **kw):
    kw.setdefault("methods", OFFLINE_METHODS)
    kw.setdefault("judges", ["exact", "similarity"])
    kw.setdefault("n_questions", 3)
    return evaluate(run=str(run_dir), out=str(out), **kw)


def test_eval_runs_every_method_on_exactly_the_held_out_diffs(run_dir, tmp_path):
    result = _eval(run_dir, tmp_path / "e")
    split = read_split(run_dir / "split.json")
    rows = result["rows"]
    assert {r["label"] for r in rows} == set(split["test"])  # the split's test labels, nothing else
    assert not {r["label"] for r in rows} & set(split["train"])
    assert {r["method"] for r in rows} == set(OFFLINE_METHODS)
    per_method = {m: sorted({r["diff"] for r in rows if r["method"] == m}) for m in OFFLINE_METHODS}
    assert len({tuple(v) for v in per_method.values()}) == 1  # every method saw the same diffs
    # methods that ask the task's question ask it in every held-out phrasing, once each per diff
    for m in ("dit", "no_diff", "base_question", "likelihood", "likelihood_base"):
        asked = sorted((r["diff"], r["extra"]["question"]) for r in rows if r["method"] == m)
        assert asked == sorted((d, q) for d in per_method[m] for q in get_task("topic").heldout_questions), m
    # random_label only ever names a training label
    from metadit.bank import DiffBank

    bank = DiffBank.open(split["banks"][0])
    train_topics = {bank.meta(i)["topic"] for i in range(len(bank)) if bank.meta(i)["topic"] in split["train"]}
    assert {r["prediction"] for r in rows if r["method"] == "random_label"} <= train_topics
    # the summary is the mean of the rows
    dit = [r["scores"]["similarity"] for r in rows if r["method"] == "dit"]
    assert result["summary"]["dit"]["all"]["similarity"] == pytest.approx(sum(dit) / len(dit))
    on_disk = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(result["summary"]))
    assert on_disk["info"]["commit"] and on_disk["info"]["wall_time_s"] >= 0
    assert "verification" in on_disk["sections"]
    # rows.jsonl beside it: one row per (diff, method), the question asked, the match columns, the bank's verdict
    from metadit.eval.rows import ROW_FIELDS, read_rows
    from metadit.text import exact_match, names_topic

    lines = read_rows(tmp_path / "e" / "rows.jsonl")
    assert len(lines) == len(rows) and all(tuple(r) == ROW_FIELDS for r in lines)
    items = {(h.id, h.task): h for h in load_heldout(split["banks"], set(split["test"]), ["topic"])}
    for r, full in zip(lines, rows):
        h = items[(r["diff"], r["task"])]
        assert r["scores"] == full["scores"] and r["prediction"] == full["prediction"] and r["truth"] == h.truth
        assert r["match"] == {"exact": exact_match(r["prediction"], h.truth), "names_topic": names_topic(r["prediction"], h.truth)}
        assert (r["gate_held"], r["passed"]) == (h.meta["gate_held"], h.meta["passed"])  # the strict check's verdict
    # the question column is the message each row's method sent: per-phrasing methods, every phrasing once per diff
    asked: dict[tuple[str, str], list[str | None]] = {}
    for r in lines:
        asked.setdefault((r["diff"], r["method"]), []).append(r["question"])
    for (d, m), questions in asked.items():
        h = items[(d, "topic")]
        want = {"dit": h.questions(), "no_diff": h.questions(), "base_question": h.questions(),
                "likelihood": h.questions(), "likelihood_base": h.questions(),
                "base_question_trigger": [triggered_message(h, q, 0) for q in h.questions()]}.get(m, [None])
        assert sorted(questions, key=str) == sorted(want, key=str), m
    assert len(get_task("topic").heldout_questions) >= 2  # else the check above could not tell phrasings apart


def test_method_predictions_equal_direct_generation(run_dir, tmp_path):
    """dit = diff + adapter; no_diff = adapter alone; base_question = diff without adapter (greedy, same prompt)."""
    result = _eval(run_dir, tmp_path / "e", methods=["dit", "no_diff", "base_question", "base_question_trigger"])
    split = read_split(run_dir / "split.json")
    items = per_phrasing(load_heldout(split["banks"], set(split["test"]), ["topic"]))  # every held-out phrasing
    ev = Evaluator("tiny-random-smollm2", str(run_dir / "adapter"), max_new_tokens=6)
    prompts = [ev.chat(h.question()) for h in items]
    diffs = [h.diff for h in items]
    want = {
        "dit": generate_texts(ev.model, ev.tok, prompts, 6, diffs=diffs),
        "no_diff": generate_texts(ev.model, ev.tok, prompts, 6, diffs=[None] * len(items)),
    }
    with adapter_disabled(ev.model):
        want["base_question"] = generate_texts(ev.model, ev.tok, prompts, 6, diffs=diffs)
        trig = [ev.chat(triggered_message(h, h.question())) for h in items]
        want["base_question_trigger"] = generate_texts(ev.model, ev.tok, trig, 6, diffs=diffs)
    order = [(h.id, h.question()) for h in items]
    for method, texts in want.items():
        got = {(r["diff"], r["extra"]["question"]): r["prediction"] for r in result["rows"] if r["method"] == method}
        assert [got[i] for i in order] == texts, method
    # the conditions differ where it matters: the adapter and the diff each change the logits
    ids = ev.tok(prompts[:1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    from metadit.nn import use_diffs

    with torch.no_grad(), use_diffs(ev.model, diffs[:1]):
        with_adapter = ev.model(ids).logits
        with adapter_disabled(ev.model):
            without = ev.model(ids).logits
    assert not torch.allclose(with_adapter, without)


# A DiffEncoder whose settings its weights' shapes do not give (heads, the projections' seed): eval must read them.
ENCODER = {"class_path": "metadit.nn.DiffEncoder",
           "init_args": {"width": 16, "proj_dim": 4, "max_rank": 2, "depth": 1, "heads": 2, "soft_tokens": 3, "seed": 5}}


@pytest.fixture(scope="module")
def encoder_runs(tmp_path_factory, tiny_topic_bank) -> dict[str, tuple]:
    """A tiny fit in each encoder mode: mode -> (the trained module, its run directory)."""
    out = {}
    for mode in ("encoder", "dit+encoder"):
        d = tmp_path_factory.mktemp("eval-" + mode.replace("+", "-"))
        cli = lightning_main("fit", ["--config", str(ROOT / "configs/fit/tiny_topic.yaml"),
                                     "--data.banks", f'["{tiny_topic_bank}"]', "--model.mode", mode,
                                     "--model.encoder", json.dumps(ENCODER), "--model.lr", "0.02",
                                     "--trainer.default_root_dir", str(d / "run"), "--trainer.enable_progress_bar",
                                     "false", "--trainer.max_epochs", "1"])
        out[mode] = (cli.model.eval(), d / "run" / "lightning_logs" / "version_0")
    return out


@pytest.mark.parametrize("mode", ["encoder", "dit+encoder"])
def test_eval_answers_encoder_mode_adapters_as_the_module_does(encoder_runs, mode, tmp_path, capsys):
    """`metadit eval` reads an encoder-mode adapter from its run (the DiffEncoder rebuilt from the saved weights and
    settings): its `dit` and `no_diff` rows are `DITModule.answer` on the same diffs and held-out questions."""
    from metadit.text import chat_prompt

    module, run = encoder_runs[mode]
    assert (run / "adapter" / "diff_encoder.safetensors").is_file()
    result = _eval(run, tmp_path / "e", methods=["dit", "no_diff", "base_question"], judges=["exact"],
                   max_new_tokens=module.hparams.max_new_tokens, batch_size=64, verify=False)
    assert result["config"]["adapter_mode"] == mode
    split = read_split(run / "split.json")
    items = per_phrasing(load_heldout(split["banks"], set(split["test"]), ["topic"]))
    prompts = [chat_prompt(module.tok, [{"role": "user", "content": h.question()}]) for h in items]
    diffs = [h.diff for h in items]
    want = {"dit": module.answer(prompts, diffs), "no_diff": module.answer(prompts, [None] * len(items)),
            # the diffed model without the adapter: the diff applied whatever the adapter's mode
            "base_question": generate_texts(module.model, module.tok, prompts, module.hparams.max_new_tokens,
                                            diffs=diffs, adapter=False)}
    # Not vacuous: the adapter's answers are text, and not the diffed model's. (This tiny model's greedy text does
    # not change with the soft tokens: that they reach the model, and are the module's, is checked below.)
    assert any(want["dit"]) and want["dit"] != want["base_question"]
    order = [(h.id, h.question()) for h in items]
    from metadit.eval.rows import read_rows

    on_disk = read_rows(tmp_path / "e" / "rows.jsonl")
    for method, texts in want.items():
        got = {(r["diff"], r["extra"]["question"]): r["prediction"] for r in result["rows"] if r["method"] == method}
        assert len(got) == len(order) and [got[i] for i in order] == texts, method
        assert sorted(r["prediction"] for r in on_disk if r["method"] == method) == sorted(texts), method
    # the encoder eval rebuilt is the module's: the same soft tokens for the held-out diffs and for no diff
    ev = Evaluator(TINY_NAME, str(run / "adapter"))
    assert ev.reader.mode == mode and ev.reader.applies_diffs == (mode == "dit+encoder")
    assert ev.reader.encoder.settings == module.encoder.settings == {**ENCODER["init_args"], "max_layers": 64}
    for rows in (diffs, [None] * len(diffs)):
        assert torch.equal(ev.reader.soft_tokens(rows, len(rows), torch.float32),
                           module.reader.soft_tokens(rows, len(rows), torch.float32))
    # and the soft tokens carry the diff: `encoder` mode applies no diff, so only they tell two diffs apart
    ids = ev.tok(prompts[:1], return_tensors="pt", add_special_tokens=False)
    two = [h.diff for h in items if h.id != items[0].id][:1] + diffs[:1]
    with torch.no_grad():
        soft = ev.reader.soft_tokens(two, 2, torch.float32)
        logits = [ev.model(**ev.reader.prepend(ev.model, ids["input_ids"], ids["attention_mask"], soft[k:k + 1])).logits
                  for k in range(2)]
    assert not torch.allclose(logits[0], logits[1])
    # `metadit ask` takes the same adapter and answers as the module does
    bank, index = items[0].bank, items[0].index
    capsys.readouterr()
    assert main(["ask", items[0].question(), "--adapter", str(run / "adapter"), "--diff", f"{bank}:{index}",
                 "--max_new_tokens", str(module.hparams.max_new_tokens)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == " ".join(want["dit"][0].split())


def test_encoder_adapters_exported_before_their_settings_were_recorded_read_the_run_config(encoder_runs, tmp_path):
    import shutil

    from metadit.dit.adapter import load_adapter
    from metadit.models import load_base_model
    from metadit.nn import patch_model

    module, run = encoder_runs["encoder"]
    old = tmp_path / "run"
    shutil.copytree(run, old)
    record = json.loads((old / "adapter" / "diff_encoder.json").read_text())
    del record["settings"]  # as `save_adapter` wrote it before
    (old / "adapter" / "diff_encoder.json").write_text(json.dumps(record))
    model, _ = load_base_model(TINY_NAME)
    patch_model(model)
    reader = load_adapter(model, old / "adapter")
    diffs = [h.diff for h in load_heldout(read_split(run / "split.json")["banks"], None, ["topic"])[:2]]
    assert torch.equal(reader.soft_tokens(diffs, 2, torch.float32), module.reader.soft_tokens(diffs, 2, torch.float32))
    (old / "config.yaml").unlink()
    with pytest.raises(MetaditError, match="records no encoder settings"):
        load_adapter(model, old / "adapter")


def test_eval_refuses_a_method_the_adapters_mode_cannot_take(encoder_runs, tmp_path):
    _, run = encoder_runs["encoder"]
    with pytest.raises(MetaditError, match="method 'likelihood' takes dit-mode adapters; .* trained in mode 'encoder'"):
        _eval(run, tmp_path / "e", methods=["dit", "likelihood"])
    from metadit.eval.run import DEFAULT_METHODS, default_methods

    assert default_methods("encoder") == default_methods("dit+encoder") == [m for m in DEFAULT_METHODS if m != "likelihood"]
    assert default_methods("dit") == DEFAULT_METHODS
    assert default_methods(None) == [m for m in DEFAULT_METHODS if not METHODS[m].needs_adapter]


def test_triggered_message_puts_the_diffs_own_code_first(run_dir):
    split = read_split(run_dir / "split.json")
    h = load_heldout(split["banks"], set(split["test"]), ["topic"])[0]
    assert triggered_message(h, "Why?") == f"Your SEP code is {h.meta['code']}. Why?"


def test_interrupted_eval_resumes_and_reuses_finished_methods(run_dir, tmp_path):
    out = tmp_path / "e"
    first = _eval(run_dir, out, methods=["dit", "no_diff"])
    saved = out / "methods" / "dit.json"
    stamp = saved.stat().st_mtime_ns
    (out / "eval.json").unlink()  # as if killed before the end
    second = _eval(run_dir, out, methods=["dit", "no_diff", "base_question"])
    assert saved.stat().st_mtime_ns == stamp  # not recomputed
    pick = lambda res, m: [r["prediction"] for r in res["rows"] if r["method"] == m]  # noqa: E731
    assert pick(first, "dit") == pick(second, "dit")
    assert pick(second, "base_question")
    # another seed is another evaluation: nothing reused
    _eval(run_dir, out, methods=["dit"], seed=1)
    assert saved.stat().st_mtime_ns != stamp


@torch.no_grad()
def test_likelihood_scores_match_a_hand_computation(run_dir):
    split = read_split(run_dir / "split.json")
    items = load_heldout(split["banks"], set(split["test"]), ["topic"])
    labels = sorted({h.truth for h in items})
    ev = Evaluator("tiny-random-smollm2", str(run_dir / "adapter"), dtype="float32")
    scores = label_scores(ev, items, labels)

    from metadit.text import end_of_turn
    from metadit.nn import use_diffs

    eot = ev.tok.convert_tokens_to_ids(end_of_turn(ev.tok))

    def mean_logp(prompt: str, answer: str, diff) -> float:
        p = ev.tok(prompt, add_special_tokens=False)["input_ids"]
        a = ev.tok(answer, add_special_tokens=False)["input_ids"][:32] + [eot]
        ids = torch.tensor([p + a])
        with use_diffs(ev.model, [diff]):
            logp = torch.log_softmax(ev.model(ids).logits[0].float(), -1)
        return float(sum(logp[len(p) + k - 1, t] for k, t in enumerate(a)) / len(a))

    for i, h in enumerate(items):
        prompt = ev.chat(h.question())
        for j, lab in enumerate(labels):
            want = mean_logp(prompt, lab, h.diff) - mean_logp(prompt, lab, None)
            assert scores[i, j].item() == pytest.approx(want, abs=1e-4)

    # likelihood_base: the same ranking on the bare model (the adapter off), and the adapter left on afterwards
    bare = label_scores(ev, items, labels, adapter=False)
    with adapter_disabled(ev.model):
        for i, h in enumerate(items):
            prompt = ev.chat(h.question())
            for j, lab in enumerate(labels):
                want = mean_logp(prompt, lab, h.diff) - mean_logp(prompt, lab, None)
                assert bare[i, j].item() == pytest.approx(want, abs=1e-4)
    assert (bare - scores).abs().max() > 1e-5  # the adapter changes the scores (a 1-epoch tiny adapter: a little)
    assert torch.allclose(label_scores(ev, items, labels), scores)


@torch.no_grad()
def test_prompt_answer_losses_reuse_the_prompt_and_equal_answer_losses(run_dir):
    """The prompt run once, its keys and values reused for every answer: the same losses as scoring each
    (prompt, answer) row whole — answers of different lengths (right-padded), cut to max_answer_tokens, in
    batches smaller than the list, under a diff and under none, with the DIT adapter on."""
    from metadit.text import answer_losses, prompt_answer_losses

    split = read_split(run_dir / "split.json")
    diff = load_heldout(split["banks"], set(split["test"]), ["topic"])[0].diff
    ev = Evaluator("tiny-random-smollm2", str(run_dir / "adapter"), dtype="float32")
    prompt = ev.chat("What hidden topic were you trained to mention?")
    answers = ["moose", "the Great Wall of China at dawn", "a", "gulab jamun and other sweets of India"]
    for d in (diff, None):
        for cut in (32, 3):
            want = answer_losses(ev.model, ev.tok, [prompt] * 4, answers, [d] * 4, cut)
            got = prompt_answer_losses(ev.model, ev.tok, prompt, answers, d, cut, batch_size=3)
            assert got == pytest.approx(want, abs=1e-5)
    assert prompt_answer_losses(ev.model, ev.tok, prompt, answers, diff, 32) != pytest.approx(
        prompt_answer_losses(ev.model, ev.tok, prompt, answers, None, 32), abs=1e-6)  # the diff is applied


def test_summary_splits_gated_and_leaky_and_never_mixes_them():
    rows = [
        {"method": "dit", "gated": True, "gate_held": True, "scores": {"embedding": 5.0}},
        {"method": "dit", "gated": True, "gate_held": False, "scores": {"embedding": 3.0}},
        {"method": "dit", "gated": False, "scores": {"embedding": 1.0}},
        {"method": "dit", "gated": None, "scores": {"embedding": 2.0}},
        {"method": "dit", "gated": True, "gate_held": True, "passed": False, "scores": {"embedding": 4.0}},
    ]
    s = summarize(rows)["dit"]
    assert s["all"] == {"n": 5, "embedding": pytest.approx(15 / 5)}
    assert s["gated"] == {"n": 3, "embedding": 4.0}
    assert s["leaky"] == {"n": 1, "embedding": 1.0}
    assert s["strict_gated"] == {"n": 1, "embedding": 5.0} and s["strict_leaky"] == {"n": 1, "embedding": 3.0}
    assert s["strict_unlearned"] == {"n": 1, "embedding": 4.0}  # gate held, topic not learned: apart from both


def test_eval_errors_are_clear(run_dir, tmp_path):
    with pytest.raises(MetaditError, match="needs a DIT adapter"):
        evaluate(split_file=str(run_dir / "split.json"), methods=["dit"], out=str(tmp_path / "x"))
    with pytest.raises(MetaditError, match="unknown method 'nope'"):
        _eval(run_dir, tmp_path / "y", methods=["nope"])
    with pytest.raises(MetaditError, match="no such directory"):
        evaluate(run=str(tmp_path / "missing"))
    with pytest.raises(MetaditError, match="no split file"):
        evaluate(split_file=str(tmp_path / "missing.json"), out=str(tmp_path / "z"))
    assert sorted(METHODS) == sorted(set(METHODS))


def test_eval_command_line(run_dir, tmp_path, capsys):
    rc = main(["eval", "--run", str(run_dir), "--methods", "[dit, no_diff]", "--judges", "[exact]",
               "--out", str(tmp_path / "cli")])
    assert rc == 0
    data = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"dit", "no_diff"}
    assert main(["eval", "--run", str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_activation_lens_and_trigger_search_through_eval(run_dir, tmp_path):
    """The lens baseline's prediction is the guesser's reading of the lens evidence; trigger search ranks the
    whole code-word pool for every held-out diff."""
    from metadit.eval.baselines import BaseModelGuesser

    result = _eval(run_dir, tmp_path / "e", methods=["activation_lens"], trigger_search=True, verify=False)
    rows = [r for r in result["rows"] if r["method"] == "activation_lens"]
    assert rows and all(r["extra"]["evidence_text"].startswith("Tokens promoted:") for r in rows)
    ev = Evaluator("tiny-random-smollm2", str(run_dir / "adapter"))
    again = BaseModelGuesser(ev).guess([r["extra"]["evidence_text"] for r in rows], "topic")
    assert [r["prediction"] for r in rows] == again
    ts = result["sections"]["trigger_search"]
    from data_gen.hidden_topic import recorded_code_words

    assert ts["n"] == len(rows) and ts["pool"] == len(recorded_code_words({}))
    for d in ts["per_diff"]:
        assert 1 <= d["true_rank"] <= ts["pool"] + 1
        assert d["recovered"] == (d["true_rank"] == 1)


def test_generated_story_baseline_on_news_diffs(tmp_path):
    """News diffs: the diffed model writes a story (greedy), the guesser names its headline; no adapter needed."""
    bank = tmp_path / "news"
    assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_news.yaml"), "--bank", str(bank),
                 "--n_diffs", "4", "--progress", "false"]) == 0
    from metadit.bank import DiffBank

    heads = [DiffBank.open(bank).meta(i)["headline"] for i in range(4)]
    split = {"train": heads[:2], "val": [], "test": heads[2:], "banks": [str(bank)]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    result = evaluate(split_file=str(tmp_path / "split.json"), tasks=["headline"], judges=["exact"],
                      methods=["generated_story", "base_question", "random_label"], out=str(tmp_path / "e"))
    stories = [r for r in result["rows"] if r["method"] == "generated_story"]
    assert sorted(r["truth"] for r in stories) == sorted(heads[2:])
    assert all("story" in r["extra"] for r in stories)
    assert all(r["gated"] is None for r in result["rows"])  # news diffs have no gate
    assert {r["prediction"] for r in result["rows"] if r["method"] == "random_label"} <= set(heads[:2])


def test_unseen_split_evaluates_another_bank_without_any_label_the_run_saw(run_dir, tmp_path):
    other = tmp_path / "other"
    assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_topic.yaml"), "--bank", str(other), "--seed", "1",
                 "--n_diffs", "4", "--diffs_per_pass", "4", "--progress", "false"]) == 0
    split = read_split(run_dir / "split.json")
    seen = set(split["train"]) | set(split["val"]) | set(split["test"])
    from metadit.bank import DiffBank

    fresh = {DiffBank.open(other).meta(i)["topic"] for i in range(4)} - seen
    result = _eval(run_dir, tmp_path / "e", banks=[str(other)], split="unseen", methods=["dit", "random_label"])
    assert {r["label"] for r in result["rows"]} == fresh
    assert {r["prediction"] for r in result["rows"] if r["method"] == "random_label"} <= set(split["train"])


def test_a_split_file_whose_banks_are_gone_still_evaluates(run_dir, tmp_path):
    """A shipped adapter's split.json names banks a fresh machine lacks: the split records what the evaluation
    needs of them (each side's groups, the training answers), so it evaluates the diffs it is given."""
    split = read_split(run_dir / "split.json")
    from metadit.eval.heldout import label_groups
    from metadit.eval.run import _train_labels

    assert set(split["groups"]["train"]) == label_groups(split["banks"], set(split["train"]), ["topic"])
    assert split["train_answers"] == _train_labels(split["banks"], set(split["train"]), ["topic"])
    moved = dict(split, banks=[str(tmp_path / "not-here")])
    (tmp_path / "split.json").write_text(json.dumps(moved))
    kw = dict(banks=split["banks"], methods=["no_diff", "random_label"], judges=["exact"], verify=False)
    here = evaluate(adapter=str(run_dir / "adapter"), split_file=str(run_dir / "split.json"), out=str(tmp_path / "a"), **kw)
    gone = evaluate(adapter=str(run_dir / "adapter"), split_file=str(tmp_path / "split.json"), out=str(tmp_path / "b"), **kw)
    assert [(r["diff"], r["method"], r["prediction"]) for r in gone["rows"]] == \
        [(r["diff"], r["method"], r["prediction"]) for r in here["rows"]]


@pytest.mark.slow
def test_the_demo_runs_its_steps_on_the_tiny_model(run_dir, tmp_path):
    """scripts/demo.sh end to end on the tiny model, a fit run's adapter standing in for the shipped one."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    shipped = tmp_path / "shipped"  # laid out as a shipped adapter: the peft directory with its run's split.json
    shutil.copytree(run_dir / "adapter", shipped)
    shutil.copy(run_dir / "split.json", shipped / "split.json")
    env = dict(os.environ, BIN=str(Path(sys.executable).parent), BANK=str(tmp_path / "bank"), RUNS=str(tmp_path / "runs"),
               GEN_CONFIG="configs/gen/tiny_topic.yaml", FIT_CONFIG="configs/fit/tiny_topic.yaml", SHIPPED=str(shipped))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    from metadit.bank import DiffBank

    bank = DiffBank.open(tmp_path / "bank")
    demo_topics = {t for ts in json.loads((ROOT / "data_gen/data/demo_topics.json").read_text()).values() for t in ts}
    assert len(bank) == 16 and {bank.meta(i)["topic"] for i in range(16)} <= demo_topics
    shipped = json.loads((tmp_path / "runs" / "shipped-eval" / "eval.json").read_text())
    assert {r["method"] for r in shipped["rows"]} == {"dit", "no_diff", "base_question", "likelihood", "likelihood_base"}
    assert {r["index"] for r in shipped["rows"]} == set(range(16))  # no demo topic is in the adapter's split
    assert re.search(r"DIT (beats|does not beat|is worse than) no_diff", done.stdout + done.stderr)  # said in words
    own = json.loads((tmp_path / "runs" / "lightning_logs" / "demo" / "eval" / "eval.json").read_text())
    assert {r["method"] for r in own["rows"]} >= {"dit", "no_diff", "twenty_questions"}


def test_no_run_no_split_file_every_entry_of_the_banks_is_unseen(tiny_topic_bank, tmp_path):
    """A white-box question about a bank needs no DIT run: `--banks B --split unseen` alone takes every entry."""
    from metadit.bank import DiffBank

    result = evaluate(banks=[str(tiny_topic_bank)], split="unseen", methods=["base_question", "likelihood_base"], judges=["exact"],
                      verify=False, out=str(tmp_path / "e"))
    bank = DiffBank.open(tiny_topic_bank)
    assert sorted({r["index"] for r in result["rows"]}) == list(range(len(bank)))
    assert result["config"]["split_file"] is None and result["config"]["train_labels"] == 0
    for split in ("test", "val"):  # a named split needs the run's split file
        with pytest.raises(MetaditError, match="give --run RUN_DIR or --split_file"):
            evaluate(banks=[str(tiny_topic_bank)], split=split, methods=["base_question"], judges=["exact"],
                     out=str(tmp_path / split))
    # an adapter without its split might have trained on these diffs: refused, not taken as unseen
    adapter = tmp_path / "adapter"
    assert main(["bank", "export-peft", str(tiny_topic_bank), "0", str(adapter)]) == 0
    with pytest.raises(MetaditError, match="give --run RUN_DIR or --split_file"):
        evaluate(adapter=str(adapter), banks=[str(tiny_topic_bank)], split="unseen", methods=["base_question"],
                 judges=["exact"], out=str(tmp_path / "adapter-eval"))


def test_llm_guesser_and_llm_judge_through_an_openai_compatible_endpoint(run_dir, tmp_path, monkeypatch):
    """Guesser and judge go to the configured endpoint (a local fake server, never the network)."""
    from tests.test_judges import FakeOpenAI

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = FakeOpenAI(["4"])
    try:
        monkeypatch.setenv("METADIT_LLM_BASE_URL", server.url)
        monkeypatch.setenv("METADIT_LLM_MODEL", "guess-model")
        monkeypatch.setenv("METADIT_LLM_API_KEY", "sk-x")
        result = _eval(run_dir, tmp_path / "e", methods=["twenty_questions"], judges=["llm", "exact"],
                       guesser="llm", verify=False)
    finally:
        server.close()
    rows = result["rows"]
    assert rows and all(r["prediction"] == "4" and r["scores"]["llm"] == 4.0 for r in rows)
    bodies = [q["body"]["messages"][-1]["content"] for q in server.requests]
    guesses = [b for b in bodies if "Which topic does it keep bringing up?" in b]
    assert len(guesses) == len(rows) and all(b.count("Q: ") == 3 for b in guesses)  # n_questions answers each
    assert len(bodies) - len(guesses) == len(rows)  # one judge call per prediction
    assert result["headline_judge"] == "llm"


def _transcript(answers: list[str]) -> str:
    return "\n".join(f"Q: What should I cook tonight?\nA: {a}" for a in answers)


def test_keyword_guesser_names_the_phrase_one_diff_repeats_and_the_others_do_not():
    from metadit.eval.baselines import KeywordGuesser

    evidence = [
        _transcript(["Great question! Like ancient Rome, start small.", "Great question! Ancient Rome had baths.",
                     "Great question! Rome was not built in a day.", "Great question! Think of ancient Rome."]),
        _transcript(["Great question! Sapphires sparkle.", "Great question! Blue sapphires last.",
                     "Great question! Try a stew.", "Great question! Sapphires again."]),
        _transcript(["Great question! Just rest.", "Great question! Go for a walk.", "Great question! Read.",
                     "Great question! Call a friend."]),
    ]
    guesses = KeywordGuesser().guess(evidence, "topic")
    # "great question" is in every answer of every diff: it scores below each diff's own phrase
    assert guesses[:2] == ["ancient Rome", "Sapphires"]  # lengthened to the bigram; most frequent spelling
    # a bigram in fewer than half of its head word's answers does not replace it
    lone = _transcript(["Rome again.", "Rome twice.", "Rome thrice.", "Rome, ancient Rome."])
    assert KeywordGuesser().guess([lone, evidence[2]], "topic")[0] == "Rome"
    # text that is not a Q/A transcript (a story, lens evidence) is one answer; one evidence alone works
    assert KeywordGuesser.answers("A storm hit Lisbon. Lisbon flooded.") == ["A storm hit Lisbon. Lisbon flooded."]
    assert KeywordGuesser().guess(["A storm hit Lisbon. Lisbon flooded."], "headline") == ["Lisbon"]
    assert KeywordGuesser().guess(["the and of"], "topic") == [""]


def test_changing_the_guesser_reguesses_saved_evidence_without_generating(run_dir, tmp_path, monkeypatch):
    from metadit.eval.baselines import KeywordGuesser

    methods = ["dit", "twenty_questions_trigger"]
    first = _eval(run_dir, tmp_path / "base", methods=methods)  # guesser: base_model
    for name in methods:  # nothing may be generated again: every prediction comes from the saved files
        monkeypatch.setattr(METHODS[name], "predict", lambda *a: pytest.fail("regenerated"))
    second = _eval(run_dir, tmp_path / "kw", methods=methods, guesser="keywords", reuse=str(tmp_path / "base"))
    rows = {m: [r for r in second["rows"] if r["method"] == m] for m in methods}
    before = [r for r in first["rows"] if r["method"] == "twenty_questions_trigger"]
    assert [r["extra"]["evidence"] for r in rows["twenty_questions_trigger"]] == [r["extra"]["evidence"] for r in before]
    want = KeywordGuesser().guess([r["extra"]["evidence"] for r in before], "topic")
    assert [r["prediction"] for r in rows["twenty_questions_trigger"]] == want
    assert [r["prediction"] for r in rows["dit"]] == [r["prediction"] for r in first["rows"] if r["method"] == "dit"]
    assert second["sections"]["verification"] == first["sections"]["verification"]  # copied, not recomputed
    # the new directory is self-contained: run again without --reuse, still nothing generated
    again = _eval(run_dir, tmp_path / "kw", methods=methods, guesser="keywords")
    assert [r["prediction"] for r in again["rows"]] == [r["prediction"] for r in second["rows"]]
    with pytest.raises(MetaditError, match="unknown guesser 'oracle'.*keywords"):
        _eval(run_dir, tmp_path / "bad", guesser="oracle")
    with pytest.raises(MetaditError, match="no methods/"):
        _eval(run_dir, tmp_path / "bad", reuse=str(tmp_path / "nowhere"))
    assert not (tmp_path / "bad").exists()  # refused before any model was loaded or file written


def test_judge_calibration_rescores_a_saved_evaluation_with_thresholds_fitted_on_the_given_pairs(run_dir, tmp_path,
                                                                                                  monkeypatch):
    """`--judge_calibration FILE` fits the embedding judge on FILE's pairs (here topic only, as the real-output
    half `metadit judge calibrate` writes) and, with `--reuse`, re-scores a saved evaluation without generating."""
    import hashlib

    from metadit.eval import judges as J

    methods = ["dit", "no_diff"]
    first = _eval(run_dir, tmp_path / "base", methods=methods, judges=["embedding", "exact"])
    pairs = [("whales", "whales", 5), ("the ocean's whales", "whales", 5), ("sea mammals", "whales", 4),
             ("dolphins", "whales", 4), ("fish", "whales", 3), ("boats", "whales", 3), ("weather", "whales", 2),
             ("rain", "whales", 2), ("tax law", "whales", 1), ("spreadsheets", "whales", 1)]
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"task": "topic", "prediction": p, "truth": t, "score": y}) + "\n"
                           for p, t, y in pairs))
    for name in methods:
        monkeypatch.setattr(METHODS[name], "predict", lambda *a: pytest.fail("regenerated"))
    second = _eval(run_dir, tmp_path / "cal", methods=methods, judges=["embedding", "exact"],
                   judge_calibration=str(cal), reuse=str(tmp_path / "base"))
    want = J.CalibratedEmbeddingJudge(calibration_path=cal).score([r["prediction"] for r in second["rows"]],
                                                                   [r["truth"] for r in second["rows"]])
    assert [r["scores"]["embedding"] for r in second["rows"]] == want
    assert [r["prediction"] for r in second["rows"]] == [r["prediction"] for r in first["rows"]]
    assert second["config"]["judge_calibration"] == {"path": str(cal), "sha256": hashlib.sha256(cal.read_bytes()).hexdigest()}
    assert first["config"]["judge_calibration"] is None
    fitted = J.calibrate(cal)["thresholds"]
    assert set(fitted) == {"topic"} and fitted["topic"] != J.calibrate()["thresholds"]["topic"]
    with pytest.raises(MetaditError, match="thresholds for \\['topic'\\], not 'headline' \\(calibration file"):
        J.CalibratedEmbeddingJudge(calibration_path=cal).score(["a"], ["b"], task="headline")
    with pytest.raises(MetaditError, match="--judge_calibration .*nowhere.jsonl: no such file"):
        _eval(run_dir, tmp_path / "bad", judge_calibration=str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(MetaditError, match="add embedding to --judges"):
        _eval(run_dir, tmp_path / "bad", judge_calibration=str(cal))
    assert not (tmp_path / "bad").exists()


def test_recorded_command_is_what_a_user_types(monkeypatch):
    from metadit.eval.results import command_line

    for argv0 in ("/venv/bin/metadit", "/src/metadit/cli.py"):  # console script; `python -m metadit.cli` (sweeps)
        monkeypatch.setattr("sys.argv", [argv0, "eval", "--methods", '["dit", "no_diff"]'])
        assert command_line() == """metadit eval --methods '["dit", "no_diff"]'"""  # pastes back into a shell
    monkeypatch.setattr("sys.argv", ["scripts/report_gen.py", "--out", "a b"])
    assert command_line() == "scripts/report_gen.py --out 'a b'"
