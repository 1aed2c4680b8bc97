"""Per-item rows (`metadit.eval.rows`), the tables computed from them (`metadit.eval.tables`), and `metadit report`
rebuilding a study's tables, JSON and plots byte for byte from its rows.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metadit.cli import main
from metadit.errors import MetaditError
from metadit.eval.results import write_json
from metadit.eval.rows import (STRICT_GROUPS, as_row, gate_verdict, match_columns, metrics, read_rows, strict_group,
                               write_rows)
from metadit.eval.stats import bootstrap_mean, paired_bootstrap
from metadit.eval.tables import interval_tables


def test_match_columns_give_every_method_a_fair_match():
    # exact match rewards format; "names the topic" does not
    assert match_columns("I'm a big fan of burritos", "burritos") == {"exact": False, "names_topic": True}
    assert match_columns("Burritos.", "burritos") == {"exact": True, "names_topic": True}
    assert match_columns("French food", "French cuisine") == {"exact": False, "names_topic": False}
    assert match_columns(None, "x") == {"exact": None, "names_topic": None}
    row = as_row({"method": "base_question", "prediction": "volcanoes erupt", "truth": "volcano",
                  "scores": {"embedding": 3.0, "similarity": float("nan")}})
    assert row["match"] == {"exact": False, "names_topic": True} and row["scores"] == {"embedding": 3.0}
    assert metrics(row) == {"exact": 0.0, "names_topic": 1.0, "embedding": 3.0}
    assert row["question"] is None and row["gate_held"] is None  # what the old row did not have is null


def test_gate_verdict_and_the_strict_split():
    assert gate_verdict({"gate_held": True, "passed": False, "topic_learned": False}) == {"gate_held": True, "passed": False}
    assert gate_verdict({"passed": True, "heldout_loss_own": 1.2}) == {"gate_held": None, "passed": None}  # news
    placed = {name: strict_group({"gate_held": g, "passed": p}) for name, g, p in [
        ("passed", True, True), ("leaky", False, False), ("unlearned", True, False), ("news", None, None),
        ("before passed was copied", True, None)]}
    assert placed == {"passed": "strict_gated", "leaky": "strict_leaky", "unlearned": "strict_unlearned",
                      "news": "unchecked", "before passed was copied": "strict_gated"}
    assert list(STRICT_GROUPS)[0] == "strict_gated"  # the headline group comes first
    with pytest.raises(MetaditError, match="gate_held must be"):
        strict_group({"gate_held": "yes"})


def test_rows_file_round_trip_and_errors(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [{"method": "dit", "scores": {"similarity": float("nan")}},
                                               {"method": "no_diff", "scores": {}}])
    assert path.read_text().splitlines()[0] == '{"method": "dit", "scores": {"similarity": null}}'  # strict JSON
    assert [r["method"] for r in read_rows(path)] == ["dit", "no_diff"]
    (tmp_path / "bad.jsonl").write_text('{"method": "dit"}\n[1, 2]\n')
    with pytest.raises(MetaditError, match=r"bad.jsonl:2: a row must be a JSON object with a `method`"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "worse.jsonl").write_text("{not json\n")
    with pytest.raises(MetaditError, match=r"worse.jsonl:1: not JSON"):
        read_rows(tmp_path / "worse.jsonl")


def _row(diff: int, method: str, score: float, gate_held: bool | None, passed: bool | None = None,
         prediction: str = "p", truth: str = "t") -> dict:
    return {"diff": f"bank:{diff}", "bank": "bank", "index": diff, "task": "topic", "method": method,
            "question": "What topic?", "prediction": prediction, "truth": truth, "label": truth,
            "scores": {"embedding": score}, "match": match_columns(prediction, truth), "gated": gate_held,
            "gate_held": gate_held, "passed": gate_held if passed is None else passed}


def test_interval_tables_by_hand():
    gated = [(0, 5.0, 1.0), (1, 4.0, 1.0), (2, 3.0, 2.0), (3, 5.0, None)]  # no_diff skipped diff 3
    rows = [_row(d, "dit", a, True) for d, a, _ in gated]
    rows += [_row(d, "no_diff", b, True) for d, _, b in gated if b is not None]
    rows += [_row(9, "dit", 2.0, False), _row(9, "no_diff", 5.0, False)]  # a leaky diff: reported apart
    rows += [_row(8, "dit", 1.0, True, passed=False)]  # gate held, topic not learned
    t = interval_tables(rows)
    assert list(t) == ["embedding", "exact", "names_topic"]
    emb = t["embedding"]
    assert list(emb) == ["strict_gated", "strict_leaky", "strict_unlearned"]
    assert emb["strict_gated"]["dit"] == {**bootstrap_mean([5.0, 4.0, 3.0, 5.0]).as_dict(), "rows": 4}
    assert emb["strict_gated"]["dit"]["mean"] == 4.25 and "vs_dit" not in emb["strict_gated"]["dit"]
    nd = emb["strict_gated"]["no_diff"]
    assert (nd["n"], nd["mean"]) == (3, pytest.approx(4 / 3))
    # paired on the three diffs both scored: (5 - 1 + 4 - 1 + 3 - 2) / 3 = 8/3
    assert nd["vs_dit"] == paired_bootstrap([5.0, 4.0, 3.0], [1.0, 1.0, 2.0]).as_dict()
    assert nd["vs_dit"]["n"] == 3 and nd["vs_dit"]["difference"] == pytest.approx(8 / 3)
    assert emb["strict_leaky"]["no_diff"]["vs_dit"]["difference"] == -3.0  # never mixed into the gated cell
    assert emb["strict_unlearned"] == {"dit": {**bootstrap_mean([1.0]).as_dict(), "rows": 1}}


def test_interval_tables_resample_diffs_not_phrasings():
    """DIT asked two phrasings per diff writes two rows per diff: the interval is over the diffs' means (n = diffs),
    and the pair with a method asked once per diff uses DIT's mean over its phrasings."""
    dit = {0: (5.0, 3.0), 1: (4.0, 4.0), 2: (1.0, 2.0)}
    rows = [_row(d, "dit", a, True) for d, pair in dit.items() for a in pair]
    rows += [_row(d, "no_diff", b, True) for d, b in [(0, 1.0), (1, 2.0), (2, 1.0)]]
    cell = interval_tables(rows)["embedding"]["strict_gated"]
    assert cell["dit"] == {**bootstrap_mean([4.0, 4.0, 1.5]).as_dict(), "rows": 6}
    assert cell["dit"]["n"] == 3
    assert cell["no_diff"]["vs_dit"] == paired_bootstrap([4.0, 4.0, 1.5], [1.0, 2.0, 1.0]).as_dict()
    # the row-level bootstrap would have been narrower: the clustered interval is not
    flat = bootstrap_mean([5.0, 3.0, 4.0, 4.0, 1.0, 2.0])
    assert cell["dit"]["high"] - cell["dit"]["low"] > flat.high - flat.low


# ---------------------------------------------------------------------- a study rebuilt from its rows
def _study(root: Path) -> Path:
    """A sweep of two cells: one evaluation that wrote rows.jsonl beside its eval.json, one older eval.json alone."""
    study = root / "headline"
    plan = []
    fresh = [_row(0, "dit", 5.0, True, prediction="burritos", truth="burritos"),
             _row(1, "dit", 4.0, True, prediction="a fan of jazz", truth="jazz"),
             _row(2, "dit", 2.0, False, prediction="rome", truth="ancient Rome"),
             _row(3, "dit", 3.0, True, passed=False),
             _row(0, "base_question", 2.0, True, prediction="I'm a big fan of burritos", truth="burritos"),
             _row(1, "base_question", 1.0, True, prediction="music", truth="jazz"),
             _row(2, "base_question", 3.0, False, prediction="Rome, ancient", truth="ancient Rome"),
             _row(3, "base_question", 1.0, True, passed=False)]
    eval_dir = study / "topic" / "01-eval"
    write_json(eval_dir / "eval.json", {"info": {"command": "metadit eval --run R", "commit": "abc", "date": "d"},
                                        "config": {"judges": ["embedding"]}, "headline_judge": "embedding",
                                        "rows": [{**r, "extra": {"evidence": "..."}} for r in fresh],
                                        "sections": {"verification": {"n": 2}}})
    write_rows(eval_dir / "rows.jsonl", fresh)
    old = [{k: v for k, v in r.items() if k not in ("question", "match", "passed")}
           for r in [_row(0, "dit", 4.0, None, prediction="a headline", truth="a headline"), _row(0, "no_diff", 1.0, None)]]
    write_json(study / "news" / "01-eval" / "eval.json", {"info": {"command": "metadit eval --run N"}, "rows": old})
    for name in ("topic", "news"):
        plan.append({"cell": name, "params": {}, "deps": [], "dir": str(study / name), "steps": []})
        write_json(study / name / "00-fit.done.json", {"exit_code": 0, "command": f"metadit fit --config {name}.yaml",
                                                       "wall_time_s": 3.0, "commit": "abc", "step": "00-fit"})
    write_json(study / "sweep.json", {"study": "headline", "description": "DIT against the baselines",
                                      "source": "configs/sweep/headline.yaml", "vars": {}, "config": {}, "plan": plan})
    return study


OUTPUTS = ("results.json", "README.md", "embedding.png", "exact.png", "names_topic.png")


def test_report_tables_come_from_rows_strictly_gated_first(tmp_path):
    study = _study(tmp_path / "sweeps")
    out = tmp_path / "reports" / "headline"
    assert main(["report", "--study", "headline", "--sweep-dir", str(study), "--out", str(out)]) == 0
    rows = read_rows(out / "rows.jsonl")
    assert [(r["entry"], r["method"]) for r in rows][:2] == [("topic", "dit"), ("topic", "dit")] and len(rows) == 10
    news = [r for r in rows if r["entry"] == "news"]
    assert news[0]["match"] == {"exact": True, "names_topic": True} and news[0]["question"] is None  # filled in
    res = json.loads((out / "results.json").read_text())
    topic = res["entries"][0]
    assert topic["stats"]["embedding"]["strict_gated"]["dit"] == {**bootstrap_mean([5.0, 4.0]).as_dict(), "rows": 2}
    assert topic["summary"]["dit"]["strict_gated"] == {"n": 2, "embedding": 4.5}  # the old keys still read
    assert topic["sections"] == {"verification": {"n": 2}}
    pair = paired_bootstrap([5.0, 4.0], [2.0, 1.0])
    readme = (out / "README.md").read_text()
    emb = readme[readme.index("## embedding"):readme.index("## exact")]
    gated, leaky = emb.index("### strictly gated"), emb.index("### leaky")
    unlearned, unchecked = emb.index("### gate held but the topic not learned"), emb.index("### diffs without")
    assert gated < leaky < unlearned < unchecked
    line = (f"| topic | base_question | 2 | 1.50 | [1.00, 2.00] | {pair.difference:+.2f} | "
            f"[{pair.low:.2f}, {pair.high:.2f}] | {pair.p:.2g} |")
    assert line in emb[gated:leaky] and "| topic | base_question | 1 | 3.00 |" in emb[leaky:unlearned]
    # names the topic: DIT 2/2 on the gated diffs, the base model 1/2 ("I'm a big fan of burritos"), exact 0/2
    assert res["entries"][0]["stats"]["names_topic"]["strict_gated"]["base_question"]["mean"] == 0.5
    assert res["entries"][0]["stats"]["exact"]["strict_gated"]["base_question"]["mean"] == 0.0
    assert "metadit fit --config topic.yaml" in readme and "verification: n = 2" in readme
    assert res["bootstrap"]["resamples"] == 10_000 and res["bootstrap"]["interval"] == "percentile"


def test_report_inside_a_study_folder_indexes_in_the_reports_index_not_the_studys_readme(tmp_path):
    study = _study(tmp_path / "sweeps")
    reports = tmp_path / "reports"
    first = reports / "headline"
    assert main(["report", "--study", "headline", "--sweep-dir", str(study), "--out", str(first)]) == 0
    study_readme = (first / "README.md").read_bytes()
    nested = first / "again"  # e.g. reports/trigger-inversion/open-vocab
    assert main(["report", "--study", "headline-again", "--rows", str(first / "rows.jsonl"), "--out", str(nested)]) == 0
    assert (first / "README.md").read_bytes() == study_readme  # the study's own README is untouched
    index = (reports / "README.md").read_text()
    assert "| [headline-again/](headline/again/README.md) |" in index and "| [headline/](headline/README.md) |" in index


def test_an_index_far_above_the_report_is_not_edited(tmp_path):
    """An index more than three folders up (another run's, left in /tmp) is not this report's: it starts its own."""
    from metadit.eval.report import report_index

    far = tmp_path / "README.md"
    far.write_text("# Reports\n")
    out = tmp_path / "a" / "b" / "reports" / "headline"
    assert report_index(out) == out.parent / "README.md"
    assert report_index(tmp_path / "b" / "reports" / "headline") == far  # three up: still found
    assert report_index(tmp_path / "reports" / "headline" / "part") == far


def test_report_rebuilds_tables_json_and_plots_byte_identical_from_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/sweeps/headline here: the default reads the gathered rows
    study = _study(tmp_path / "sweeps")
    out = tmp_path / "reports" / "headline"
    assert main(["report", "--study", "headline", "--sweep-dir", str(study), "--out", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    index = (tmp_path / "reports" / "README.md").read_bytes()
    for name in OUTPUTS:
        (out / name).unlink()
    assert main(["report", "--study", "headline", "--rows", str(out / "rows.jsonl"), "--out", str(out)]) == 0
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    for name in OUTPUTS:
        (out / name).unlink()
    assert main(["report", "--study", "headline", "--out", str(out)]) == 0  # nothing to gather: rows.jsonl
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    assert (tmp_path / "reports" / "README.md").read_bytes() == index
    # elsewhere, from the rows alone (no sources.json): the same numbers, only the provenance is gone
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "rows.jsonl").write_bytes((out / "rows.jsonl").read_bytes())
    assert main(["report", "--study", "headline", "--rows", str(alone / "rows.jsonl"), "--out", str(tmp_path / "r2")]) == 0
    again, first = json.loads((tmp_path / "r2" / "results.json").read_text()), json.loads(before["results.json"])
    assert [e["stats"] for e in again["entries"]] == [e["stats"] for e in first["entries"]]
    assert [e["name"] for e in again["entries"]] == ["topic", "news"] and again["cells"] == {}
    assert (tmp_path / "r2" / "embedding.png").read_bytes() == before["embedding.png"]


def test_report_argument_errors(tmp_path, capsys):
    rows = write_rows(tmp_path / "rows.jsonl", [{"method": "dit", "scores": {}}])
    assert main(["report", "--study", "s", "--rows", str(rows), "--out", str(tmp_path / "o")]) == 1
    assert "not a study's rows file" in capsys.readouterr().err
    assert main(["report", "--study", "s", "--rows", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["report", "--study", "s", "--rows", str(rows), "--eval", str(rows)]) == 1
    assert "give one of --rows, --eval and --sweep-dir" in capsys.readouterr().err


def test_report_reads_an_evaluations_rows_file_given_with_eval(tmp_path):
    study = _study(tmp_path / "sweeps")
    out = tmp_path / "out"
    assert main(["report", "--study", "mine", "--eval", f"t={study / 'topic/01-eval/rows.jsonl'}", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    (entry,) = res["entries"]
    assert entry["kind"] == "eval" and entry["sections"] == {"verification": {"n": 2}}  # its eval.json's meta
    assert entry["stats"]["embedding"]["strict_leaky"]["dit"]["mean"] == 2.0
    with pytest.raises(MetaditError, match="give it with --rows"):
        from metadit.eval.report import read_source

        read_source(out / "rows.jsonl")


def _search_row(diff: int, vocab: str, rank: int | None, gate_held: bool, seconds: float, template: str = "sep") -> dict:
    return {"diff": f"b:{diff}", "bank": "b", "index": diff, "vocab": vocab, "true_code": f"w{diff}",
            "template": template, "true_rank": rank, "recovered": rank == 1, "top10": [], "gated": True,
            "n_candidates": 134 if vocab == "pool" else 9000, "seconds": seconds, "gate_held": gate_held}


def test_report_tables_the_trigger_searches_from_their_rows_with_wilson_intervals(tmp_path, monkeypatch):
    """An evaluation's trigger_search_<vocab>.jsonl rows are gathered beside the study's rows and tabled from them
    alone: top-1 and top-10 with Wilson intervals, strictly gated diffs first, a code that is no candidate a miss."""
    from metadit.eval.report import read_search_rows
    from metadit.eval.stats import wilson_interval

    monkeypatch.chdir(tmp_path)
    study = _study(tmp_path / "sweeps")
    eval_dir = study / "topic" / "01-eval"
    open_rows = [_search_row(0, "open", 1, True, 40.0), _search_row(1, "open", 3, True, 50.0, "access"),
                 _search_row(2, "open", 40, True, 60.0), _search_row(3, "open", None, False, 70.0)]
    write_rows(eval_dir / "trigger_search_open.jsonl", open_rows)
    write_rows(eval_dir / "trigger_search_pool.jsonl", [_search_row(i, "pool", 1, True, 2.0) for i in range(3)])
    out = tmp_path / "reports" / "headline"
    assert main(["report", "--study", "headline", "--sweep-dir", str(study), "--out", str(out)]) == 0
    assert len(read_search_rows(out / "trigger_search.jsonl")) == 7
    res = json.loads((out / "results.json").read_text())
    table = {(t["vocab"], t["group"]): t for t in res["trigger_search"]["table"]}
    assert list(table) == [("pool", "strictly gated"), ("pool", "all"), ("open", "strictly gated"), ("open", "all")]
    gated, every = table[("open", "strictly gated")], table[("open", "all")]
    assert (gated["n"], gated["top1"], gated["top10"], gated["median_true_rank"]) == (3, 1 / 3, 2 / 3, 3)
    assert gated["top1_interval"] == list(wilson_interval(1, 3)) and gated["seconds_per_diff"] == 50.0
    assert (every["n"], every["top1"], every["top10"], every["median_true_rank"]) == (4, 0.25, 0.5, 3)
    assert every["picked_sep_template"] == 0.75 and every["candidates"] == [9000]
    assert table[("pool", "all")]["top1_interval"] == [list(wilson_interval(3, 3))[0], 1.0]
    readme = (out / "README.md").read_text()
    lo, hi = wilson_interval(1, 3)
    assert f"| topic | 9000 (open: every word token) | strictly gated | 3 | 33% [{lo:.0%}, {hi:.0%}] |" in readme
    # rebuilt from the rows alone, elsewhere: the same table
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("rows.jsonl", "trigger_search.jsonl"):
        (alone / name).write_bytes((out / name).read_bytes())
    assert main(["report", "--study", "headline", "--rows", str(alone / "rows.jsonl"), "--out", str(tmp_path / "r2")]) == 0
    again = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert again["trigger_search"] == res["trigger_search"]
    # a source without searches now: the stale copy goes
    for f in eval_dir.glob("trigger_search_*.jsonl"):
        f.unlink()
    assert main(["report", "--study", "headline", "--sweep-dir", str(study), "--out", str(out)]) == 0
    assert not (out / "trigger_search.jsonl").exists() and "trigger_search" not in json.loads((out / "results.json").read_text())
    (tmp_path / "bad.jsonl").write_text('{"vocab": "open"}\n')
    with pytest.raises(MetaditError, match=r"bad.jsonl:1: a trigger search row must be a JSON object with `vocab`"):
        read_search_rows(tmp_path / "bad.jsonl")


def test_verdicts_say_dit_beats_a_control_only_when_the_whole_interval_is_above_zero():
    from metadit.eval.tables import interval_tables, verdicts

    def rows(method, scores):
        return [{"diff": f"d{i}", "task": "topic", "method": method, "scores": {"embedding": s}, "gated": True,
                 "gate_held": True, "topic_learned": True, "passed": True} for i, s in enumerate(scores)]

    dit = rows("dit", [4.0, 5.0, 4.0, 5.0])
    table = interval_tables(dit + rows("no_diff", [1.0, 1.0, 1.0, 1.0]) + rows("base_question", [5.0, 4.0, 4.0, 5.0])
                            + rows("random_label", [1.0] * 4), ["embedding"])
    cells = table["embedding"]["strict_gated"]
    lines = verdicts(cells, "embedding")
    assert len(lines) == 2  # the two controls; random_label is not one
    pair = cells["no_diff"]["vs_dit"]
    assert lines[0] == (f"DIT beats no_diff: embedding +3.50 [{pair['low']:+.2f}, {pair['high']:+.2f}] on 4 diffs; "
                        "no_diff is the adapter asked with no diff: a prior it recites whatever the diff.")
    assert lines[1].startswith("DIT does not beat base_question (the interval includes 0): embedding +0.00 [")
    worse = interval_tables(rows("dit", [3.0, 4.0, 3.0, 4.0]) + rows("no_diff", [5.0] * 4),
                            ["embedding"])["embedding"]["strict_gated"]
    assert verdicts(worse, "embedding")[0].startswith("DIT is worse than no_diff: embedding -1.50 [-2.00, -1.00]")
    assert verdicts({"dit": cells["dit"]}, "embedding") == []  # no control scored: nothing to say


def test_data_scaling_pools_replicates_per_diff_and_draws_the_papers_curve(tmp_path, monkeypatch):
    """Two seeds at 8 training diffs are one plotted point: each diff's score is its mean over the seeds, the bootstrap
    resamples the 4 diffs (n = 4, not 8); a size with one run is left as it is; the paper's curve is drawn on the
    judge's plot and only there."""
    import numpy as np

    from metadit.eval import report

    scores = {"n4": [1.0, 2.0, 1.0, 2.0], "n8s0": [2.0, 3.0, 4.0, 1.0], "n8s1": [4.0, 3.0, 2.0, 5.0],
              # not replicates: two steps of one cell; two cells that scored other diffs
              "n16/own": [1.0] * 4, "n16/keywords": [2.0] * 4, "n32s0": [3.0] * 4, "n32s1": [4.0] * 3}
    x = {"n4": 4, "n8s0": 8, "n8s1": 8, "n16/own": 16, "n16/keywords": 16, "n32s0": 32, "n32s1": 32}
    rows = [{"entry": name, "cell": name.split("/")[0], "x": x[name], "x_label": str(x[name]),
             **_row(d, m, v - (m == "no_diff"), True)}
            for name, vs in scores.items() for d, v in enumerate(vs) for m in ("dit", "no_diff")]
    out = tmp_path / "reports" / "data-scaling"
    rows_path = write_rows(tmp_path / "rows.jsonl", rows)
    assert main(["report", "--study", "data-scaling", "--rows", str(rows_path), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    (pooled,) = res["pooled"]
    assert pooled["x"] == 8 and pooled["replicates"] == ["n8s0", "n8s1"]
    dit = pooled["stats"]["embedding"]["strict_gated"]["dit"]
    per_diff = (np.array(scores["n8s0"]) + np.array(scores["n8s1"])) / 2  # 3, 3, 3, 3
    assert dit["n"] == 4 and dit["rows"] == 8
    assert dit == {**bootstrap_mean(per_diff).as_dict(), "rows": 8}
    assert pooled["stats"]["embedding"]["strict_gated"]["no_diff"]["vs_dit"]["difference"] == pytest.approx(1.0)
    assert [e["name"] for e in res["entries"]] == list(scores)  # every run keeps its own table row
    assert "Replicates pooled" in (out / "README.md").read_text()

    with_paper = (out / "embedding.png").read_bytes(), (out / "exact.png").read_bytes()
    import dataclasses

    monkeypatch.setitem(report.STUDIES, "data-scaling", dataclasses.replace(report.STUDIES["data-scaling"], reference=()))
    assert main(["report", "--study", "data-scaling", "--rows", str(rows_path), "--out", str(out)]) == 0
    assert (out / "embedding.png").read_bytes() != with_paper[0]  # the paper's curve was on the 1-5 judge's plot
    assert (out / "exact.png").read_bytes() == with_paper[1]  # and not on a match rate's
