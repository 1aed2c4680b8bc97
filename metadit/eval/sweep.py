"""`metadit sweep`: run a study — a list of cells, each a few `metadit` steps — resumably, on Snakemake.

A sweep YAML names the study and lists its cells, or a `grid` that expands into cells:

```yaml
study: data-scaling
description: held-out score vs number of training diffs
vars: {bank: banks/smol_topic}          # {bank} in any step; `--var bank=DIR` overrides
cells:                                  # explicit cells ...
  - name: n8
    steps:
      - [fit, --config, configs/fit/smol_topic.yaml, --data.max_train_diffs, "8"]
      - [eval, --run, "{run_dir}", --methods, [dit, no_diff]]   # a YAML list is passed as JSON
grid:                                   # ... and/or a grid (a mapping or a list of them)
  key: data.max_train_diffs             # optional: `--data.max_train_diffs VALUE` on every fit/validate/test/predict
  name: "n{value}"                      # cell names (default "{value}")
  values: [8, 16, {name: all, value: null}]   # a mapping sets the name and further placeholders
  steps:
    - [fit, --config, configs/fit/smol_topic.yaml]
    - {name: own, run: [eval, --run, "{run_dir}"]}   # a step may be named (its log, output dir, report entry)
```

Placeholders: `{value}` and the keys of a mapping value, `vars`, `{cell}`, `{study}`, and, resolved when the
step runs, `{cell_dir}`, `{run_dir}` (the log dir of the cell's fit), `{best_ckpt}`, `{adapter}`; the last four
take another cell's name, `{run_dir:train}`, and that cell then runs first. `{{name}}` is a literal `{name}`.

The expanded plan is a Snakemake workflow (metadit/eval/sweep.smk, one job per step; its state lives in
ROOT/.workflows/STUDY): a step waits for the step before it in its cell, a cell's first step for the last step of
every cell it reads from. Each step is `python -m metadit.cli ...` in a fresh process (run by
`metadit.eval.sweep_step`), its output appended to `CELL_DIR/ID.log`; on success `CELL_DIR/ID.done.json` (argv,
exit code, start, end, wall time) is written atomically: the job's output. Steps whose marker is there and not
older than what they wait for are skipped, so rerunning the same command resumes; once a step reruns, every later
step of its cell reruns too (and the cells that read from it). Lightning steps get `--trainer.default_root_dir
CELL_DIR` and a CSV logger whose directory is fixed (`CELL_DIR/run` for the fit, `CELL_DIR/ID` otherwise); an
unfinished fit resumes from its `last.ckpt` (else its newest checkpoint). `eval` steps get `--out CELL_DIR/ID`
unless they name one. A failing step stops its cell (and the cells that need it); the sweep goes on and exits
non-zero with a summary. A step changed since its marker was written is reported, not rerun (the cell would mix
two configurations). `--dry-run` prints the plan and Snakemake's dry run; `--executor slurm` (with
`pip install 'metadit[slurm]'`) submits each step as a cluster job, and what follows `--` goes to Snakemake as is
(`-- --jobs 8 --set-resources fit:slurm_partition=gpu`, `-- --profile PROFILE`). Locally, steps run one at a
time with every core (Snakemake sets OMP_NUM_THREADS to a job's threads, one by default); `-- --cores N` runs
independent steps side by side, one thread each unless `--set-threads` says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metadit.commands import LIGHTNING_SUBCOMMANDS, SUBCOMMANDS
from metadit.errors import MetaditError

RUNTIME = ("cell_dir", "run_dir", "best_ckpt", "adapter")  # resolved when a step runs
FIT_DIR = "run"  # the fit's log dir inside its cell dir: {run_dir}
_PLACEHOLDER = re.compile(r"(?P<esc>\{\{\w+(?::[\w.+-]+)?\}\})|\{(?P<name>\w+)(?::(?P<ref>[\w.+-]+))?\}")
_NAME_OK = re.compile(r"^[\w.+-]+$")


# ---------------------------------------------------------------------- the plan
@dataclass
class Step:
    id: str  # "00-fit": log, marker and output dir names
    name: str  # "fit", or the step's own name
    argv: list[str]  # a metadit subcommand and its args; static placeholders filled, runtime ones left

    @property
    def command(self) -> str:
        return self.argv[0]


@dataclass
class Cell:
    name: str
    steps: list[Step]
    params: dict[str, Any] = field(default_factory=dict)  # the grid value(s) that made this cell
    deps: list[str] = field(default_factory=list)  # cells whose run dir / checkpoint this cell reads


@dataclass
class Sweep:
    study: str
    description: str
    cells: list[Cell]
    source: str | None = None  # the YAML file
    vars: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise MetaditError(f"study {self.study!r} has no cell {name!r} (cells: {', '.join(c.name for c in self.cells)})")


def _text(v: Any) -> str:
    """A YAML value as a command-line word: null/true/false as jsonargparse reads them, lists as JSON."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _fill_static(s: str, values: dict[str, Any], where: str) -> str:
    """Fill the placeholders known when the sweep is loaded; runtime ones and escaped braces stay as they are."""

    def sub(m: re.Match) -> str:
        name, ref = m.group("name"), m.group("ref")
        if name is None or name in RUNTIME:
            return m.group(0)
        if ref is not None:
            raise MetaditError(f"{where}: {{{name}:{ref}}}: only {', '.join(RUNTIME)} take a cell name")
        if name not in values:
            known = ", ".join(sorted({*values, *RUNTIME}))
            raise MetaditError(f"{where}: unknown placeholder {{{name}}} (known: {known}; "
                              f"write {{{{{name}}}}} for a literal {{{name}}})")
        return _text(values[name])

    return _PLACEHOLDER.sub(sub, s)


def _refs(argv: list[str]) -> set[str]:
    return {m.group("ref") for a in argv for m in _PLACEHOLDER.finditer(a) if m.group("name") in RUNTIME and m.group("ref")}


def _parse_steps(steps: Any, where: str, values: dict[str, Any], key: str | None, key_value: Any) -> list[Step]:
    if not isinstance(steps, list) or not steps:
        raise MetaditError(f"{where}: `steps` must be a non-empty list of [subcommand, args...]")
    out: list[Step] = []
    for i, raw in enumerate(steps):
        w = f"{where}, step {i + 1}"
        name = None
        if isinstance(raw, dict):
            if set(raw) - {"name", "run"} or "run" not in raw:
                raise MetaditError(f"{w}: a step mapping has `run: [subcommand, args...]` and an optional `name`")
            name, raw = raw.get("name"), raw["run"]
        if not isinstance(raw, list) or not raw or not all(isinstance(a, (str, int, float, bool, list, dict)) or a is None
                                                           for a in raw):
            raise MetaditError(f"{w}: expected a list [subcommand, args...], got {raw!r}")
        argv = [_fill_static(_text(a), values, w) for a in raw]
        cmd = argv[0]
        if cmd not in SUBCOMMANDS or cmd == "sweep":
            raise MetaditError(f"{w}: {cmd!r} is not a metadit subcommand a sweep can run "
                               f"(one of: {', '.join(c for c in SUBCOMMANDS if c != 'sweep')})")
        if key is not None and cmd in LIGHTNING_SUBCOMMANDS:
            argv += [f"--{key}", _text(key_value)]
        name = _fill_static(str(name), values, w) if name is not None else cmd
        if not _NAME_OK.match(name):
            raise MetaditError(f"{w}: step name {name!r}: use letters, digits, '.', '_', '+' or '-'")
        out.append(Step(f"{i:02d}-{name}", name, argv))
    if sum(s.command == "fit" for s in out) > 1:
        raise MetaditError(f"{where}: at most one fit step per cell ({{run_dir}} is that fit's log dir)")
    return out


def _grid_cells(grid: Any, where: str, base: dict[str, Any]) -> list[Cell]:
    if not isinstance(grid, dict):
        raise MetaditError(f"{where}: a grid is a mapping with `values` and `steps`")
    unknown = set(grid) - {"key", "name", "values", "steps"}
    if unknown:
        raise MetaditError(f"{where}: unknown grid field(s) {sorted(unknown)} (known: key, name, values, steps)")
    values = grid.get("values")
    if not isinstance(values, list) or not values:
        raise MetaditError(f"{where}: `values` must be a non-empty list")
    key = grid.get("key")
    if key is not None and (not isinstance(key, str) or not key.strip("-")):
        raise MetaditError(f"{where}: `key` must be an option name such as data.max_train_diffs")
    key = key.lstrip("-") if key else None
    cells = []
    for j, v in enumerate(values):
        params = dict(v) if isinstance(v, dict) else {"value": v}
        if key is not None and "value" not in params:
            raise MetaditError(f"{where}: value {j + 1} ({v!r}) has no `value` for key {key}")
        explicit = params.pop("name", None)
        scope = {**base, **params}
        template = grid.get("name", "{value}" if "value" in params else None)
        if explicit is None and template is None:
            raise MetaditError(f"{where}: value {j + 1} needs a `name` (or give the grid a `name` template)")
        name = str(explicit) if explicit is not None else _fill_static(str(template), scope, f"{where}: name")
        w = f"{where}, cell {name!r}"
        cells.append(Cell(name, _parse_steps(grid.get("steps"), w, {**scope, "cell": name}, key, params.get("value")),
                          params))
    return cells


def load_sweep(path: str | Path, var_overrides: dict[str, str] | None = None) -> Sweep:
    """Read and expand a sweep YAML: every cell with its steps, static placeholders filled."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MetaditError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MetaditError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise MetaditError(f"{path}: expected a mapping with `study` and `cells` or `grid`")
    unknown = set(raw) - {"study", "description", "vars", "cells", "grid"}
    if unknown:
        raise MetaditError(f"{path}: unknown field(s) {sorted(unknown)} (known: study, description, vars, cells, grid)")
    study = raw.get("study")
    if not isinstance(study, str) or not _NAME_OK.match(study):
        raise MetaditError(f"{path}: `study` must be a name (letters, digits, '.', '_', '+', '-')")
    vars_ = dict(raw.get("vars") or {})
    for k, v in (var_overrides or {}).items():
        if k not in vars_:
            raise MetaditError(f"--var {k}: {path} has no such var (vars: {', '.join(vars_) or 'none'})")
        vars_[k] = v
    clash = set(vars_) & {*RUNTIME, "value", "cell", "study"}
    if clash:
        raise MetaditError(f"{path}: vars may not be named {sorted(clash)}")
    base = {**vars_, "study": study}
    cells: list[Cell] = []
    for i, c in enumerate(raw.get("cells") or []):
        if not isinstance(c, dict) or "name" not in c or "steps" not in c or set(c) - {"name", "steps"}:
            raise MetaditError(f"{path}: cell {i + 1}: expected a mapping with `name` and `steps`")
        name = str(c["name"])
        cells.append(Cell(name, _parse_steps(c["steps"], f"{path}: cell {name!r}", {**base, "cell": name}, None, None)))
    grids = raw.get("grid")
    for g in grids if isinstance(grids, list) else [grids] if grids is not None else []:
        cells += _grid_cells(g, f"{path}: grid", base)
    if not cells:
        raise MetaditError(f"{path}: no cells (give `cells` or `grid`)")
    seen: set[str] = set()
    for c in cells:
        if not _NAME_OK.match(c.name):
            raise MetaditError(f"{path}: cell name {c.name!r}: use letters, digits, '.', '_', '+' or '-'")
        if c.name in seen:
            raise MetaditError(f"{path}: two cells are named {c.name!r}")
        for ref in sorted(_refs([a for s in c.steps for a in s.argv]) - {c.name}):
            if ref not in seen:
                raise MetaditError(f"{path}: cell {c.name!r} refers to cell {ref!r}, which must be listed before it")
            c.deps.append(ref)
        seen.add(c.name)
    for c in cells:
        if any(m.group("name") in RUNTIME[1:] and not m.group("ref") for s in c.steps for a in s.argv
               for m in _PLACEHOLDER.finditer(a)) and \
                not any(s.command == "fit" for s in c.steps):
            raise MetaditError(f"{path}: cell {c.name!r} uses {{run_dir}}/{{best_ckpt}}/{{adapter}} but has no fit step "
                               f"(name the cell that has: {{run_dir:CELL}})")
    return Sweep(study, str(raw.get("description") or "").strip(), cells, str(path), vars_, raw)


# ---------------------------------------------------------------------- paths and placeholders
def best_checkpoint(run_dir: Path) -> Path:
    """The fit's best checkpoint (as recorded beside its adapter), else the newest best*.ckpt, else the one a
    resumed fit would start from."""
    rec = run_dir / "adapter" / "metadit_best.json"
    if rec.is_file():
        try:
            ck = json.loads(rec.read_text()).get("checkpoint")
        except (OSError, json.JSONDecodeError):
            ck = None
        if ck and Path(ck).is_file():
            return Path(ck)
    ckdir = run_dir / "checkpoints"
    best = sorted(ckdir.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime) if ckdir.is_dir() else []
    if best:
        return best[-1]
    saved = resume_checkpoint(run_dir)
    if saved is not None:
        return saved
    raise MetaditError(f"no checkpoint under {ckdir}: has the fit that writes it run?")


def resume_checkpoint(run_dir: Path) -> Path | None:
    """What an unfinished fit restarts from: its last.ckpt, else the newest checkpoint it saved, else None."""
    ckdir = run_dir / "checkpoints"
    if (ckdir / "last.ckpt").is_file():
        return ckdir / "last.ckpt"
    saved = sorted(ckdir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if ckdir.is_dir() else []
    return saved[-1] if saved else None


class Layout:
    """Where a sweep's cells, logs and markers live: ROOT/STUDY/CELL/; the workflow engine's plan files and
    state: ROOT/.workflows/STUDY/ (outside the study's directory, which holds only cells and sweep.json)."""

    def __init__(self, root: str | Path, study: str) -> None:
        self.root = Path(root)
        self.dir = self.root / study
        self.workflow = self.root / ".workflows" / study

    def cell_dir(self, cell: str) -> Path:
        return self.dir / cell

    def run_dir(self, cell: str) -> Path:
        return self.cell_dir(cell) / FIT_DIR

    def log(self, cell: str, step: Step) -> Path:
        return self.cell_dir(cell) / f"{step.id}.log"

    def marker(self, cell: str, step: Step) -> Path:
        return self.cell_dir(cell) / f"{step.id}.done.json"

    def failed(self, cell: str, step: Step) -> Path:
        """A failed attempt's record (exit code, wall time); the next attempt removes it."""
        return self.cell_dir(cell) / f"{step.id}.failed.json"

    def fill(self, cell: str, s: str, strict: bool = True) -> str:
        def sub(m: re.Match) -> str:
            tok, name, ref = m.group(0), m.group("name"), m.group("ref")
            if m.group("esc"):
                return tok[1:-1]
            c = ref or cell
            if name == "cell_dir":
                return str(self.cell_dir(c))
            if name == "run_dir":
                return str(self.run_dir(c))
            if name == "adapter":
                return str(self.run_dir(c) / "adapter")
            if name == "best_ckpt":
                try:
                    return str(best_checkpoint(self.run_dir(c)))
                except MetaditError:
                    if strict:
                        raise
                    return f"<best checkpoint in {self.run_dir(c)}>"
            raise AssertionError(tok)

        return _PLACEHOLDER.sub(sub, s)

    def argv(self, cell: str, step: Step, strict: bool = True) -> list[str]:
        """The step's full command line (placeholders filled, sweep-managed options added)."""
        argv = [self.fill(cell, a, strict) for a in step.argv]
        cmd, has = argv[0], set(a.split("=", 1)[0] for a in argv[1:])
        if cmd in LIGHTNING_SUBCOMMANDS:
            cell_dir = self.cell_dir(cell)
            if "--trainer.default_root_dir" not in has:
                argv += ["--trainer.default_root_dir", str(cell_dir)]
            if "--trainer.logger" not in has:
                version = FIT_DIR if cmd == "fit" else step.id
                argv += ["--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                         "init_args": {"save_dir": str(cell_dir), "name": "",
                                                                       "version": version}})]
            if cmd == "fit" and "--ckpt_path" not in has:
                last = resume_checkpoint(self.run_dir(cell))
                if last is not None:
                    argv += ["--ckpt_path", str(last)]
        elif cmd == "eval" and "--out" not in has:
            argv += ["--out", str(self.cell_dir(cell) / step.id)]
        return argv


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("exit_code") == 0 else None


def cell_state(layout: Layout, cell: Cell) -> tuple[int, str | None]:
    """(index of the first step to run — len(steps) when the cell is done, a problem or None).

    A step counts as done when its marker exists and records the same step; a marker whose step changed
    since is a problem (the cell's results would mix two configurations)."""
    for i, step in enumerate(cell.steps):
        m = read_marker(layout.marker(cell.name, step))
        if m is None:
            return i, None
        if m.get("template") != step.argv:
            return i, (f"step {step.id} changed since it ran:\n  then: metadit {shlex.join(m.get('template') or [])}\n"
                       f"  now:  metadit {shlex.join(step.argv)}\n"
                       f"  remove {layout.cell_dir(cell.name)} to redo the cell with the new step")
    return len(cell.steps), None


def select(sweep: Sweep, only: list[str] | None) -> list[Cell]:
    """The cells to run: all, or the named ones plus the cells they read from, in the sweep's order."""
    if not only:
        return list(sweep.cells)
    want: set[str] = set()
    todo = list(only)
    while todo:
        c = sweep.cell(todo.pop())
        if c.name not in want:
            want.add(c.name)
            todo += c.deps
    return [c for c in sweep.cells if c.name in want]


# ---------------------------------------------------------------------- the workflow engine (Snakemake)
SNAKEFILE = Path(__file__).with_name("sweep.smk")
# the executors (`--executor NAME`) that are not part of Snakemake: what to install for them
EXECUTOR_PACKAGES = {"slurm": "metadit[slurm]  (snakemake-executor-plugin-slurm)"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def tail(log: Path, n: int = 15) -> str:
    """The last `n` non-empty lines of a step's log, indented (what a failure message shows)."""
    try:
        text = log.read_bytes()[-16384:].decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


def write_plan(sweep: Sweep, layout: Layout, verbose: bool = False) -> Path:
    """The expanded plan as the workflow's config file (sweep.smk reads it; so does each step's job).

    Named after its content, so a dry run or a run with other `--var`s never rewrites the plan that the jobs of a
    sweep still running read."""
    from metadit.eval.results import write_json
    from metadit.provenance import git_commit

    plan = {"study": sweep.study, "root": str(layout.root), "dir": str(layout.dir.resolve()), "cwd": os.getcwd(),
            "python": sys.executable, "commit": git_commit(), "verbose": verbose,
            "cells": [{"name": c.name, "deps": c.deps,
                       "steps": [{"id": s.id, "name": s.name, "argv": s.argv} for s in c.steps]} for c in sweep.cells]}
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]
    path = (layout.workflow / f"plan-{digest}.json").resolve()
    if not path.is_file():
        write_json(path, {**plan, "plan_file": str(path)})
    return path


def snakemake_command(layout: Layout, plan: Path, targets: list[Path], engine_args: list[str], executor: str = "local",
                      dry_run: bool = False) -> list[str]:
    """`python -m snakemake ...` for these targets: sweep.smk on the plan, Snakemake's state in ROOT/.workflows/STUDY.

    Only a marker's age decides what reruns (`--rerun-triggers mtime`): a new metadit version or a moved
    Snakefile reruns nothing, and a changed step is `cell_state`'s to report. `--keep-going`: a failing step
    stops its own cell and the cells that read from it, not the others. One step at a time, with every core of
    the machine, unless the arguments for Snakemake (`engine_args`) say otherwise (`--cores N` / `--jobs N`:
    then each job has Snakemake's default of one thread, or what `--set-threads` gives it). Why the cores are
    given explicitly: Snakemake sets OMP_NUM_THREADS (and MKL_, OPENBLAS_, ...) to each job's threads, so a job
    of the default one thread would train and generate with torch on one core."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(layout.workflow.resolve()),
           "--configfile", str(plan), "--rerun-triggers", "mtime", "--rerun-incomplete", "--keep-going",
           "--quiet", "host"]
    if executor != "local":
        cmd += ["--executor", executor]
    if not any(a in ("-c", "--cores", "-j", "--jobs") or a.startswith(("--cores=", "--jobs=")) for a in engine_args):
        if executor == "local":
            cores = os.cpu_count() or 1  # each step takes them all (sweep.smk: `threads`), so one runs at a time
            cmd += ["--cores", str(cores), "--config", f"step_threads={cores}"]
        else:
            cmd += ["--jobs", "unlimited"]
    if dry_run:
        cmd += ["--dry-run", "--printshellcmds", "--nolock"]
    # Snakemake resolves relative targets against --directory (the workflow's state), not the caller's directory:
    # the markers are named absolutely, as the plan names them.
    return cmd + list(engine_args) + ["--", *(str(Path(t).resolve()) for t in targets)]


def require_snakemake(executor: str) -> None:
    import importlib.util

    if importlib.util.find_spec("snakemake") is None:
        raise MetaditError("the sweep runs on Snakemake, which is not installed: pip install 'snakemake==9.27.1' "
                           "(`make setup` installs it)")
    if executor not in ("local", "dryrun", "touch") and \
            importlib.util.find_spec(f"snakemake_executor_plugin_{executor.replace('-', '_')}") is None:
        hint = EXECUTOR_PACKAGES.get(executor, f"snakemake-executor-plugin-{executor}")
        raise MetaditError(f"--executor {executor}: Snakemake's {executor} executor is not installed: pip install {hint}")


def _blocked_by(cells: list[Cell], problems: dict[str, str]) -> dict[str, list[str]]:
    """The cells that read from a cell with a problem (directly or through another), and which of their deps."""
    out: dict[str, list[str]] = {}
    for c in cells:  # in the sweep's order: a cell's deps come before it
        bad = [d for d in c.deps if d in problems or d in out]
        if bad:
            out[c.name] = bad
    return out


def plan_states(layout: Layout, cells: list[Cell], to_run: set[str] | None, asked: set[str]) -> dict[str, list[bool]]:
    """Per cell, whether each step is done. For the cells Snakemake's dry run was asked about (`asked`), its
    answer: `to_run`, the CELL/ID keys it would run; for the others (a changed step, or reading from such a
    cell), or when the dry run failed, the markers."""
    states = {}
    for c in cells:
        if to_run is not None and c.name in asked:
            states[c.name] = [f"{c.name}/{s.id}" not in to_run for s in c.steps]
        else:
            first = cell_state(layout, c)[0]
            states[c.name] = [i < first for i in range(len(c.steps))]
    return states


def _dry_run_keys(output: str) -> set[str]:
    """The steps Snakemake's dry run would run, from its `--printshellcmds` lines (`... sweep_step PLAN CELL/ID`)."""
    keys = set()
    for line in output.splitlines():
        if "metadit.eval.sweep_step" in line:
            words = shlex.split(line.split("Shell command:", 1)[-1])
            if words:
                keys.add(words[-1])
    return keys


def dry_run(sweep: Sweep, layout: Layout, cells: list[Cell], console, engine_args: list[str] = (),
            executor: str = "local", verbose: bool = False) -> int:
    """Print the plan (every step's command, done or to run) and Snakemake's dry run of it; run nothing."""
    from rich.markup import escape

    def say(msg: str) -> None:
        console.print(escape(msg), soft_wrap=True)

    problems = {c.name: p for c in cells if (p := cell_state(layout, c)[1])}
    blocked = _blocked_by(cells, problems)
    runnable = [c for c in cells if c.name not in problems and c.name not in blocked]
    engine_out, rc = "", 0
    to_run: set[str] | None = None
    if runnable:
        require_snakemake(executor)
        plan = write_plan(sweep, layout)
        cmd = snakemake_command(layout, plan, [layout.marker(c.name, c.steps[-1]) for c in runnable], list(engine_args),
                                executor, dry_run=True)
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        engine_out, rc = proc.stdout + proc.stderr, proc.returncode
        to_run = _dry_run_keys(engine_out) if rc == 0 else None
    states = plan_states(layout, cells, to_run, {c.name for c in runnable})
    say(f"study {sweep.study}: {len(cells)} cell(s) in {layout.dir}"
        + (f" — {sweep.description}" if sweep.description else ""))
    for cell in cells:
        params = f" {json.dumps(cell.params)}" if cell.params else ""
        deps = f" (after {', '.join(cell.deps)})" if cell.deps else ""
        say(f"\ncell {cell.name}{params}{deps} — {layout.cell_dir(cell.name)}")
        if cell.name in problems:
            say(f"  problem: {problems[cell.name]}")
        elif cell.name in blocked:
            say(f"  not run: needs cell(s) {', '.join(blocked[cell.name])}, which have a problem")
        for step, done in zip(cell.steps, states[cell.name]):
            say(f"  [{'done' if done else 'to run'}] {step.id}: metadit {shlex.join(layout.argv(cell.name, step, strict=False))}")
    if engine_out:
        # Snakemake's own account: every job and its reason under -v (or when it failed), else the job counts
        shown = engine_out
        if not verbose and not rc and "Job stats:" in engine_out:
            shown = "\n".join(ln for ln in engine_out[engine_out.rfind("Job stats:"):].splitlines()
                              if "check individual jobs above" not in ln)
        say(f"\nSnakemake's dry run ({layout.workflow}):\n{shown.rstrip()}")
    if rc:
        say(f"Snakemake's dry run failed (exit {rc})")
        return 1
    return 0


class _Stopped(Exception):
    pass


def _run_engine(cmd: list[str]) -> int:
    """Run Snakemake in its own process group; an interrupt (Ctrl-C, SIGTERM) goes to the whole group as SIGTERM:
    the running steps stop (leaving no marker) and Snakemake exits once they have. Not SIGINT: a sweep started in
    the background of a script inherits SIGINT ignored."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)

    def on_term(signum, frame):
        raise _Stopped()

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        return proc.wait()
    except (KeyboardInterrupt, _Stopped):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        raise KeyboardInterrupt from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


def run_sweep(sweep: Sweep, root: str | Path = "runs/sweeps", only: list[str] | None = None,
              verbose: bool = False, console=None, engine_args: list[str] = (), executor: str = "local") -> int:
    """Run (or resume) the sweep's cells on Snakemake; 0 when every selected cell is done, 1 otherwise.

    The summary is read back from the cells' files: a step whose marker is new ran, one whose marker is as
    before was done already, one with a new failure record failed; a cell none of whose missing steps ran was
    stopped by a cell it reads from (or by Snakemake itself: its message is above)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from metadit.eval.results import run_info, write_json

    console = console or Console(highlight=False)
    layout = Layout(root, sweep.study)
    cells = select(sweep, only)
    started = time.time()
    problems = {c.name: p for c in cells if (p := cell_state(layout, c)[1])}
    blocked = _blocked_by(cells, problems)
    runnable = [c for c in cells if c.name not in problems and c.name not in blocked]
    if runnable:
        require_snakemake(executor)
    plan = [{"cell": c.name, "params": c.params, "deps": c.deps, "dir": str(layout.cell_dir(c.name)),
             "steps": [{"id": s.id, "template": s.argv} for s in c.steps]} for c in sweep.cells]
    record_path = layout.dir / "sweep.json"
    try:
        previous = json.loads(record_path.read_text()).get("invocations", []) if record_path.is_file() else []
    except (OSError, json.JSONDecodeError, AttributeError):
        previous = []
    record = {"study": sweep.study, "description": sweep.description, "source": sweep.source, "vars": sweep.vars,
              "config": sweep.raw, "plan": plan, "invocations": previous}
    this: dict[str, Any] = {"info": run_info(), "only": only, "engine": {"executor": executor, "args": list(engine_args)},
                            "status": {}}
    record["invocations"] = previous + [this]
    write_json(record_path, record)

    before = {(c.name, s.id): (_mtime(layout.marker(c.name, s)), _mtime(layout.failed(c.name, s)))
              for c in cells for s in c.steps}
    rc = 0
    if runnable:
        plan_file = write_plan(sweep, layout, verbose)
        cmd = snakemake_command(layout, plan_file, [layout.marker(c.name, c.steps[-1]) for c in runnable],
                                list(engine_args), executor)
        try:
            rc = _run_engine(cmd)
        except KeyboardInterrupt:
            this["interrupted"] = _now()
            this["status"] = {c.name: _cell_outcome(layout, c, before)[0] for c in cells}
            write_json(record_path, record)
            console.print(escape(f"sweep {sweep.study}: interrupted; rerun the same command to resume"))
            raise

    def say(msg: str) -> None:
        console.print(escape(msg), soft_wrap=True)

    status: dict[str, dict[str, Any]] = {}
    for cell in cells:
        if cell.name in problems:
            status[cell.name] = {"status": "error", "ran": [], "skipped": [], "wall_time_s": 0.0,
                                 "message": problems[cell.name]}
            say(f"{cell.name}: error — {problems[cell.name]}")
            continue
        st, lines = _cell_outcome(layout, cell, before)
        status[cell.name] = st
        if st["status"] == "not run":
            unfinished = [d for d in cell.deps if status.get(d, {}).get("status") in ("failed", "blocked", "error", "not run")
                          or read_marker(layout.marker(d, sweep.cell(d).steps[-1])) is None]
            if unfinished:
                st.update(status="blocked", message=f"needs cell(s) {', '.join(unfinished)}, not done")
                lines = [f"{cell.name}: skipped — {st['message']}"]
            else:
                st.update(status="error", message=f"Snakemake stopped before step {st.pop('next')} "
                                                  f"(exit {rc}; its message is above)")
                lines.append(f"{cell.name}: not run — {st['message']}")
        st.pop("next", None)
        for line in lines:
            say(line)
    this["status"] = status
    this["info"] = run_info(started)
    write_json(record_path, record)

    table = Table(title=f"sweep {escape(sweep.study)} — {layout.dir}")
    for col in ("cell", "status", "ran", "skipped", "wall s", "note"):
        table.add_column(col)
    for name, st in status.items():
        colour = {"failed": "red", "error": "red", "blocked": "yellow"}.get(st["status"], "green")
        table.add_row(escape(name), f"[{colour}]{st['status']}[/{colour}]", str(len(st["ran"])), str(len(st["skipped"])),
                      f"{st['wall_time_s']:.1f}", escape(st["message"].splitlines()[0] if st["message"] else ""))
    console.print(table)
    bad = [n for n, st in status.items() if st["status"] in ("failed", "blocked", "error")]
    if bad:
        console.print(escape(f"sweep {sweep.study}: {len(bad)} cell(s) not finished: {', '.join(bad)}"), style="red")
        for n in bad:
            console.print(escape(f"  {n}: {status[n]['message']}"))
        return 1
    if rc:
        console.print(escape(f"sweep {sweep.study}: Snakemake exited with {rc}"), style="red")
        return 1
    console.print(escape(f"sweep {sweep.study}: all {len(status)} cell(s) done; "
                         f"`metadit report --study {sweep.study} --sweep-dir {layout.dir}` tabulates them"))
    return 0


def _cell_outcome(layout: Layout, cell: Cell, before: dict[tuple[str, str], tuple[int | None, int | None]]
                  ) -> tuple[dict[str, Any], list[str]]:
    """What this invocation did to a cell, from its files: its status record and one line per step."""
    st: dict[str, Any] = {"status": "done", "ran": [], "skipped": [], "wall_time_s": 0.0, "message": ""}
    lines = []
    for step in cell.steps:
        marker_was, failed_was = before[(cell.name, step.id)]
        marker = read_marker(layout.marker(cell.name, step))
        if marker is not None and _mtime(layout.marker(cell.name, step)) == marker_was:
            st["skipped"].append(step.id)
            lines.append(f"{cell.name} {step.id}: done before, skipped")
            continue
        if marker is not None:
            st["ran"].append(step.id)
            st["status"] = "ran"
            st["wall_time_s"] += marker.get("wall_time_s", 0.0)
            resumed = marker.get("resumed_from")
            lines.append(f"{cell.name} {step.id}: done in {marker.get('wall_time_s')} s"
                         + (f" (resumed {resumed})" if resumed else ""))
            continue
        failed = layout.failed(cell.name, step)
        if _mtime(failed) is not None and _mtime(failed) != failed_was:
            try:
                f = json.loads(failed.read_text())
            except (OSError, json.JSONDecodeError):
                f = {}
            log = layout.log(cell.name, step)
            st["wall_time_s"] += f.get("wall_time_s") or 0.0
            if f.get("error"):
                st.update(status="failed", message=f"step {step.id}: {f['error']}")
                lines.append(f"{cell.name} {step.id}: FAILED — {f['error']}")
            else:
                wall = f.get("wall_time_s")
                st.update(status="failed", message=f"step {step.id} exited with {f.get('exit_code')} after {wall} s "
                                                   f"— log: {log}")
                lines.append(f"{cell.name} {step.id}: FAILED (exit {f.get('exit_code')}, {wall} s) — cell {cell.name} "
                             f"stops; log {log}, last lines:\n{tail(log)}")
            return st, lines
        st.update(status="not run", next=step.id)  # Snakemake did not start it: run_sweep says why
        return st, lines
    return st, lines


# ---------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="a sweep YAML (configs/sweep/*.yaml)")
    p.add_argument("--only", nargs="+", metavar="CELL", help="run these cells (and the cells they read from)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded plan and Snakemake's dry run; run nothing")
    p.add_argument("--root", type=Path, default=Path("runs/sweeps"), help="cells go to ROOT/STUDY/CELL")
    p.add_argument("--var", action="append", default=[], metavar="KEY=VALUE", help="override one of the sweep's vars")
    p.add_argument("--executor", default="local", metavar="NAME",
                   help="Snakemake's executor: local (default), slurm (pip install 'metadit[slurm]'), or any plugin's")
    p.add_argument("-v", "--verbose", action="store_true", help="also echo each step's output (always in its log)")
    p.add_argument("engine_args", nargs=argparse.REMAINDER, metavar="-- SNAKEMAKE_ARGS",
                   help="after `--`: arguments for Snakemake, e.g. -- --jobs 8 --profile slurm-gpu")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    overrides = {}
    for kv in args.var:
        k, sep, v = kv.partition("=")
        if not sep:
            raise MetaditError(f"--var {kv}: expected KEY=VALUE")
        overrides[k] = v
    engine_args = list(args.engine_args or [])
    if engine_args and engine_args[0] == "--":
        engine_args = engine_args[1:]
    elif engine_args:
        raise MetaditError(f"{shlex.join(engine_args)}: arguments for Snakemake go after `--`")
    sweep = load_sweep(args.config, overrides)
    console = Console(highlight=False)
    if args.dry_run:
        return dry_run(sweep, Layout(args.root, sweep.study), select(sweep, args.only), console, engine_args,
                       args.executor, args.verbose)
    try:
        return run_sweep(sweep, args.root, args.only, args.verbose, console, engine_args, args.executor)
    except KeyboardInterrupt:
        return 130
