"""`metadit report`: a study's results as `reports/<study>/{results.json, README.md, *.png}`.

Sources: every `eval.json` (`metadit eval`) and `test_predictions.json` (`metadit test`, converted to eval rows:
condition → method, exact/similarity → scores) under each cell of a sweep directory, or the files given with
`--eval`. One *entry* per source: named after its cell, or `cell/step` when a cell has several. Each entry is
summarized with `results.summarize` (means over all / gated / leaky rows, with counts); each cell gets its run
info (commands, commit, fit config, seeds, machine, wall time) from the sweep's step markers. Known studies
(`STUDIES`) say how to plot; any other name still gets tables and grouped bars.
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
from metadit.eval.results import GROUPS, run_info, summarize, write_json

# The headline score: eval.json's `headline_judge` when given, else the first of these present.
SCORE_ORDER = ("judge", "llm", "embedding", "exact", "similarity")
RUBRIC = ("judge", "llm", "embedding")  # scores on the 1-5 scale


@dataclass(frozen=True)
class StudyPlot:
    kind: str = "bars"  # "line": score vs the cells' grid value; "bars": grouped bars, entry × method
    x_label: str = ""
    x_log: bool = False
    title: str = ""


STUDIES: dict[str, StudyPlot] = {
    "data-scaling": StudyPlot("line", "training diffs", x_log=True, title="held-out score vs number of training diffs"),
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

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.rows)


# ---------------------------------------------------------------------- reading sources
def rows_from_test_predictions(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`metadit test` rows as eval rows (no gate information there: `gated` is None)."""
    rows = []
    for p in preds:
        if not isinstance(p, dict) or "condition" not in p:
            raise MetaditError("test predictions: every row needs a `condition`")
        rows.append({"diff": p.get("diff"), "bank": None, "index": None, "task": p.get("task"), "truth": p.get("truth"),
                     "method": p["condition"], "prediction": p.get("answer"), "gated": None,
                     "scores": {k: p[k] for k in ("exact", "similarity") if p.get(k) is not None},
                     "extra": {"label": p.get("label")}})
    return rows


def read_source(path: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(kind, rows, meta) from an eval.json or a test_predictions.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MetaditError(f"{path}: cannot read ({e})") from e
    if isinstance(data, list):
        return "test", rows_from_test_predictions(data), {}
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        for i, r in enumerate(data["rows"]):
            if not isinstance(r, dict) or "method" not in r:
                raise MetaditError(f"{path}: row {i} has no `method`")
        meta = {k: data[k] for k in ("info", "config", "sections", "headline_judge") if k in data}
        return "eval", data["rows"], meta
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
    names = {k for e in entries for groups in e.summary.values() for g in groups.values() for k in g if k != "n"}
    head = [h for e in entries if (h := e.meta.get("headline_judge")) in names]
    order = list(dict.fromkeys([*head, *SCORE_ORDER]))
    return [s for s in order if s in names] + sorted(names - set(order))


def _fmt(g: dict[str, Any] | None, score: str) -> str:
    if not g or score not in g:
        return "–"
    return f"{g[score]:.2f} (n={g['n']})"


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|")


def markdown_table(entries: list[Entry], score: str) -> str:
    lines = ["| entry | method | all | gated | leaky |", "|---|---|---:|---:|---:|"]
    for e in entries:
        for method, groups in e.summary.items():
            if not any(score in g for g in groups.values()):
                continue
            lines.append(f"| {_md(e.name)} | {_md(method)} | " + " | ".join(_fmt(groups.get(g), score) for g in GROUPS) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def _methods(entries: list[Entry]) -> list[str]:
    out: list[str] = []
    for e in entries:
        out += [m for m in e.summary if m not in out]
    return out


def plot(study: str, entries: list[Entry], score: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = STUDIES.get(study, StudyPlot())
    groups = [g for g in GROUPS if any(score in (e.summary.get(m, {}).get(g) or {}) for e in entries for m in e.summary)]
    methods = _methods(entries)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        def val(e: Entry, m: str) -> float:
            g = e.summary.get(m, {}).get(group) or {}
            return g.get(score, float("nan"))

        if spec.kind == "line":
            xs = [e.x for e in entries]
            numeric = all(_is_number(x) for x in xs)
            labels = list(dict.fromkeys(e.x_label or str(e.x) for e in entries))  # categorical: first-seen order
            tasks = list(dict.fromkeys(e.task for e in entries))
            for task in tasks:  # one line per (task, method): a topic and a trigger score never share a line
                sel = sorted([e for e in entries if e.task == task],
                             key=lambda e: e.x if numeric else labels.index(e.x_label or str(e.x)))
                pos = [e.x if numeric else labels.index(e.x_label or str(e.x)) for e in sel]
                for m in methods:
                    ax.plot(pos, [val(e, m) for e in sel], marker="o",
                            label=m if len(tasks) == 1 else f"{m} [{task}]")
            if numeric and spec.x_log and all(x > 0 for x in xs):
                ax.set_xscale("log", base=2)
            if numeric:
                ax.set_xticks(sorted({e.x for e in entries}),
                              [next(e.x_label or str(e.x) for e in entries if e.x == x) for x in sorted({e.x for e in entries})])
            else:
                ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel(spec.x_label or "cell")
        else:
            width = 0.8 / max(1, len(methods))
            for j, m in enumerate(methods):
                ax.bar([i + (j - (len(methods) - 1) / 2) * width for i in range(len(entries))],
                       [val(e, m) for e in entries], width, label=m)
            ax.set_xticks(range(len(entries)), [e.name for e in entries], rotation=20 if len(entries) > 3 else 0,
                          ha="right" if len(entries) > 3 else "center")
        ax.set_title(f"{group} diffs" if group != "all" else "all held-out diffs")
        ax.grid(True, axis="y", alpha=0.3)
    vals = [g[score] for e in entries for groups in e.summary.values() for g in groups.values() if score in g]
    if score in RUBRIC:
        axes[0][0].set_ylim(0, 5.1)  # the 1-5 scale, bars from zero
    elif vals and min(vals) >= 0:
        axes[0][0].set_ylim(0, 1.05 if max(vals) <= 1 else None)
    axes[0][0].set_ylabel(score)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{study}: {spec.title}" if spec.title else study)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- writing
def _readme(study: str, description: str, entries: list[Entry], cells: dict[str, Any], scores: list[str],
            plots: dict[str, Path], out: Path, record: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [f"# {study}", ""]
    if description:
        lines += [description, ""]
    lines += [f"Written by `{info['command']}` on {info['date']} (commit `{info['commit']}`). "
              "Machine-readable: [results.json](results.json).", ""]
    lines += ["Mean score over held-out diffs per method; *gated* diffs hide the behaviour without their trigger, "
              "*leaky* ones show it anyway (the two are never mixed; – : no such rows).", ""]
    for s in scores:
        lines += [f"## {s}", "", markdown_table(entries, s), ""]
        if s in plots:
            lines += [f"![{s}]({os.path.relpath(plots[s], out)})", ""]
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
    else:
        lines += ["```bash", info["command"], "```", ""]
    return "\n".join(lines)


def update_index(index: Path, study: str, out: Path, what: str) -> None:
    """Add (or refresh) the study's line in the reports index, keeping every other line."""
    rel = os.path.relpath(out, index.parent)
    line = f"| [{study}/]({rel}/README.md) | {_md(what)} |"
    if index.is_file():
        lines = index.read_text().splitlines()
    else:
        lines = ["# Reports", "", "Results of real runs of the committed code; each file names the command and "
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


def make_report(study: str, entries: list[Entry], cells: dict[str, Any], record: dict[str, Any], out: Path,
                started: float | None = None, console=None) -> dict[str, Any]:
    if not entries:
        raise MetaditError(f"study {study}: no eval.json or test_predictions.json found to report")
    assign_x(study, entries, cells)
    scores = score_names(entries)
    out.mkdir(parents=True, exist_ok=True)
    plots = {s: plot(study, entries, s, out / f"{s}.png") for s in scores}
    info = run_info(started)
    firsts = {id(e) for e in _first_of_each_source(entries)}
    description = record.get("description") or STUDIES.get(study, StudyPlot()).title
    result = {
        "study": study, "description": description, "info": info, "score": scores[0] if scores else None,
        "sweep": {k: record[k] for k in ("source", "vars", "plan") if k in record},
        "entries": [{"name": e.name, "cell": e.cell, "source": e.source, "kind": e.kind, "task": e.task, "x": e.x,
                     "params": e.params, "summary": e.summary,
                     # a source split by task: its info, config and sections are given once, with its first entry
                     **({k: e.meta[k] for k in ("info", "config", "sections", "headline_judge") if k in e.meta}
                        if id(e) in firsts else {})}
                    for e in entries],
        "cells": cells,
        "plots": {s: p.name for s, p in plots.items()},
    }
    write_json(out / "results.json", result)
    (out / "README.md").write_text(_readme(study, description, entries, cells, scores, plots, out, record, info))
    update_index(out.parent / "README.md", study, out,
                 f"{description} (`metadit report --study {study}`)" if description else f"`metadit report --study {study}`")
    if console is not None:
        _print_table(console, study, entries, scores[0] if scores else None, out)
    return result


def _print_table(console, study: str, entries: list[Entry], score: str | None, out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{study}: mean {score} on held-out diffs") if score else escape(study))
    for col in ("entry", "method", *GROUPS):
        table.add_column(col, justify="right" if col in GROUPS else "left")
    for e in entries:
        for method, groups in e.summary.items():
            table.add_row(escape(e.name), escape(method), *(escape(_fmt(groups.get(g), score)) if score else "–"
                                                           for g in GROUPS))
    console.print(table)
    console.print(escape(f"wrote {out}/results.json, README.md and plots; index {out.parent / 'README.md'}"))


# ---------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="the study's name (e.g. data-scaling); picks its plots")
    p.add_argument("--sweep-dir", type=Path, help="the sweep's directory (default runs/sweeps/STUDY)")
    p.add_argument("--eval", nargs="+", metavar="[NAME=]FILE", help="report these eval.json / test_predictions.json "
                   "files instead of a sweep directory")
    p.add_argument("--out", type=Path, help="where results.json, README.md and plots go (default reports/STUDY); "
                   "the index is OUT/../README.md")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    started = time.time()
    if args.eval:
        entries, cells, record = collect_files(args.eval), {}, {}
    else:
        entries, cells, record = collect_sweep(args.sweep_dir or Path("runs/sweeps") / args.study)
    make_report(args.study, entries, cells, record, args.out or Path("reports") / args.study, started,
                Console(highlight=False))
    return 0
