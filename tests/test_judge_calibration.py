"""The judge calibrated on real outputs (`metadit.eval.judge_calibration`): the blind sheet sampled from rows
files (hidden columns, strata counted by hand, seeded, joined back to the rows), the halves' agreement and bias
against a hand computation, the command line end to end with the real MiniLM judge, and the one-line errors."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from metadit.cli import main
from metadit.errors import MetaditError
from metadit.eval import judge_calibration as JC
from metadit.eval import judges as J
from metadit.eval.stats import bootstrap_mean


def _row(method: str, prediction, truth: str, score: int | None, task: str = "topic", diff: str = "bank:0") -> dict:
    scores = {"exact": 0.0, "similarity": 0.5}
    if score is not None:
        scores["embedding"] = float(score)
    return {"diff": diff, "bank": "bank", "index": 0, "task": task, "method": method, "question": "q?",
            "prediction": prediction, "truth": truth, "label": truth, "scores": scores,
            "match": {"exact": False, "names_topic": False}, "gated": True, "gate_held": True, "passed": True}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Distinct pairs per cell (task, method, today's score), the counts the stratification is checked against.
CELLS = {("topic", "dit", 5): 6, ("topic", "dit", 4): 2, ("topic", "dit", 1): 10, ("topic", "no_diff", 1): 10,
         ("topic", "no_diff", 2): 3, ("headline", "dit", 3): 4}


@pytest.fixture
def rows_files(tmp_path) -> list[Path]:
    """Two studies: study `alpha` holds the topic cells plus noise the sheet must skip or merge (a trigger row, a
    missing prediction, duplicates within and across files); `beta` the headline cell and 5 empty predictions."""
    alpha, beta = [], []
    for (task, method, score), count in CELLS.items():
        target = beta if task == "headline" else alpha
        for i in range(count):
            target.append(_row(method, f"{method} guess {score}.{i}", f"truth {i}", score, task=task, diff=f"bank:{i}"))
    alpha.append(_row("dit", "cd-17", "cd-17", None, task="trigger"))  # codes: exact match only, not on the sheet
    alpha.append(_row("dit", None, "truth 0", None))  # no prediction
    alpha.append(_row("random_label", "dit guess 5.0", "truth 0", 5))  # the same pair as a dit row: merged
    alpha.append(_row("dit", "  dit   guess 5.1 ", "truth 1", 5))  # whitespace differs only: merged
    beta.append(_row("dit", "dit guess 5.2", "truth 2", 5, diff="other:2"))  # across files: merged
    for i in range(5):
        beta.append(_row("generated_story", "", f"headline {i}", 1, task="headline"))
    return [_write(tmp_path / "alpha" / "rows.jsonl", alpha), _write(tmp_path / "beta" / "eval" / "rows.jsonl", beta)]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ sheet


def test_water_fill_gives_every_cell_the_same_share_and_the_rest_one_each():
    take = JC.water_fill({"a": 6, "b": 2, "c": 10}, 9, random.Random(0))
    # q = 3 fits (3 + 2 + 3 = 8 <= 9), q = 4 does not (4 + 2 + 4 = 10): one spare item goes to a or c
    assert take["b"] == 2 and sorted([take["a"], take["c"]]) == [3, 4] and sum(take.values()) == 9
    assert JC.water_fill({"a": 6, "b": 2}, 8, random.Random(0)) == {"a": 6, "b": 2}


def test_sheet_is_stratified_blind_and_joins_back_to_the_rows(rows_files, tmp_path):
    out = tmp_path / "sheet"
    info = JC.make_sheet([str(rows_files[0]), f"beta={rows_files[1]}"], out, n=17, seed=3, max_empty=2)
    sheet, key = _jsonl(out / "sheet.jsonl"), _jsonl(out / "key.jsonl")
    assert len(sheet) == len(key) == info["n"] == 17
    # The reader sees the pair and its task, nothing about who wrote it or how it was scored.
    assert all(set(r) == set(JC.SHEET_FIELDS) for r in sheet)
    assert [r["item"] for r in sheet] == list(range(1, 18)) == [r["item"] for r in key]
    # Hand count: cells of 6, 2, 10, 10, 3, 4 and the 2 kept empty pairs (1 cell) — q = 2 gives 2*6 + 2 = 14,
    # q = 3 gives 3 + 2 + 3 + 3 + 3 + 3 + 2 = 19 > 17: every cell 2, three spare items to the cells with more.
    cells = Counter((r["task"], r["method"], r["embedding"]) for r in key)
    assert cells[("topic", "dit", 4)] == 2 and cells[("headline", "generated_story", 1)] == 2
    others = [cells[c] for c in CELLS if c != ("topic", "dit", 4)]
    assert sorted(others) == [2, 2, 3, 3, 3] and sum(cells.values()) == 17
    assert {c["sampled"] for c in info["cells"]} <= {2, 3} and len(info["cells"]) == 7
    assert info["empty_pairs"] == 5 and info["empty_pairs_kept"] == 2
    assert info["skipped_rows"] == {"task trigger (not scored 1-5)": 1, "no prediction or truth": 1, "duplicate pair": 3}
    # Key and sheet join back to the rows they came from.
    by_item = {r["item"]: r for r in sheet}
    for k in key:
        row = json.loads(Path(k["file"]).read_text().splitlines()[k["line"] - 1])
        s = by_item[k["item"]]
        assert (row["method"], row["diff"], row["task"], row["scores"]["embedding"]) == (k["method"], k["diff"], s["task"], k["embedding"])
        assert " ".join(row["prediction"].split()) == s["prediction"] == k["prediction"]
        assert row["truth"] == s["truth"] == k["truth"]
    assert {k["study"] for k in key} == {"alpha", "beta"}
    assert "RUBRICS" not in (out / "rubric.md").read_text() and J.RUBRICS["topic"] in (out / "rubric.md").read_text()


def test_sheet_merges_duplicates_and_keeps_a_few_empty_predictions(rows_files, tmp_path):
    # The whole pool: 35 distinct non-empty pairs and 2 of the 5 empty ones.
    info = JC.make_sheet([str(p) for p in rows_files], tmp_path / "all", n=37, seed=0, max_empty=2)
    key = _jsonl(tmp_path / "all" / "key.jsonl")
    assert info["pool"] == 37 and sum(k["prediction"] == "" for k in key) == 2
    merged = {k["prediction"]: k for k in key}
    assert [a["method"] for a in merged["dit guess 5.0"]["also"]] == ["random_label"]
    assert [a["study"] for a in merged["dit guess 5.2"]["also"]] == ["beta"]
    assert len(merged["dit guess 5.1"]["also"]) == 1 and merged["dit guess 5.0"]["method"] == "dit"
    with pytest.raises(MetaditError, match="only 37 distinct predictions to sample from, fewer than the 38 asked"):
        JC.make_sheet([str(p) for p in rows_files], tmp_path / "more", n=38, seed=0, max_empty=2)


def test_sheet_is_deterministic_by_seed(rows_files, tmp_path):
    files = [str(p) for p in rows_files]
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        JC.make_sheet(files, tmp_path / name, n=20, seed=seed)
    for f in ("sheet.jsonl", "key.jsonl"):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()
    assert (tmp_path / "a" / "sheet.jsonl").read_text() != (tmp_path / "c" / "sheet.jsonl").read_text()


# ------------------------------------------------------------------------------------------------ calibrate


def _key(items: list[tuple[int, str, str]]) -> list[dict]:
    return [{"item": i, "task": task, "method": m, "prediction": f"p{i}", "truth": f"t{i}"} for i, task, m in items]


def test_split_halves_is_stratified_by_task_and_method_and_seeded():
    key = _key([(i, "topic", "a") for i in range(1, 7)] + [(i, "topic", "b") for i in range(7, 11)]
               + [(i, "headline", "a") for i in range(11, 14)])
    half = JC.split_halves(key, seed=1)
    groups = {g: Counter(half[r["item"]] for r in key if (r["task"], r["method"]) == g)
              for g in (("topic", "a"), ("topic", "b"), ("headline", "a"))}
    assert groups[("topic", "a")] == {"fit": 3, "measure": 3} and groups[("topic", "b")] == {"fit": 2, "measure": 2}
    assert sorted(groups[("headline", "a")].values()) == [1, 2]
    assert JC.split_halves(key, seed=1) == half and JC.split_halves(key, seed=2) != half


def test_measure_matches_a_hand_computation():
    # Fitting half: one pair per level, cosines 0.1 .. 0.9 -> thresholds midway, 0.2 0.4 0.6 0.8.
    fit = [(1, 0.1, 1), (2, 0.3, 2), (3, 0.5, 3), (4, 0.7, 4), (5, 0.9, 5)]
    # Measuring half (cosine, label): method a, then b.
    measure_a = [(6, 0.25, 2), (7, 0.65, 3), (8, 0.95, 5)]
    measure_b = [(9, 0.15, 3), (10, 0.45, 3), (11, 0.85, 4)]
    key = _key([(i, "topic", "a") for i, _, _ in fit + measure_a] + [(i, "topic", "b") for i, _, _ in measure_b])
    cos = {i: c for i, c, _ in fit + measure_a + measure_b}
    labels = {i: y for i, _, y in fit + measure_a + measure_b}
    half = {i: "fit" for i, _, _ in fit} | {i: "measure" for i, _, _ in measure_a + measure_b}
    out = JC.measure(key, labels, cos, {"topic": [0.3, 0.5, 0.7, 0.9]}, half=half)
    t = out["tasks"]["topic"]
    assert t["n_fit"] == 5 and t["n_measure"] == 6 and "headline" not in out["tasks"]
    assert t["thresholds"]["fitted"] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # fitted: a 2 4 5 vs labels 2 3 5; b 1 3 5 vs 3 3 4 -> exact 3/6, within one 5/6, differences 0 1 0 -2 0 1
    f = t["fitted"]["overall"]
    assert (f["n"], f["exact"], f["within_1"], f["mean_abs_error"]) == (6, 3 / 6, 5 / 6, 4 / 6)
    # ranks: judge 2 4 5.5 1 3 5.5, label 1 3 6 3 3 5 -> cov 13, variances 17 and 15.5
    assert f["spearman"] == pytest.approx(13 / math.sqrt(17 * 15.5))
    assert f["bias"]["mean"] == pytest.approx(0.0)
    ref = bootstrap_mean([0, 1, 0, -2, 0, 1])
    assert (f["bias"]["low"], f["bias"]["high"]) == pytest.approx((ref.low, ref.high))
    assert t["fitted"]["by_method"]["a"]["bias"]["mean"] == pytest.approx(1 / 3)
    assert t["fitted"]["by_method"]["b"]["bias"]["mean"] == pytest.approx(-1 / 3)
    assert t["fitted"]["by_method"]["a"]["exact"] == pytest.approx(2 / 3) and t["fitted"]["by_method"]["b"]["within_1"] == pytest.approx(2 / 3)
    assert t["fitted"]["targets_met"] == {"within_1": False, "spearman": False}
    # today's thresholds 0.3 0.5 0.7 0.9: a 1 3 5, b 1 2 4 -> exact 3/6, within one 5/6, bias a -1/3, b -1
    d = t["today"]["overall"]
    assert (d["exact"], d["within_1"]) == (3 / 6, 5 / 6) and d["bias"]["mean"] == pytest.approx(-4 / 6)
    assert t["today"]["by_method"]["b"]["bias"]["mean"] == pytest.approx(-1.0)
    assert t["confusion_fitted"][2] == [1, 0, 1, 1, 0]  # label 3: judged 1, 3 and 4
    assert t["label_counts"] == {"1": 1, "2": 2, "3": 4, "4": 2, "5": 2}


def test_measure_marks_targets_met_and_leaves_unlabelled_items_out():
    fit = [(1, 0.1, 1), (2, 0.3, 2), (3, 0.5, 3), (4, 0.7, 4), (5, 0.9, 5)]
    test = [(6, 0.15, 1), (7, 0.35, 2), (8, 0.55, 3), (9, 0.75, 4), (10, 0.95, 5)]
    key = _key([(i, "topic", "a") for i, _, _ in fit + test] + [(11, "topic", "a")])
    cos = {i: c for i, c, _ in fit + test} | {11: 0.5}
    labels = {i: y for i, _, y in fit + test}
    half = {i: "fit" for i, _, _ in fit} | {i: "measure" for i, _, _ in test} | {11: "measure"}
    out = JC.measure(key, labels, cos, {"topic": [0.3, 0.5, 0.7, 0.9]}, half=half)
    assert out["unlabelled"] == 1 and out["labelled"] == 10
    t = out["tasks"]["topic"]
    assert t["fitted"]["overall"]["exact"] == 1.0 and t["fitted"]["targets_met"] == {"within_1": True, "spearman": True}


def test_command_line_end_to_end_with_the_real_embedding_judge(rows_files, tmp_path, capsys):
    sheet = tmp_path / "sheet"
    assert main(["judge", "sheet", "--rows", *map(str, rows_files), "--out", str(sheet), "--n", "24", "--seed", "1"]) == 0
    key = _jsonl(sheet / "key.jsonl")
    # Labels: the rows' recorded score, one lower for no_diff (any labels 1..5 do; the numbers are not checked here).
    labels = [{"item": k["item"], "score": max(1, k["embedding"] - (k["method"] == "no_diff"))} for k in key]
    _write(sheet / "labels.jsonl", labels)
    report_dir = tmp_path / "judges"
    assert main(["judge", "calibrate", "--key", str(sheet / "key.jsonl"), "--labels", str(sheet / "labels.jsonl"),
                 "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "real_outputs.json").read_text())
    assert report["labelled"] == 24 and set(report["tasks"]) == {"topic", "headline"}
    for t in report["tasks"].values():
        assert t["fitted"]["overall"]["n"] == t["n_measure"]
    assert sum(t["n_fit"] + t["n_measure"] for t in report["tasks"].values()) == 24
    md = (report_dir / "REAL_OUTPUTS.md").read_text()
    assert f"Made by `{report['run']['command']}`" in md and "| topic | fitted |" in md and "| headline | today |" in md
    # The fitting half as a calibration file: the judge fitted from it has the report's thresholds.
    cal = J.calibrate(report_dir / "real_outputs_calibration.jsonl")
    for task, t in report["tasks"].items():
        assert [round(x, 4) for x in cal["thresholds"][task]] == pytest.approx(t["thresholds"]["fitted"], abs=2e-4)
    assert "wrote" in capsys.readouterr().out
    # A labelled sheet is never overwritten.
    with pytest.raises(MetaditError, match="labels.jsonl exists: a new sheet there would orphan its labels"):
        JC.make_sheet([str(p) for p in rows_files], sheet, n=24, seed=1)


# ------------------------------------------------------------------------------------------------ errors


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_rows_give_one_line_errors(tmp_path):
    bad = _row("dit", "x", "y", 3)
    del bad["truth"]
    path = _write(tmp_path / "s" / "rows.jsonl", [_row("dit", "a", "b", 2), bad])
    with pytest.raises(MetaditError) as e:
        JC.make_sheet([str(path)], tmp_path / "o", n=1)
    assert f"{path}:2: the row lacks column(s) truth" in _one_line(e)
    path = _write(tmp_path / "t" / "rows.jsonl", [_row("dit", "a", "b", None)])
    with pytest.raises(MetaditError) as e:
        JC.make_sheet([str(path)], tmp_path / "o", n=1)
    assert "has no `embedding` score" in _one_line(e)
    path = _write(tmp_path / "u" / "rows.jsonl", [_row("dit", "a", "b", 2)])
    with pytest.raises(MetaditError) as e:
        JC.make_sheet([str(path)], tmp_path / "o", n=2)
    assert "only 1 distinct predictions to sample from, fewer than the 2 asked" in _one_line(e)


def test_bad_labels_give_one_line_errors(tmp_path, capsys):
    key = tmp_path / "key.jsonl"
    _write(key, _key([(1, "topic", "a"), (2, "topic", "b")]))
    cases = [([{"item": 1, "score": 6}], "labels.jsonl:1: item 1 has score 6; a score is an integer 1..5"),
             ([{"item": 1, "score": 2.5}], "item 1 has score 2.5"),
             ([{"item": 1, "score": 2}, {"item": 9, "score": 2}], "1 labelled item(s) not in the key: 9"),
             ([{"item": 1, "score": 2}, {"item": 1, "score": 3}], "labels.jsonl:2: item 1 is labelled twice"),
             ([{"item": 1}], "a label line is")]
    for labels, message in cases:
        path = _write(tmp_path / "labels.jsonl", labels)
        with pytest.raises(MetaditError) as e:
            JC.read_labels(path, {r["item"] for r in JC.read_key(key)})
        assert message in _one_line(e)
    # Through the command line: exit 1 and one error line.
    _write(tmp_path / "labels.jsonl", [{"item": 1, "score": 0}])
    assert main(["judge", "calibrate", "--key", str(key), "--labels", str(tmp_path / "labels.jsonl"),
                 "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("metadit judge: error:") and "score 0" in err and "\n" not in err
