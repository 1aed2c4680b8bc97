"""`metadit sweep` and `metadit report`: grid expansion, a real tiny sweep (fit + test + eval in subprocesses), resume
after a kill, failing steps, changed steps, and reports from hand-made eval.json files with known means."""

from __future__ import annotations

import csv
import os
import json
import shutil
from pathlib import Path

import pytest

from metadit.cli import main
from metadit.errors import MetaditError
from metadit.eval.results import write_json
from metadit.eval.sweep import Layout, load_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sweep" / "tiny.yaml"


def _yaml(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------- expansion
def test_grid_expands_to_the_expected_cells(tmp_path):
    cfg = _yaml(tmp_path, """
study: demo
vars: {fit_config: configs/fit/tiny_topic.yaml}
cells:
  - name: train
    steps:
      - [fit, --config, "{fit_config}", --data.tasks, [topic, trigger]]
grid:
  - key: data.max_train_diffs
    name: "n{value}"
    values: [8, 16, {name: all, value: null}]
    steps:
      - [fit, --config, "{fit_config}"]
      - [test, --config, "{fit_config}", --ckpt_path, "{best_ckpt}"]
      - {name: own, run: [eval, --run, "{run_dir}", --methods, dit, no_diff]}
  - name: "rank{value}"
    values: [1, full]
    steps:
      - [eval, --run, "{run_dir:train}", --banks, "banks/smol_rank{value}", --note, "{{literal}}"]
""")
    sweep = load_sweep(cfg)
    assert sweep.study == "demo"
    assert [c.name for c in sweep.cells] == ["train", "n8", "n16", "all", "rank1", "rankfull"]
    train, n8, _, all_, rank1, rankfull = sweep.cells
    assert train.steps[0].argv == ["fit", "--config", "configs/fit/tiny_topic.yaml", "--data.tasks", '["topic", "trigger"]']
    assert [s.id for s in n8.steps] == ["00-fit", "01-test", "02-own"]
    # the grid key goes onto the Lightning steps only
    assert n8.steps[0].argv[-2:] == ["--data.max_train_diffs", "8"]
    assert n8.steps[1].argv[-2:] == ["--data.max_train_diffs", "8"] and "{best_ckpt}" in n8.steps[1].argv
    assert "--data.max_train_diffs" not in n8.steps[2].argv
    assert all_.steps[0].argv[-2:] == ["--data.max_train_diffs", "null"] and all_.params == {"value": None}
    assert rank1.params == {"value": 1} and rank1.deps == ["train"] and n8.deps == []
    assert rankfull.steps[0].argv[3:5] == ["--banks", "banks/smol_rankfull"]
    # runtime placeholders: this cell's dirs, another cell's run dir, sweep-managed options, escapes
    layout = Layout(tmp_path / "root", "demo")
    ev = layout.argv("n8", n8.steps[2])
    assert ev[:3] == ["eval", "--run", str(tmp_path / "root/demo/n8/run")]
    assert ev[-2:] == ["--out", str(tmp_path / "root/demo/n8/02-own")]
    fit = layout.argv("n8", n8.steps[0])
    assert fit[fit.index("--trainer.default_root_dir") + 1] == str(tmp_path / "root/demo/n8")
    logger = json.loads(fit[fit.index("--trainer.logger") + 1])
    assert logger["init_args"] == {"save_dir": str(tmp_path / "root/demo/n8"), "name": "", "version": "run"}
    assert "--ckpt_path" not in fit  # nothing to resume from yet
    with pytest.raises(MetaditError, match="no checkpoint"):
        layout.argv("n8", n8.steps[1])
    r = layout.argv("rank1", rank1.steps[0])
    assert r[2] == str(tmp_path / "root/demo/train/run") and r[r.index("--note") + 1] == "{literal}"
    # --var overrides a var; --only pulls in the cells a cell reads from
    assert load_sweep(cfg, {"fit_config": "x.yaml"}).cells[0].steps[0].argv[2] == "x.yaml"
    from metadit.eval.sweep import select

    assert [c.name for c in select(sweep, ["rank1"])] == ["train", "rank1"]


@pytest.mark.parametrize("body, message", [
    ("cells: [{name: a, steps: [[fit, --x, '{nope}']]}]", "unknown placeholder {nope}"),
    ("cells: [{name: a, steps: [[eval, --run, '{run_dir:b}']]}, {name: b, steps: [[fit]]}]", "must be listed before"),
    ("cells: [{name: a, steps: [[fit], [fit]]}]", "at most one fit"),
    ("cells: [{name: a, steps: [[train, --x]]}]", "not a metadit subcommand"),
    ("cells: [{name: a, steps: [[eval, --run, '{run_dir}']]}]", "has no fit step"),
    ("cells: [{name: a, steps: [[gen]]}, {name: a, steps: [[gen]]}]", "two cells are named"),
    ("grid: {values: [1], steps: [[gen]], extra: 1}", "unknown grid field"),
    ("cells: []", "no cells"),
])
def test_bad_sweep_files_are_one_clear_error(tmp_path, body, message):
    with pytest.raises(MetaditError, match=message):
        load_sweep(_yaml(tmp_path, f"study: bad\n{body}\n"))


def test_every_shipped_sweep_config_parses_and_expands(tmp_path):
    configs = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))
    studies = {}
    for c in configs:
        sweep = load_sweep(c)
        studies[sweep.study] = sweep
        assert sweep.cells and sweep.description, c
        layout = Layout(tmp_path, sweep.study)
        for cell in sweep.cells:
            for step in cell.steps:
                argv = layout.argv(cell.name, step, strict=False)
                assert "{" not in " ".join(a for a in argv if not a.startswith("{\"")), (c, argv)
    assert {"data-scaling", "encoder-ablation", "rank-generalization", "ood-trigger", "cross-behavior",
            "trigger-inversion", "headline", "tiny"} <= set(studies)
    scaling = studies["data-scaling"].cells
    assert [c.name for c in scaling] == ["all", "n32", "n64", "n128", "n256", "n512", "n256s1", "n256s2", "n512s1",
                                         "n512s2"]
    # a replicate varies the adapter's seed and the training subset, never the split (data.seed)
    fit = Layout(tmp_path, "data-scaling").argv("n512s2", scaling[-1].steps[0], strict=False)
    assert [fit[fit.index(k) + 1] for k in ("--seed_everything", "--model.seed", "--data.subset_seed")] == ["2"] * 3
    assert fit[fit.index("--data.max_train_diffs") + 1] == "512" and "--data.seed" not in fit
    assert [c.name for c in studies["rank-generalization"].cells] == \
        ["rank1", "rank2", "rank4", "rank8", "rank16", "rankfull"]
    assert [c.name for c in studies["encoder-ablation"].cells] == ["dit", "encoder", "dit+encoder"]
    assert [s.command for s in studies["encoder-ablation"].cells[2].steps] == ["fit", "eval"]


def test_every_shipped_sweep_step_parses_with_its_subcommand_parser(tmp_path):
    """The steps' arguments are what `metadit eval` and LightningCLI accept (parsed, nothing run or loaded)."""
    from metadit.dit.data import DiffQADataModule
    from metadit.dit import DITModule
    from metadit.lightning_cli import DITCLI

    eval_run = pytest.importorskip("metadit.eval.run")

    class ParseOnly(DITCLI):
        def instantiate_classes(self) -> None:
            pass

    eval_parser = eval_run.eval_parser()
    seen = set()
    for c in sorted((ROOT / "configs" / "sweep").glob("*.yaml")):
        sweep = load_sweep(c)
        layout = Layout(tmp_path, sweep.study)
        for cell in sweep.cells:
            for step in cell.steps:
                argv = layout.argv(cell.name, step, strict=False)
                key = (step.command, tuple(a for a in step.argv if "{" not in a))
                if key in seen:  # the grid's cells differ only in a value: parse each shape once
                    continue
                seen.add(key)
                if step.command == "eval":
                    eval_parser.parse_args(argv[1:])
                elif step.command in ("fit", "test"):
                    i = argv.index("--ckpt_path") if "--ckpt_path" in argv else None
                    rest = argv[1:] if i is None else argv[1:i] + argv[i + 2:]  # a subcommand option
                    ParseOnly(DITModule, DiffQADataModule, args=rest, run=False)
    assert {k[0] for k in seen} == {"fit", "test", "eval"}


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert main(["sweep", "--config", str(TINY), "--root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cell n2" in out and "cell all" in out and "metadit fit --config" in out and "[to run] 01-test" in out
    assert not (tmp_path / "tiny").exists()


def test_dry_run_is_snakemakes_view_of_the_markers(tmp_path, capsys):
    """What is done is Snakemake's call: a marker counts while it is not older than the markers it waits for."""
    import os

    cfg = _yaml(tmp_path, """
study: dag
cells:
  - name: train
    steps:
      - [bank, info, x]
      - [bank, verify, x]
  - name: other
    steps:
      - [bank, info, "{cell_dir:train}"]
""")
    sweep = load_sweep(cfg)
    layout = Layout(tmp_path / "root", "dag")
    order = [("train", 0), ("train", 1), ("other", 0)]
    for t, (cell, i) in enumerate(order):
        step = sweep.cell(cell).steps[i]
        m = write_json(layout.marker(cell, step), {"exit_code": 0, "template": step.argv})
        os.utime(m, (1_000_000 + t, 1_000_000 + t))
    args = ["sweep", "--config", str(cfg), "--root", str(tmp_path / "root"), "--dry-run"]

    def states() -> list[str]:
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "Snakemake's dry run" in out
        return [ln.split(":")[0].strip() for ln in out.splitlines() if ln.startswith("  [")]

    assert states() == ["[done] 00-bank", "[done] 01-bank", "[done] 00-bank"]
    first = layout.marker("train", sweep.cell("train").steps[0])
    os.utime(first, (2_000_000, 2_000_000))  # the first step reran after the others: what waits for it reruns
    assert states() == ["[done] 00-bank", "[to run] 01-bank", "[to run] 00-bank"]
    assert not any(p.name.endswith(".log") for p in (tmp_path / "root").rglob("*"))  # nothing ran


def test_dry_run_with_a_relative_root(tmp_path, capsys, monkeypatch):
    """The default root is relative (runs/sweeps): Snakemake, which runs in ROOT/.workflows/STUDY, is still given
    markers it can find (a relative target used to be one it has no rule for)."""
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--config", str(TINY), "--root", "rel/sweeps", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Snakemake's dry run" in out and "MissingRuleException" not in out and "dry run failed" not in out
    assert not any(p.name.endswith(".log") for p in (tmp_path / "rel").rglob("*"))  # nothing ran


def test_snakemake_command_and_engine_arguments(tmp_path, capsys):
    from metadit.eval.sweep import SNAKEFILE, snakemake_command

    layout = Layout(tmp_path, "s")
    targets = [tmp_path / "s" / "a" / "01-test.done.json"]
    cmd = snakemake_command(layout, tmp_path / "plan.json", targets, [])
    assert cmd[1:3] == ["-m", "snakemake"] and cmd[cmd.index("--snakefile") + 1] == str(SNAKEFILE) and SNAKEFILE.is_file()
    assert cmd[cmd.index("--directory") + 1] == str((tmp_path / ".workflows" / "s").resolve())
    assert cmd[cmd.index("--rerun-triggers") + 1] == "mtime" and "--keep-going" in cmd
    # one step at a time with every core: Snakemake sets OMP_NUM_THREADS to a job's threads (default: 1)
    cores = str(os.cpu_count() or 1)
    assert cmd[cmd.index("--cores") + 1] == cores and cmd[cmd.index("--config") + 1] == f"step_threads={cores}"
    assert cmd[-2:] == ["--", str(targets[0])]
    local = snakemake_command(layout, tmp_path / "plan.json", targets, ["--cores", "4"])
    assert "--config" not in local and local[-4:] == ["--cores", "4", "--", str(targets[0])]  # the user's own cores
    mine = snakemake_command(layout, tmp_path / "plan.json", targets, ["--jobs", "8", "--set-resources", "fit:mem_mb=9"],
                             executor="slurm")
    assert "--cores" not in mine and "--config" not in mine and mine[mine.index("--executor") + 1] == "slurm"
    assert mine[-6:] == ["--jobs", "8", "--set-resources", "fit:mem_mb=9", "--", str(targets[0])]
    assert main(["sweep", "--config", str(TINY), "--root", str(tmp_path), "jobs=8"]) == 1
    assert "arguments for Snakemake go after `--`" in capsys.readouterr().err
    assert main(["sweep", "--config", str(TINY), "--root", str(tmp_path), "--dry-run", "--", "--jobs", "2"]) == 0
    assert "cell n2" in capsys.readouterr().out
    import importlib.util

    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        assert main(["sweep", "--config", str(TINY), "--root", str(tmp_path), "--executor", "slurm"]) == 1
        assert "metadit[slurm]" in capsys.readouterr().err


# ---------------------------------------------------------------------- a real tiny sweep
@pytest.fixture(scope="module")
def tiny_bank(tiny_topic_bank):
    return tiny_topic_bank


def _stamps(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file() and p.name != "sweep.json"
            and p.name != ".sweep.lock"}


def test_tiny_sweep_runs_skips_when_done_and_resumes_after_a_kill(tiny_bank, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the sweep's steps name configs/... relative to the project
    args = ["sweep", "--config", str(TINY), "--root", str(tmp_path / "sweeps"), "--var", f"bank={tiny_bank}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    study = tmp_path / "sweeps" / "tiny"
    steps = ("00-fit", "01-test", "02-eval")
    for cell in ("n2", "all"):
        for step in steps:
            marker = json.loads((study / cell / f"{step}.done.json").read_text())
            assert marker["exit_code"] == 0 and marker["wall_time_s"] > 0 and marker["started"] <= marker["ended"]
            assert marker["argv"][0] == step[3:] and (study / cell / f"{step}.log").stat().st_size > 0
            assert marker["threads"] == str(os.cpu_count() or 1)  # every core, not Snakemake's one-thread default
        assert (study / cell / "run" / "adapter" / "adapter_config.json").is_file()
        assert (study / cell / "run" / "checkpoints" / "last.ckpt").is_file()
        # the test reports the held-out loss only; the answers are the evaluation's
        assert not (study / cell / "01-test" / "test_predictions.json").exists()
        assert [r["test/loss"] for r in csv.DictReader(open(study / cell / "01-test" / "metrics.csv")) if r.get("test/loss")]
        rows = json.loads((study / cell / "02-eval" / "eval.json").read_text())["rows"]
        assert {r["method"] for r in rows} == {"dit", "no_diff", "base_question"}
    assert json.loads((study / "n2" / "run" / "split.json").read_text())["train"].__len__() == 2
    test_marker = json.loads((study / "n2" / "01-test.done.json").read_text())
    assert "best-epoch=0.ckpt" in test_marker["command"]  # {best_ckpt} filled from the fit's record
    eval_marker = json.loads((study / "n2" / "02-eval.done.json").read_text())
    assert f"--run {study / 'n2' / 'run'}" in eval_marker["command"]  # {run_dir}: the fit's run directory
    assert "n2 00-fit: done in" in out and "all 01-test: done in" in out and "all 02-eval: done in" in out

    # rerunning does nothing: every marker and log untouched
    before = _stamps(study)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _stamps(study) == before
    assert out.count("done before, skipped") == 6
    assert main(args[:3] + ["--root", str(tmp_path / "sweeps"), "--dry-run", "--var", f"bank={tiny_bank}"]) == 0
    assert capsys.readouterr().out.count("[done]") == 6

    # killed during the 'all' fit after its first checkpoint: its marker, the later steps' markers and output are gone
    for step in steps:
        (study / "all" / f"{step}.done.json").unlink()
    shutil.rmtree(study / "all" / "01-test")
    shutil.rmtree(study / "all" / "02-eval")
    n2_before = {k: v for k, v in _stamps(study).items() if k.startswith("n2/")}
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "n2 00-fit: done before, skipped" in out and "all 00-fit: done in" in out and "all 01-test: done in" in out
    assert "all 02-eval: done in" in out
    assert {k: v for k, v in _stamps(study).items() if k.startswith("n2/")} == n2_before
    fit = json.loads((study / "all" / "00-fit.done.json").read_text())
    assert fit["resumed_from"] == str(study / "all" / "run" / "checkpoints" / "last.ckpt")
    assert "--ckpt_path" in fit["argv"]
    assert list((study / "all" / "run").glob("metrics.before-resume-*.csv"))  # the first attempt's curve is kept
    assert (study / "all" / "02-eval" / "eval.json").is_file()
    # the evaluation wrote its rows beside its results, each with its diff's strict verdict from the bank
    from metadit.bank import DiffBank
    from metadit.eval.rows import read_rows

    rows = json.loads((study / "all" / "02-eval" / "eval.json").read_text())["rows"]
    eval_rows = read_rows(study / "all" / "02-eval" / "rows.jsonl")
    bank = DiffBank.open(tiny_bank)
    assert len(eval_rows) == len(rows) and {r["method"] for r in eval_rows} == {"dit", "no_diff", "base_question"}
    for r, full in zip(eval_rows, rows):
        assert (r["diff"], r["prediction"], r["scores"]["exact"]) == (full["diff"], full["prediction"], full["scores"]["exact"])
        meta = bank.meta(r["index"])
        assert r["bank"] == str(tiny_bank) and (r["gate_held"], r["passed"]) == (meta["gate_held"], meta["passed"])
    assert (study / "all" / "00-fit.log").read_text().count("===== metadit sweep") == 2  # the log appends

    # the report reads the evaluations: means equal a hand computation
    out_dir = tmp_path / "reports" / "tiny"
    assert main(["report", "--study", "tiny", "--sweep-dir", str(study), "--out", str(out_dir)]) == 0
    res = json.loads((out_dir / "results.json").read_text())
    assert [e["name"] for e in res["entries"]] == ["n2", "all"]
    rows = json.loads((study / "n2" / "02-eval" / "eval.json").read_text())["rows"]
    for method in ("dit", "no_diff", "base_question"):
        exact = [r["scores"]["exact"] for r in rows if r["method"] == method]
        got = res["entries"][0]["summary"][method]["all"]
        assert got["n"] == len(exact) and got["exact"] == pytest.approx(sum(exact) / len(exact))
    cell = res["cells"]["n2"]
    assert len(cell["commands"]) == 3 and cell["commands"][0].startswith("metadit fit")
    assert cell["seeds"]["seed_everything"] == 0 and cell["commit"] and cell["wall_time_s"] > 0
    assert cell["params"] == {"value": 2} and "machine" in cell


# ---------------------------------------------------------------------- failures
@pytest.fixture
def small_bank(tmp_path):
    from metadit.bank import DiffBank
    from tests.conftest import random_diff, target_shapes, tiny_llama

    model = tiny_llama()
    bank = DiffBank.create(tmp_path / "bank", base_model=model)
    bank.append(random_diff(target_shapes(model), 1, 0), {"topic": "a"})
    return tmp_path / "bank"


def test_a_failing_step_stops_its_cell_the_sweep_goes_on_and_a_rerun_finishes(small_bank, tmp_path, capsys):
    missing = tmp_path / "later_bank"
    cfg = _yaml(tmp_path, f"""
study: fails
cells:
  - name: flaky
    steps:
      - [bank, info, "{missing}"]
      - [bank, verify, "{missing}"]
  - name: good
    steps:
      - [bank, info, "{small_bank}"]
  - name: needs_flaky
    steps:
      - [bank, info, "{{cell_dir:flaky}}/../../../later_bank"]
""")
    args = ["sweep", "--config", str(cfg), "--root", str(tmp_path / "sweeps")]
    assert main(args) == 1
    out = capsys.readouterr().out
    study = tmp_path / "sweeps" / "fails"
    assert "flaky 00-bank: FAILED" in out and "cell flaky stops" in out and "not a diff bank" in out
    assert "needs_flaky: skipped" in out and "needs cell(s) flaky" in out
    assert "not finished: flaky, needs_flaky" in out
    assert not (study / "flaky" / "00-bank.done.json").exists() and not (study / "flaky" / "01-bank.log").exists()
    assert (study / "good" / "00-bank.done.json").is_file()
    good_log = (study / "good" / "00-bank.log").stat().st_mtime_ns

    shutil.copytree(small_bank, missing)  # the step that failed once now succeeds
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "flaky 00-bank: done in" in out and "flaky 01-bank: done in" in out and "good 00-bank: done before, skipped" in out
    assert "needs_flaky 00-bank: done in" in out
    assert (study / "good" / "00-bank.log").stat().st_mtime_ns == good_log
    assert (study / "flaky" / "00-bank.log").read_text().count("===== metadit sweep") == 2

    # a step edited after it ran is not silently skipped: the cell is reported, the others still count as done
    cfg.write_text(cfg.read_text().replace(f'[bank, info, "{small_bank}"]', f'[bank, verify, "{small_bank}"]'))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "good: error" in out and "changed since it ran" in out and "not finished: good" in out


# ---------------------------------------------------------------------- reports from hand-made files
def _row(method: str, judge: float, gated: bool | None, i: int) -> dict:
    return {"diff": f"d{i}", "bank": "banks/x", "index": i, "task": "topic", "truth": "t", "method": method,
            "prediction": "p", "gated": gated, "scores": {"embedding": judge, "exact": float(judge == 5)}}


# (method, judge, gated) per cell; hand-computed means below
CELLS = {
    "n8": [("dit", 2.0, True), ("dit", 4.0, False), ("dit", 3.0, True), ("no_diff", 1.0, True), ("no_diff", 2.0, False)],
    "n16": [("dit", 5.0, True), ("dit", 4.0, False), ("dit", 3.0, False), ("no_diff", 1.0, True), ("no_diff", 1.0, False)],
    "all": [("dit", 5.0, True), ("dit", 5.0, True), ("dit", 4.0, False), ("no_diff", 1.0, True), ("no_diff", 3.0, False)],
}


def _fake_sweep(root: Path) -> Path:
    study = root / "data-scaling"
    plan = []
    for name, rows in CELLS.items():
        value = None if name == "all" else int(name[1:])
        plan.append({"cell": name, "params": {"value": value}, "deps": [], "dir": str(study / name), "steps": []})
        write_json(study / name / "01-eval" / "eval.json", {
            "info": {"command": f"metadit eval --run {study / name / 'run'}", "commit": "abc"},
            "config": {"methods": ["dit", "no_diff"]}, "headline_judge": "embedding",
            "rows": [_row(m, j, g, i) for i, (m, j, g) in enumerate(rows)],
            "summary": {}, "sections": {"likelihood": {"top1": 0.5}} if name == "all" else {}})
        write_json(study / name / "00-fit.done.json", {"exit_code": 0, "command": "metadit fit --config x.yaml",
                                                       "wall_time_s": 12.5, "commit": "abc", "step": "00-fit"})
    (study / "all" / "run").mkdir()
    (study / "all" / "run" / "split.json").write_text(json.dumps({"train": [f"t{i}" for i in range(100)]}))
    write_json(study / "sweep.json", {"study": "data-scaling", "description": "score vs training diffs",
                                      "source": "configs/sweep/data_scaling.yaml", "vars": {}, "config": {},
                                      "plan": plan, "invocations": []})
    return study


def _mean(xs):
    return sum(xs) / len(xs)


def test_report_means_tables_plots_and_index(tmp_path, capsys):
    study = _fake_sweep(tmp_path / "sweeps")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "README.md").write_text("# Reports\n\n| report | what |\n|---|---|\n| [bench/](bench/README.md) | benchmarks |\n\n"
                                       "Trailing text.\n")
    args = ["report", "--study", "data-scaling", "--sweep-dir", str(study), "--out", str(reports / "data-scaling")]
    assert main(args) == 0
    term = capsys.readouterr().out
    assert "data-scaling" in term and "n16" in term
    res = json.loads((reports / "data-scaling" / "results.json").read_text())
    assert [e["name"] for e in res["entries"]] == ["n8", "n16", "all"] and res["score"] == "embedding"
    for e in res["entries"]:
        rows = CELLS[e["name"]]
        for method in ("dit", "no_diff"):
            for group, keep in (("all", lambda g: True), ("gated", lambda g: g), ("leaky", lambda g: not g)):
                vals = [j for m, j, g in rows if m == method and keep(g)]
                got = e["summary"][method][group]
                assert got["n"] == len(vals) and got["embedding"] == pytest.approx(_mean(vals)), (e["name"], method, group)
    assert [e["x"] for e in res["entries"]] == [8, 16, 100]  # "all": the run's number of training topics
    assert res["entries"][2]["sections"] == {"likelihood": {"top1": 0.5}}
    assert res["cells"]["n8"]["commands"] == ["metadit fit --config x.yaml"] and res["cells"]["n8"]["wall_time_s"] == 12.5

    readme = (reports / "data-scaling" / "README.md").read_text()
    assert "| entry | method | all | gated | leaky |" in readme
    # the lenient split (these rows carry no strict verdict), with 95 % intervals: n8 dit: all (2+4+3)/3 = 3.00 in
    # [2, 4] (each extreme is 1 of 27 equally likely resamples, above 2.5 %), gated (2+3)/2 = 2.50 in [2, 3], leaky 4
    assert "| n8 | dit | 3.00 [2.00, 4.00] (n=3) | 2.50 [2.00, 3.00] (n=2) | 4.00 [4.00, 4.00] (n=1) |" in readme
    assert "| all | no_diff | 2.00 [1.00, 3.00] (n=2) | 1.00 [1.00, 1.00] (n=1) | 3.00 [3.00, 3.00] (n=1) |" in readme
    assert "| n8 | dit | 3 | 3.00 | [2.00, 4.00] |" in readme  # the strict split's table: all of them unchecked
    assert "metadit fit --config x.yaml" in readme and "metadit sweep --config configs/sweep/data_scaling.yaml" in readme
    assert "![embedding](embedding.png)" in readme and "likelihood: top1 = 0.5" in readme
    assert readme.index("## embedding") < readme.index("## exact")  # the headline judge comes first
    for score in ("embedding", "exact"):
        png = (reports / "data-scaling" / f"{score}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        from PIL import Image

        with Image.open(reports / "data-scaling" / f"{score}.png") as im:
            im.verify()

    index = (reports / "README.md").read_text()
    assert "| [bench/](bench/README.md) | benchmarks |" in index and "Trailing text." in index
    assert "[data-scaling/](data-scaling/README.md)" in index
    lines = index.splitlines()
    assert lines.index("| [bench/](bench/README.md) | benchmarks |") + 1 == \
        next(i for i, ln in enumerate(lines) if "data-scaling/README.md" in ln)  # added to the table
    assert main(args) == 0  # a second report refreshes the line, never duplicates it
    assert (reports / "README.md").read_text().count("data-scaling/README.md") == 1


def test_report_on_given_files_and_unknown_study(tmp_path, capsys):
    study = _fake_sweep(tmp_path / "sweeps")
    preds = [{"condition": "dit", "task": "topic", "truth": "a", "answer": "a", "exact": 1.0, "similarity": 0.9,
              "label": "a", "diff": "x"},
             {"condition": "dit", "task": "topic", "truth": "b", "answer": "c", "exact": 0.0, "similarity": float("nan"),
              "label": "b", "diff": "y"},
             {"condition": "no_diff", "task": "topic", "truth": "a", "answer": "z", "exact": 0.0, "similarity": 0.1,
              "label": "a", "diff": "x"}]
    tp = tmp_path / "t" / "test_predictions.json"
    tp.parent.mkdir()
    tp.write_text(json.dumps(preds))
    out = tmp_path / "reports" / "my-study"
    assert main(["report", "--study", "my-study", "--eval", f"first={study / 'n8/01-eval/eval.json'}",
                 str(study / "n16/01-eval/eval.json"), str(tp), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in res["entries"]] == ["first", "01-eval", "t"]
    t = res["entries"][2]
    assert t["kind"] == "test" and t["summary"]["dit"]["all"] == {"n": 2, "exact": 0.5, "similarity": 0.9}
    assert "gated" not in t["summary"]["dit"]  # test predictions carry no gate information
    assert (out / "embedding.png").is_file() and (out / "similarity.png").is_file()
    assert "[my-study/](my-study/README.md)" in (tmp_path / "reports" / "README.md").read_text()
    capsys.readouterr()
    # an eval.json with two tasks gives one entry per task: a topic score and a trigger score never mix
    two = tmp_path / "two" / "eval.json"
    write_json(two, {"rows": [_row("dit", 4.0, True, 0), _row("dit", 2.0, False, 1),
                              {**_row("dit", 0, None, 0), "task": "trigger", "scores": {"exact": 1.0}},
                              {**_row("dit", 0, None, 1), "task": "trigger", "scores": {"exact": 0.0}}],
                     "sections": {"trigger_search": {"n": 2, "recovered_top1": 0.5, "per_diff": []}}})
    assert main(["report", "--study", "trigger-inversion", "--eval", str(two), "--out", str(tmp_path / "r2")]) == 0
    res = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert [(e["name"], e["task"]) for e in res["entries"]] == [("two [topic]", "topic"), ("two [trigger]", "trigger")]
    assert res["entries"][0]["summary"]["dit"]["all"] == {"n": 2, "embedding": 3.0, "exact": 0.0}
    assert res["entries"][1]["summary"]["dit"]["all"] == {"n": 2, "exact": 0.5}
    assert "sections" in res["entries"][0] and "sections" not in res["entries"][1]  # given once per source
    assert "trigger_search: n = 2, recovered_top1 = 0.5" in (tmp_path / "r2" / "README.md").read_text()
    assert main(["report", "--study", "nothing", "--sweep-dir", str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert "no sweep directory" in capsys.readouterr().err
