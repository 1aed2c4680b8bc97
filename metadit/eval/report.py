"""`metadit report`: a study's results as `reports/<study>/{rows.jsonl, sources.json, results.json, README.md, *.png}`.

Two stages. **Gathering**: every `eval.json` (`metadit eval`) and `test_predictions.json` (written by `metadit test`
before it reported losses only; committed reports read them) under
each cell of a sweep directory, or the files given with `--eval`, read as per-item rows (`metadit.eval.rows`:
the `rows.jsonl` an evaluation writes beside its results, else the rows of the result file itself) — one
*entry* per source and task, named after its cell, or `cell/step` when a cell has several — into
`OUT/rows.jsonl` (every row tagged with its `entry`, `cell` and plot position `x`) and `OUT/sources.json` (where
the rows came from: each cell's run info — commands, commit, fit config, seeds, machine, wall time — and each
source's info, config and sections). **Tables**: results.json, README.md and the plots are computed from
`rows.jsonl` alone (sources.json adds only the provenance lines), so `metadit report --study S --rows
OUT/rows.jsonl` rebuilds them byte for byte. Every table gives n, the mean and its 95 % bootstrap interval, and
DIT minus each method by a paired bootstrap where both scored the same diffs (`metadit.eval.stats`,
`metadit.eval.tables`), split by the bank's strict gate check: strictly gated diffs first, the others apart.
Known studies (`STUDIES`) say how to plot; any other name still gets tables and grouped bars.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metadit.errors import MetaditError
from metadit.eval.results import GROUPS, summarize, write_json
from metadit.eval.rows import STRICT_GROUPS, as_row, metrics, read_jsonl, read_rows, strict_group, write_rows
from metadit.eval.rows import rows_from_test_predictions as _rows_from_test_predictions
from metadit.eval.stats import CONFIDENCE, METHOD, RESAMPLES, SEED, bootstrap_mean, wilson_interval
from metadit.eval.trigger_search import summarize_search
from metadit.eval.tables import REFERENCE, SCORE_ORDER, cluster_means, interval_tables  # noqa: F401  (SCORE_ORDER: re-exported)
from metadit.eval.tables import score_names as _row_score_names

RUBRIC = ("judge", "llm", "embedding")  # scores on the 1-5 scale
ROWS_FILE, SOURCES_FILE = "rows.jsonl", "sources.json"
SEARCH_FILE = "trigger_search.jsonl"  # the white-box trigger searches' per-diff rows, every entry's, tagged with it
SEARCH_VOCABS = ("pool", "open")  # an evaluation writes trigger_search_<vocab>.jsonl beside its eval.json
ENTRY_KEYS = ("entry", "cell", "x", "x_label")  # what gathering adds to each row: its entry and plot position


@dataclass(frozen=True)
class StudyPlot:
    kind: str = "bars"  # "line": score vs the cells' grid value; "bars": grouped bars, entry × method
    x_label: str = ""
    x_log: bool = False
    title: str = ""
    # Another setting's curve drawn beside ours on the 1-5 judge scores: (x, score) points and what they are.
    reference: tuple[tuple[float, float], ...] = ()
    reference_label: str = ""


# DIT's data-scaling curve in the paper (Goel, Kim, Shavit, Wang 2025, "Learning to Interpret Weight Differences in
# Language Models", arXiv:2510.05092; the points as issue 12 quotes them from its data-scaling figure): hidden-topic
# diffs of Qwen3-4B scored by an LLM judge — another model and another judge than ours.
PAPER_DATA_SCALING = ((36, 2.32), (72, 3.24), (145, 3.78), (291, 4.17), (582, 4.49), (4660, 4.78))

STUDIES: dict[str, StudyPlot] = {
    "data-scaling": StudyPlot("line", "training diffs", x_log=True, title="held-out score vs number of training diffs",
                              reference=PAPER_DATA_SCALING,
                              reference_label="paper's DIT (Qwen3-4B, LLM judge: another model and judge)"),
    "rank-generalization": StudyPlot("line", "rank of the evaluated diffs (DIT trained on rank 1)",
                                     title="held-out score vs LoRA rank of the diffs"),
    "ood-trigger": StudyPlot(title="diffs with triggers unseen in training"),
    "cross-behavior": StudyPlot(title="train on one behaviour, evaluate on another"),
    "encoder-ablation": StudyPlot(title="diff applied (dit) vs diff encoded (encoder) vs both"),
    "trigger-inversion": StudyPlot(title="recovering the trigger"),
    "headline": StudyPlot(title="DIT against the baselines"),
}


@dataclass
class Entry:
    name: str
    cell: str
    source: str
    kind: str  # "eval" | "test"
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)  # eval.json's info / config / sections
    params: dict[str, Any] = field(default_factory=dict)
    x: Any = None
    x_label: str = ""
    task: str | None = None

    _stats: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.rows)

    @property
    def stats(self) -> dict[str, Any]:
        """`metadit.eval.tables.interval_tables` of the rows (computed once)."""
        if self._stats is None:
            self._stats = interval_tables(self.rows)
        return self._stats


# ---------------------------------------------------------------------- reading sources
def rows_from_test_predictions(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`metadit test` rows as eval rows (no gate information there: the verdicts are None)."""
    return _rows_from_test_predictions(preds)


def _beside(path: Path, n: int) -> list[dict[str, Any]] | None:
    """The rows.jsonl an evaluation wrote beside `path`, when it holds the same number of rows (a stale or foreign
    one is ignored: the source's own rows are read instead)."""
    rows_file = path.parent / ROWS_FILE
    if not rows_file.is_file():
        return None
    rows = read_rows(rows_file)
    return [as_row(r) for r in rows] if len(rows) == n else None


def read_source(path: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(kind, rows, meta) from an eval.json, a test_predictions.json or an evaluation's rows.jsonl; rows in the
    `metadit.eval.rows` schema (the rows.jsonl beside a result file when there is one)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        raw = read_rows(path)
        if any("entry" in r for r in raw):
            raise MetaditError(f"{path}: a study's rows file (its rows name their entry): give it with --rows")
        rows = [as_row(r) for r in raw]
        for name in ("eval.json", "test_predictions.json"):  # its result file, for the kind and the meta
            if (path.parent / name).is_file():
                kind, _, meta = read_source(path.parent / name)
                return kind, rows, meta
        return "rows", rows, {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MetaditError(f"{path}: cannot read ({e})") from e
    if isinstance(data, list):
        rows = rows_from_test_predictions(data)
        return "test", _beside(path, len(rows)) or rows, {}
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        for i, r in enumerate(data["rows"]):
            if not isinstance(r, dict) or "method" not in r:
                raise MetaditError(f"{path}: row {i} has no `method`")
        meta = {k: data[k] for k in ("info", "config", "sections", "headline_judge") if k in data}
        return "eval", _beside(path, len(data["rows"])) or [as_row(r) for r in data["rows"]], meta
    raise MetaditError(f"{path}: neither an eval.json ({{'rows': [...]}}) nor a test_predictions.json (a list)")


def _sources(cell_dir: Path) -> list[Path]:
    found = [p for pat in ("eval.json", "test_predictions.json") for p in cell_dir.rglob(pat)
             if "checkpoints" not in p.relative_to(cell_dir).parts]
    return sorted(found, key=lambda p: p.relative_to(cell_dir).parts)


def _step_name(cell_dir: Path, src: Path) -> str:
    first = src.relative_to(cell_dir).parts[0] if len(src.relative_to(cell_dir).parts) > 1 else src.stem
    return re.sub(r"^\d+-", "", first)


def _load_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def cell_info(cell_dir: Path, machine: Any = None) -> dict[str, Any]:
    """What reproduces a cell: its steps' commands, commit, fit config and seeds, machine, wall time."""
    markers = []
    for m in sorted(cell_dir.glob("*.done.json")):
        try:
            markers.append(json.loads(m.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    info: dict[str, Any] = {
        "dir": str(cell_dir),
        "commands": [m.get("command") for m in markers],
        "steps": [{k: m.get(k) for k in ("step", "started", "ended", "wall_time_s", "resumed_from", "log")}
                  for m in markers],
        "wall_time_s": round(sum(float(m.get("wall_time_s") or 0) for m in markers), 1),
        "commit": sorted({str(m.get("commit")) for m in markers if m.get("commit")}),
    }
    if machine is not None:
        info["machine"] = machine
    config = _load_yaml(cell_dir / "run" / "config.yaml")
    if config is not None:
        info["config"] = config
        info["seeds"] = {"seed_everything": config.get("seed_everything"),
                         "model.seed": (config.get("model") or {}).get("seed"),
                         "data.seed": (config.get("data") or {}).get("seed")}
    split = cell_dir / "run" / "split.json"
    if split.is_file():
        try:
            s = json.loads(split.read_text())
            info["split"] = {k: len(s.get(k) or []) for k in ("train", "val", "test")}
        except (OSError, json.JSONDecodeError):
            pass
    return info


def collect_sweep(sweep_dir: Path) -> tuple[list[Entry], dict[str, Any], dict[str, Any]]:
    """Entries and per-cell info from a sweep directory (ROOT/STUDY), in the sweep's cell order."""
    if not sweep_dir.is_dir():
        raise MetaditError(f"{sweep_dir}: no sweep directory (run `metadit sweep` first, or give --sweep-dir / --eval)")
    record: dict[str, Any] = {}
    if (sweep_dir / "sweep.json").is_file():
        try:
            record = json.loads((sweep_dir / "sweep.json").read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
    plan = {c["cell"]: c for c in record.get("plan", [])}
    names = list(plan) + sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name not in plan)
    invocations = record.get("invocations") or [{}]
    machine = (invocations[-1].get("info") or {}).get("machine")
    entries, cells = [], {}
    for name in names:
        cell_dir = sweep_dir / name
        if not cell_dir.is_dir():
            continue
        srcs = _sources(cell_dir)
        info = cell_info(cell_dir, machine)
        info["params"] = plan.get(name, {}).get("params", {})
        info["reads_from"] = plan.get(name, {}).get("deps", [])  # cells whose fit this cell evaluates
        cells[name] = info
        for src in srcs:
            kind, rows, meta = read_source(src)
            ename = name if len(srcs) == 1 else f"{name}/{_step_name(cell_dir, src)}"
            entries += by_task(Entry(ename, name, str(src), kind, rows, meta, dict(info["params"])))
    return entries, cells, record


def collect_files(files: list[str]) -> list[Entry]:
    """Entries from files given directly; `NAME=FILE` names one, else it is named after its directory."""
    entries = []
    paths = []
    for f in files:
        name, sep, path = f.partition("=")
        paths.append((name, path) if sep and not Path(f).exists() else (None, f))
    for name, path in paths:
        p = Path(path)
        if name is None:
            parts = p.resolve().parent.parts
            name = parts[-1]
            others = [Path(q).resolve().parent for n, q in paths if n is None and Path(q) != p]
            depth = 1
            while any(o.parts[-depth:] == parts[-depth:] for o in others) and depth < len(parts):
                depth += 1
                name = "/".join(parts[-depth:])
        kind, rows, meta = read_source(p)
        entries += by_task(Entry(name, name, str(p), kind, rows, meta))
    return entries


def _first_of_each_source(entries: list[Entry]) -> list[Entry]:
    seen: set[str] = set()
    out = []
    for e in entries:
        if e.source not in seen:
            seen.add(e.source)
            out.append(e)
    return out


def by_task(entry: Entry) -> list[Entry]:
    """One entry per task when a source holds several (a topic score and a trigger score never mix)."""
    tasks = list(dict.fromkeys(r.get("task") for r in entry.rows))
    if len(tasks) <= 1:
        entry.task = tasks[0] if tasks else None
        return [entry]
    return [Entry(f"{entry.name} [{t}]", entry.cell, entry.source, entry.kind, [r for r in entry.rows if r.get("task") == t],
                  entry.meta, dict(entry.params), task=t) for t in tasks]


# ---------------------------------------------------------------------- x values (line plots)
REPLICATE_PARAM = "seed"  # the one cell parameter in which replicates of a line study's point differ


def _diffs_scored(e: Entry) -> set[tuple[Any, Any]]:
    return {(r.get("diff"), r.get("task")) for r in e.rows}


def pool_replicates(study: str, entries: list[Entry]) -> list[Entry]:
    """A line study's points: replicates — entries of distinct cells at one (task, x) and step whose cell parameters
    differ only by `seed`, scored on the same diffs — pooled into one entry whose rows are all of theirs, so each
    diff's cluster mean averages its phrasings and its replicates and the bootstrap resamples diffs (the interval is
    over diffs given these seeds; the replicates' own rows show the spread between seeds). Anything else at one x (two
    steps of one cell, other held-out diffs) is left as it is; other studies' entries are returned as they are."""
    if STUDIES.get(study, StudyPlot()).kind != "line":
        return entries
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        step = e.name.split("/", 1)[1] if "/" in e.name else ""
        same = {k: v for k, v in e.params.items() if k != REPLICATE_PARAM}
        groups.setdefault(json.dumps([e.task, e.x, step, same], sort_keys=True, default=str), []).append(e)
    out = []
    for same in groups.values():
        if len(same) == 1 or len({e.cell for e in same}) < len(same) or \
                any(_diffs_scored(e) != _diffs_scored(same[0]) for e in same):
            out.extend(same)
            continue
        first = same[0]
        label = (first.x_label or str(first.x)) + (f" {first.name.split('/', 1)[1]}" if "/" in first.name else "")
        out.append(Entry(f"{label}: {len(same)} replicates pooled", "+".join(e.cell for e in same), first.source,
                         "pooled", [r for e in same for r in e.rows], {}, {"replicates": [e.name for e in same]},
                         first.x, first.x_label, first.task))
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def assign_x(study: str, entries: list[Entry], cells: dict[str, Any]) -> None:
    for e in entries:
        v = e.params.get("value", e.params.get("x"))
        if study == "data-scaling" and not _is_number(v):
            # the cell's own fit, else the evaluated run's training labels (a cell that evaluates another fit)
            n = (cells.get(e.cell, {}).get("split") or {}).get("train") or (e.meta.get("config") or {}).get("train_labels")
            if n:
                e.x, e.x_label = n, f"{n} ({v if v is not None else 'all'})"
                continue
        e.x = v if v is not None else e.cell
        e.x_label = str(e.x)


# ---------------------------------------------------------------------- tables
def score_names(entries: list[Entry]) -> list[str]:
    """Every score of the entries' rows (judges and match columns), the eval's headline judge first."""
    heads = [h for e in entries if (h := e.meta.get("headline_judge"))]
    return _row_score_names([r for e in entries for r in e.rows], heads)


def _num(x: float) -> str:
    return f"{x:.2f}"


def _p(p: float) -> str:
    return f"{p:.2g}"


def _interval(c: dict[str, Any]) -> str:
    return f"[{_num(c['low'])}, {_num(c['high'])}]"


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|")


def groups_with(entries: list[Entry], score: str) -> list[str]:
    """The strict groups some entry has a value of `score` in, in `STRICT_GROUPS` order."""
    return [g for g in STRICT_GROUPS if any(g in e.stats.get(score, {}) for e in entries)]


def markdown_table(entries: list[Entry], score: str, group: str) -> str:
    """n, mean and 95 % interval per (entry, method) in one group of the strict split, and DIT minus the method."""
    lines = [f"| entry | method | n | mean | 95 % interval | {REFERENCE} − method | 95 % interval | p |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        for method, c in (e.stats.get(score, {}).get(group) or {}).items():
            vs = c.get("vs_dit")
            if vs:
                paired = f"{vs['difference']:+.2f}" + (f" (n={vs['n']})" if vs["n"] != c["n"] else "")
                rest = [paired, _interval(vs), _p(vs["p"])]
            else:
                rest = ["–", "–", "–"]
            lines.append(f"| {_md(e.name)} | {_md(method)} | {c['n']} | {_num(c['mean'])} | {_interval(c)} | "
                         + " | ".join(rest) + " |")
    return "\n".join(lines)


def _lenient_cell(rows: list[dict[str, Any]], score: str) -> str:
    vals = list(cluster_means(rows, score).values())  # one value per diff, as in `interval_tables`
    if not vals:
        return "–"
    c = bootstrap_mean(vals)
    return f"{_num(c.mean)} [{_num(c.low)}, {_num(c.high)}] (n={c.n})"


def lenient_table(entries: list[Entry], score: str) -> str | None:
    """The earlier reports' split (the gate judged on no-code answers only), with intervals; None when no row
    carries that verdict."""
    if not any(r.get("gated") is not None for e in entries for r in e.rows):
        return None
    keep = {"all": lambda r: True, "gated": lambda r: r.get("gated") is True, "leaky": lambda r: r.get("gated") is False}
    lines = ["| entry | method | all | gated | leaky |", "|---|---|---:|---:|---:|"]
    for e in entries:
        for method in dict.fromkeys(r["method"] for r in e.rows):
            mine = [r for r in e.rows if r["method"] == method]
            if not any(score in metrics(r) for r in mine):
                continue
            cells = [_lenient_cell([r for r in mine if keep[g](r)], score) for g in GROUPS]
            lines.append(f"| {_md(e.name)} | {_md(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def _methods(entries: list[Entry]) -> list[str]:
    out: list[str] = []
    for e in entries:
        out += [m for m in dict.fromkeys(r["method"] for r in e.rows) if m not in out]
    return out


def plot(study: str, entries: list[Entry], score: str, path: Path, points: list[Entry] | None = None) -> Path:
    """One panel per group of the strict split; every point or bar is a mean with its 95 % bootstrap interval. A line
    study's point pools its replicates (`pool_replicates`; each replicate's own mean is a hollow marker at its x)
    and the study's reference curve, where it has one, is drawn dashed on the 1-5 judge scores. `points`: the
    entries' `pool_replicates`, when the caller has them (their bootstrap is computed once, not once per plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = STUDIES.get(study, StudyPlot())
    all_entries, entries = entries, pool_replicates(study, entries) if points is None else points
    groups = groups_with(entries, score)
    methods = _methods(entries)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        def cell(e: Entry, m: str) -> tuple[float, float, float]:
            c = e.stats.get(score, {}).get(group, {}).get(m)
            return (c["mean"], c["mean"] - c["low"], c["high"] - c["mean"]) if c else (math.nan, 0.0, 0.0)

        def errorbars(sel: list[Entry], m: str) -> tuple[list[float], list[list[float]]]:
            cs = [cell(e, m) for e in sel]
            return [c[0] for c in cs], [[c[1] for c in cs], [c[2] for c in cs]]

        if spec.kind == "line":
            replicates = [e for e in entries if len(e.params.get("replicates") or []) > 1]
            members = {n for e in replicates for n in e.params["replicates"]}
            raw = [e for e in all_entries if e.name in members]
            xs = [e.x for e in entries]
            numeric = all(_is_number(x) for x in xs)
            labels = list(dict.fromkeys(e.x_label or str(e.x) for e in entries))  # categorical: first-seen order
            tasks = list(dict.fromkeys(e.task for e in entries))
            for task in tasks:  # one line per (task, method): a topic and a trigger score never share a line
                sel = sorted([e for e in entries if e.task == task],
                             key=lambda e: e.x if numeric else labels.index(e.x_label or str(e.x)))
                pos = [e.x if numeric else labels.index(e.x_label or str(e.x)) for e in sel]
                for m in methods:
                    means, yerr = errorbars(sel, m)
                    if all(math.isnan(v) for v in means):
                        continue
                    line = ax.errorbar(pos, means, yerr=yerr, marker="o", capsize=3,
                                       label=m if len(tasks) == 1 else f"{m} [{task}]")
                    seeds = [e for e in raw if e.task == task and _is_number(e.x) == numeric]
                    if seeds:  # each replicate's own mean, hollow, in the line's colour
                        ax.scatter([e.x if numeric else labels.index(e.x_label or str(e.x)) for e in seeds],
                                   [cell(e, m)[0] for e in seeds], s=18, facecolors="none",
                                   edgecolors=line[0].get_color(), zorder=3)
            if spec.reference and numeric and score in RUBRIC:
                ax.plot(*zip(*spec.reference), linestyle="--", marker="x", color="0.55", label=spec.reference_label)
                xs = xs + [x for x, _ in spec.reference]
            if numeric and spec.x_log and all(x > 0 for x in xs):
                ax.set_xscale("log", base=2)
            if numeric:
                ticks = sorted({e.x for e in entries})
                ax.set_xticks(ticks, [next(e.x_label or str(e.x) for e in entries if e.x == x) for x in ticks])
            else:
                ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel(spec.x_label or "cell")
        else:
            width = 0.8 / max(1, len(methods))
            for j, m in enumerate(methods):
                means, yerr = errorbars(entries, m)
                ax.bar([i + (j - (len(methods) - 1) / 2) * width for i in range(len(entries))], means, width,
                       yerr=yerr, capsize=2, label=m)
            ax.set_xticks(range(len(entries)), [e.name for e in entries], rotation=20 if len(entries) > 3 else 0,
                          ha="right" if len(entries) > 3 else "center")
        ax.set_title(STRICT_GROUPS[group].title.split(" (")[0], fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    highs = [c["high"] for e in entries for g in e.stats.get(score, {}).values() for c in g.values()]
    lows = [c["low"] for e in entries for g in e.stats.get(score, {}).values() for c in g.values()]
    if score in RUBRIC:
        axes[0][0].set_ylim(0, 5.1)  # the 1-5 scale, bars from zero
    elif lows and min(lows) >= 0:
        axes[0][0].set_ylim(0, 1.05 if max(highs) <= 1 else None)
    axes[0][0].set_ylabel(f"{score} (mean, 95 % interval)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{study}: {spec.title}" if spec.title else study)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: a rebuild is byte-identical
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- writing
def _readme(study: str, description: str, entries: list[Entry], cells: dict[str, Any], scores: list[str],
            plots: dict[str, Path], out: Path, record: dict[str, Any],
            search: list[dict[str, Any]] | None = None, pooled: list[Entry] | None = None) -> str:
    lines = [f"# {study}", ""]
    if description:
        lines += [description, ""]
    lines += [f"Tables computed by `metadit report --study {study}` from the per-item rows [{ROWS_FILE}]({ROWS_FILE}) "
              f"alone (where they came from: [{SOURCES_FILE}]({SOURCES_FILE})); machine-readable: "
              "[results.json](results.json).", ""]
    lines += ["Every cell is a mean over held-out diffs with its 95 % bootstrap interval and n (diffs; a method that "
              "asks every held-out phrasing scores each diff by the mean over its phrasings, and the bootstrap "
              "resamples diffs, not rows). Diffs are split by the "
              "bank's strict behaviour check: the strictly gated diffs first, the leaky ones and those whose topic was "
              "not learned apart, never mixed in (– : no such value). "
              f"`{REFERENCE} − method` is DIT's mean minus the method's on the diffs both scored (a paired bootstrap), "
              f"with its two-sided p. {METHOD[0].upper()}{METHOD[1:]}. With few diffs the bootstrap understates the "
              "uncertainty (n = 1: a zero-width interval), so read small cells by their n.", ""]
    for s in scores:
        lines += [f"## {s}", ""]
        for g in groups_with(entries, s):
            lines += [f"### {STRICT_GROUPS[g].title}", "", markdown_table(entries, s, g), ""]
        if pooled and (pooled_groups := groups_with(pooled, s)):
            lines += ["### Replicates pooled (the plotted points)", "",
                      "Entries at one training size and task are replicates (other seeds): pooled, each diff's score is "
                      "its mean over phrasings and replicates, and the bootstrap resamples diffs — an interval over "
                      "diffs for these seeds; the spread between seeds is in the replicates' own rows above.", ""]
            for g in pooled_groups:
                lines += [f"{STRICT_GROUPS[g].title}:", "", markdown_table(pooled, s, g), ""]
        if s in plots:
            lines += [f"![{s}]({os.path.relpath(plots[s], out)})", ""]
    if scores and (lenient := lenient_table(entries, scores[0])) is not None:
        lines += [f"## Lenient split ({scores[0]})", "",
                  "The earlier reports' split, kept for comparison: *gated* here means only that the topic did not show "
                  "in no-code answers (the strict split above is the one to read).", "", lenient, ""]
    if search:
        lines += ["## Trigger search", "",
                  f"White-box trigger inversion, from the per-diff rows [{SEARCH_FILE}]({SEARCH_FILE}): the share of "
                  "diffs whose true code the search ranks first (top-1) and among its first 10, with Wilson 95 % "
                  "intervals. *pool*: the candidates are the bank's own code words and the template is told; *open*: "
                  "every word token of the tokenizer under 4 fixed templates, of which the search picks one.", "",
                  _search_markdown(search), ""]
    section_lines = []
    for e in _first_of_each_source(entries):
        for sec, body in (e.meta.get("sections") or {}).items():
            scalars = {k: v for k, v in body.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)} \
                if isinstance(body, dict) else {}
            shown = ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in scalars.items())
            section_lines.append(f"- {_md(e.cell)} — {_md(sec)}: {_md(shown) or 'see results.json'}")
    if section_lines:
        lines += ["## Further sections", "", "From eval.json's `sections` (full detail in results.json):", "",
                  *section_lines, ""]
    lines += ["## Commands", ""]
    for name, c in cells.items():
        cmds = [x for x in c.get("commands") or [] if x]
        if not cmds:
            continue
        extra = f", seeds {json.dumps(c['seeds'])}" if c.get("seeds") else ""
        lines += [f"{name} ({c.get('wall_time_s', 0)} s{extra}):", "", "```bash", *cmds, "```", ""]
    for e in entries:
        cmd = (e.meta.get("info") or {}).get("command")
        if cmd and not cells.get(e.cell, {}).get("commands"):
            lines += [f"{e.name}:", "", "```bash", cmd, "```", ""]
    lines += ["## How to reproduce", ""]
    if record.get("source"):
        vars_ = record.get("vars") or {}
        default = ((record.get("config") or {}).get("vars") or {})
        over = "".join(f" --var {k}={v}" for k, v in vars_.items() if default.get(k) != v)
        plan = record.get("plan") or [{}]
        root = Path(plan[0]["dir"]).parent.parent if plan[0].get("dir") else Path("runs/sweeps")
        default_root = root == Path("runs/sweeps")
        lines += ["```bash", f"metadit sweep --config {record['source']}{over}" + ("" if default_root else f" --root {root}"),
                  f"metadit report --study {study}" + ("" if default_root else f" --sweep-dir {root / study}"), "```", ""]
        lines += ["The sweep resumes where it stopped; every step's log and done-marker are in its cell directory.", ""]
    lines += [f"The tables again from these rows alone: `metadit report --study {study} --rows DIR/{ROWS_FILE}` "
              "(DIR: this directory).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- gathering rows, reporting from rows
def gather(study: str, entries: list[Entry], cells: dict[str, Any], record: dict[str, Any],
           out: Path) -> tuple[Path, Path]:
    """Write the entries' rows (each tagged with its entry, cell and plot position) to OUT/rows.jsonl and where
    they came from to OUT/sources.json."""
    if not entries:
        raise MetaditError(f"study {study}: no eval.json or test_predictions.json found to report")
    assign_x(study, entries, cells)
    firsts = {id(e) for e in _first_of_each_source(entries)}
    rows_path = write_rows(out / ROWS_FILE, ({"entry": e.name, "cell": e.cell, "x": e.x, "x_label": e.x_label, **r}
                                            for e in entries for r in e.rows))
    search = [{"entry": e.name, "cell": e.cell, **r} for e in _first_of_each_source(entries)
              for vocab in SEARCH_VOCABS
              if (f := Path(e.source).parent / f"trigger_search_{vocab}.jsonl").is_file()
              for r in read_search_rows(f)]
    if search:
        write_rows(out / SEARCH_FILE, search)
    elif (out / SEARCH_FILE).is_file():
        (out / SEARCH_FILE).unlink()  # no source has a search now: a stale copy would be reported
    sources = {
        "study": study,
        "description": record.get("description") or STUDIES.get(study, StudyPlot()).title,
        "sweep": {k: record[k] for k in ("source", "vars", "config", "plan") if k in record},
        "entries": [{"name": e.name, "cell": e.cell, "source": e.source, "kind": e.kind, "task": e.task,
                     "params": e.params,
                     # a source split by task: its info, config and sections are given once, with its first entry
                     **({k: e.meta[k] for k in ("info", "config", "sections", "headline_judge") if k in e.meta}
                        if id(e) in firsts else {})}
                    for e in entries],
        "cells": cells,
    }
    return rows_path, write_json(out / SOURCES_FILE, sources)


def entries_from_rows(rows_path: Path) -> tuple[list[Entry], dict[str, Any], dict[str, Any], str | None]:
    """(entries, cells, sweep record, description) from a study's rows.jsonl and, when it is there, the
    sources.json beside it (without it: the same tables and plots, no provenance)."""
    rows = read_rows(rows_path)
    for i, r in enumerate(rows, 1):
        if "entry" not in r:
            raise MetaditError(f"{rows_path}:{i}: not a study's rows file (no `entry`; give an evaluation's rows.jsonl "
                               "with --eval instead)")
    src_path = rows_path.parent / SOURCES_FILE
    sources: dict[str, Any] = {}
    if src_path.is_file():
        try:
            sources = json.loads(src_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MetaditError(f"{src_path}: cannot read ({e})") from e
    by_entry: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_entry.setdefault(str(r["entry"]), []).append({k: v for k, v in r.items() if k not in ENTRY_KEYS})
    listed = {str(e["name"]): e for e in sources.get("entries") or [] if isinstance(e, dict) and "name" in e}
    entries = []
    for name in [*(n for n in listed if n in by_entry), *(n for n in by_entry if n not in listed)]:
        first = next(r for r in rows if str(r["entry"]) == name)
        info = listed.get(name, {})
        e_rows = by_entry[name]
        entries.append(Entry(name, str(info.get("cell", first.get("cell", name))), str(info.get("source", rows_path)),
                             str(info.get("kind", "rows")), e_rows,
                             {k: info[k] for k in ("info", "config", "sections", "headline_judge") if k in info},
                             dict(info.get("params") or {}), first.get("x", name), str(first.get("x_label") or ""),
                             info.get("task", e_rows[0].get("task"))))
    return entries, sources.get("cells") or {}, sources.get("sweep") or {}, sources.get("description")


def read_search_rows(path: str | Path) -> list[dict[str, Any]]:
    """A trigger search's per-diff rows; a line without `vocab`, `true_rank` and `n_candidates` is an error."""
    rows = []
    for i, r in read_jsonl(path, "trigger search rows"):
        if not isinstance(r, dict) or not {"vocab", "true_rank", "n_candidates"} <= set(r):
            raise MetaditError(f"{path}:{i}: a trigger search row must be a JSON object with `vocab`, `true_rank` and "
                               "`n_candidates`")
        rows.append(r)
    return rows


def search_tables(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trigger searches' table from their per-diff rows alone (`metadit.eval.trigger_search.search_rows`):
    per entry, vocabulary (`pool`: the bank's code words, template told; `open`: every word token, 4 templates)
    and group (strictly gated diffs, then all), n, top-1 and top-10 with Wilson 95 % intervals, the median true
    rank, the candidates and the mean seconds per diff. A true code that is no candidate counts as a miss."""
    out = []
    keys = list(dict.fromkeys((str(r["entry"]), str(r["vocab"]), r.get("prerank")) for r in rows))
    for entry, vocab, prerank in keys:
        mine = [r for r in rows if str(r["entry"]) == entry and str(r["vocab"]) == vocab and r.get("prerank") == prerank]
        # strictly gated: the bank's strict check passed (gate held and topic learned), as in every other table
        strict = [r for r in mine if strict_group({"gate_held": r.get("gate_held"), "passed": r.get("passed")})
                  == "strict_gated"]
        for group, sel in (("strictly gated", strict), ("all", mine)):
            if not sel:
                continue
            table = summarize_search(sel)  # n, top-1, top-10, median rank, s / diff: the evaluation's own table
            n = table["n"]
            hits = {k: round(table[f"top{k}"] * n) for k in (1, 10)}
            out.append({"entry": entry, "vocab": vocab, "prerank": prerank, "group": group, "n": n,
                        "candidates": sorted({int(r["n_candidates"]) for r in sel}),
                        **{f"top{k}": table[f"top{k}"] for k in hits},
                        **{f"top{k}_interval": list(wilson_interval(hits[k], n)) for k in hits},
                        "median_true_rank": table["median_true_rank"],
                        "picked_sep_template": sum(r.get("template") == "sep" for r in sel) / n,
                        "seconds_per_diff": table["seconds_per_diff"]})
    return out


def _search_markdown(table: list[dict[str, Any]]) -> str:
    def share(t: dict[str, Any], k: int) -> str:
        lo, hi = t[f"top{k}_interval"]
        return f"{t[f'top{k}']:.0%} [{lo:.0%}, {hi:.0%}]"

    lines = ["| entry | candidates | diffs | n | top-1 [95 %] | top-10 [95 %] | median rank | template `sep` picked "
             "| s / diff |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        cands = "/".join(map(str, t["candidates"]))
        what = (f"{cands} (pool: the bank's code words)" if t["vocab"] == "pool" else
                f"{cands} (open: every word token{', ' + t['prerank'] + ' pre-ranking' if t.get('prerank') else ''})")
        med = "–" if t["median_true_rank"] is None else f"{t['median_true_rank']:g}"
        secs = "–" if t["seconds_per_diff"] is None else f"{t['seconds_per_diff']:.1f}"
        lines.append(f"| {_md(t['entry'])} | {what} | {t['group']} | {t['n']} | {share(t, 1)} | {share(t, 10)} | {med} "
                     f"| {t['picked_sep_template']:.0%} | {secs} |")
    return "\n".join(lines)


INDEX_TITLE = "# Reports"
INDEX_DEPTH = 3  # reports/STUDY and reports/STUDY/PART index in reports/


def report_index(out: Path) -> Path:
    """The reports index a study's line goes in: the nearest of the three folders above OUT whose README.md is an
    index (it starts with `# Reports`), else OUT/../README.md (created as an index). A study's own README.md is never
    taken for the index: OUT inside a study's folder (reports/trigger-inversion/open-vocab) indexes in reports/. No
    higher: a report written under /tmp/x must not edit an index some other run left in /tmp."""
    for folder in out.resolve().parents[:INDEX_DEPTH]:
        readme = folder / "README.md"
        if readme.is_file() and readme.read_text().startswith(INDEX_TITLE):
            return readme
    return out.parent / "README.md"


def update_index(index: Path, study: str, out: Path, what: str) -> None:
    """Add (or refresh) the study's line in the reports index, keeping every other line."""
    rel = os.path.relpath(out, index.parent)
    line = f"| [{study}/]({rel}/README.md) | {_md(what)} |"
    if index.is_file():
        lines = index.read_text().splitlines()
    else:
        lines = [INDEX_TITLE, "", "Results of real runs of the committed code; each file names the command and "
                 "commit that made it.", ""]
    for i, ln in enumerate(lines):
        if f"]({rel}/README.md)" in ln:
            lines[i] = line
            break
    else:
        rows = [i for i, ln in enumerate(lines) if ln.startswith("|")]
        if rows:
            last = rows[0]
            while last + 1 < len(lines) and lines[last + 1].startswith("|"):
                last += 1
            lines.insert(last + 1, line)
        else:
            lines += ["| report | what |", "|---|---|", line]
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text("\n".join(lines) + "\n")


def make_report(study: str, rows_path: Path, out: Path, console=None) -> dict[str, Any]:
    """results.json, README.md and one plot per score in OUT, computed from a study's rows.jsonl (and its
    sources.json's provenance), and the study's line in the reports index (`report_index`)."""
    entries, cells, record, description = entries_from_rows(Path(rows_path))
    if not entries:
        raise MetaditError(f"{rows_path}: no rows to report")
    description = description if description is not None else STUDIES.get(study, StudyPlot()).title
    scores = score_names(entries)
    out.mkdir(parents=True, exist_ok=True)
    points = pool_replicates(study, entries)  # once: a pooled entry's bootstrap is computed on first use, then kept
    plots = {s: plot(study, entries, s, out / f"{s}.png", points) for s in scores}
    result = {
        "study": study, "description": description,
        "info": {"command": f"metadit report --study {study}", "rows": ROWS_FILE, "sources": SOURCES_FILE},
        "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "confidence": CONFIDENCE, "interval": "percentile",
                      "paired_against": REFERENCE, "method": METHOD},
        "groups": {g.name: g.title for g in STRICT_GROUPS.values()},
        "score": scores[0] if scores else None,
        "sweep": {k: record[k] for k in ("source", "vars", "plan") if k in record},
        "entries": [{"name": e.name, "cell": e.cell, "source": e.source, "kind": e.kind, "task": e.task, "x": e.x,
                     "params": e.params, "summary": e.summary, "stats": e.stats, **e.meta} for e in entries],
        "cells": cells,
        "plots": {s: p.name for s, p in plots.items()},
    }
    pooled = [e for e in points if e.kind == "pooled"]
    if pooled:
        result["pooled"] = [{"name": e.name, "task": e.task, "x": e.x, "replicates": e.params["replicates"],
                             "stats": e.stats} for e in pooled]
    search = search_tables(read_search_rows(out / SEARCH_FILE)) if (out / SEARCH_FILE).is_file() else []
    if search:
        result["trigger_search"] = {"rows": SEARCH_FILE, "interval": "wilson", "confidence": CONFIDENCE,
                                    "table": search}
    write_json(out / "results.json", result)
    (out / "README.md").write_text(_readme(study, description, entries, cells, scores, plots, out, record, search,
                                           pooled))
    index = report_index(out)
    update_index(index, study, out,
                 f"{description} (`metadit report --study {study}`)" if description else f"`metadit report --study {study}`")
    if console is not None:
        _print_table(console, study, entries, scores[0] if scores else None, out, index)
    return result


def _print_table(console, study: str, entries: list[Entry], score: str | None, out: Path, index: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    if score is not None:
        for group in groups_with(entries, score):
            table = Table(title=escape(f"{study}, {STRICT_GROUPS[group].title}: {score}"))
            for col in ("entry", "method", "n", "mean [95 % interval]", f"{REFERENCE} − method (p)"):
                table.add_column(escape(col), justify="left" if col in ("entry", "method") else "right")
            for e in entries:
                for method, c in (e.stats.get(score, {}).get(group) or {}).items():
                    vs = c.get("vs_dit")
                    table.add_row(escape(e.name), escape(method), str(c["n"]), f"{_num(c['mean'])} {_interval(c)}",
                                  f"{vs['difference']:+.2f} (p={_p(vs['p'])})" if vs else "–")
            console.print(table)
    console.print(escape(f"wrote {out}/{ROWS_FILE}, results.json, README.md and plots; index {index}"))


# ---------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="the study's name (e.g. data-scaling); picks its plots")
    p.add_argument("--sweep-dir", type=Path, help="the sweep's directory (default runs/sweeps/STUDY)")
    p.add_argument("--eval", nargs="+", metavar="[NAME=]FILE", help="report these eval.json / test_predictions.json "
                   "files (or an evaluation's rows.jsonl) instead of a sweep directory")
    p.add_argument("--rows", type=Path, help="rebuild the tables from a study's rows.jsonl (what a report writes: "
                   "OUT/rows.jsonl, with sources.json beside it) instead of gathering them again; the default when "
                   "neither --sweep-dir nor --eval is given and runs/sweeps/STUDY does not exist but OUT/rows.jsonl does")
    p.add_argument("--out", type=Path, help="where rows.jsonl, sources.json, results.json, README.md and plots go "
                   "(default reports/STUDY); the index is the nearest README.md up to three folders above OUT that "
                   "starts with '# Reports', else OUT/../README.md")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    started = time.time()
    console = Console(highlight=False)
    out = args.out or Path("reports") / args.study
    rows_path = args.rows
    if sum(x is not None for x in (args.rows, args.eval, args.sweep_dir)) > 1:
        raise MetaditError("give one of --rows, --eval and --sweep-dir")
    sweep_dir = args.sweep_dir or Path("runs/sweeps") / args.study
    if rows_path is None and not args.eval and args.sweep_dir is None and not sweep_dir.is_dir() \
            and (out / ROWS_FILE).is_file():
        rows_path = out / ROWS_FILE
        console.print(f"no {sweep_dir}: the tables from the rows already gathered in {rows_path}")
    if rows_path is not None:
        rows_path = Path(rows_path)
        if not rows_path.is_file():
            raise MetaditError(f"--rows {rows_path}: no such file")
        if rows_path.resolve() != (out / ROWS_FILE).resolve():  # OUT holds the rows its tables came from
            out.mkdir(parents=True, exist_ok=True)
            (out / ROWS_FILE).write_bytes(rows_path.read_bytes())
            for name in (SOURCES_FILE, SEARCH_FILE):  # what the tables read beside the rows, when it is there
                src = rows_path.parent / name
                if src.is_file():
                    (out / name).write_bytes(src.read_bytes())
                elif (out / name).is_file():
                    (out / name).unlink()
    else:
        if args.eval:
            entries, cells, record = collect_files(args.eval), {}, {}
        else:
            entries, cells, record = collect_sweep(sweep_dir)
        gather(args.study, entries, cells, record, out)
    make_report(args.study, out / ROWS_FILE, out, console)
    console.print(f"[dim]{time.time() - started:.1f} s[/dim]")
    return 0
