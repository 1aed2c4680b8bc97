"""`metadit sweep`: run a study — a list of cells, each a few `metadit` steps — resumably.

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

Each step is `python -m metadit.cli ...` in a fresh process, its output appended to `CELL_DIR/ID.log`; on
success `CELL_DIR/ID.done.json` (argv, exit code, start, end, wall time) is written atomically. Steps with a
marker are skipped, so rerunning the same command resumes; once a step reruns, every later step of its cell
reruns too. Lightning steps get `--trainer.default_root_dir CELL_DIR` and a CSV logger whose directory is fixed
(`CELL_DIR/run` for the fit, `CELL_DIR/ID` otherwise); an unfinished fit resumes from its `last.ckpt` (else
its newest checkpoint). `eval` steps get `--out CELL_DIR/ID` unless they name one. A failing step stops its cell (and the
cells that need it); the sweep goes on and exits non-zero with a summary. `--dry-run` prints the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
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
    """Where a sweep's cells, logs and markers live: ROOT/STUDY/CELL/."""

    def __init__(self, root: str | Path, study: str) -> None:
        self.dir = Path(root) / study

    def cell_dir(self, cell: str) -> Path:
        return self.dir / cell

    def run_dir(self, cell: str) -> Path:
        return self.cell_dir(cell) / FIT_DIR

    def log(self, cell: str, step: Step) -> Path:
        return self.cell_dir(cell) / f"{step.id}.log"

    def marker(self, cell: str, step: Step) -> Path:
        return self.cell_dir(cell) / f"{step.id}.done.json"

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


# ---------------------------------------------------------------------- running
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _last_line(buf: str) -> str:
    for part in reversed(re.split(r"[\r\n]", buf)):
        if part.strip():
            return part.strip()
    return ""


class _Terminated(Exception):
    pass


def _run_step(cmd: list[str], log: Path, header: str, verbose: bool, on_line) -> int:
    """Run `cmd`, appending its output (stdout and stderr) to `log`; the child ends with us."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(header.encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        tail = ""
        try:
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
                f.write(chunk)
                f.flush()
                if verbose:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                tail = (tail + chunk.decode("utf-8", "replace"))[-4096:]
                on_line(_last_line(tail))
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            f.write(f"\n[metadit sweep] interrupted at {_now()}; step stopped\n".encode())
            raise


def _tail(log: Path, n: int = 15) -> str:
    try:
        text = log.read_bytes()[-16384:].decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


def _lock(study_dir: Path):
    import fcntl

    study_dir.mkdir(parents=True, exist_ok=True)
    f = open(study_dir / ".sweep.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise MetaditError(f"{study_dir}: another `metadit sweep` is running on this study") from None
    return f


def dry_run(sweep: Sweep, layout: Layout, cells: list[Cell], console) -> int:
    from rich.markup import escape

    def say(msg: str) -> None:
        console.print(escape(msg), soft_wrap=True)

    say(f"study {sweep.study}: {len(cells)} cell(s) in {layout.dir}"
        + (f" — {sweep.description}" if sweep.description else ""))
    for cell in cells:
        first, problem = cell_state(layout, cell)
        params = f" {json.dumps(cell.params)}" if cell.params else ""
        deps = f" (after {', '.join(cell.deps)})" if cell.deps else ""
        say(f"\ncell {cell.name}{params}{deps} — {layout.cell_dir(cell.name)}")
        if problem:
            say(f"  problem: {problem}")
        for i, step in enumerate(cell.steps):
            state = "done" if i < first else "to run"
            say(f"  [{state}] {step.id}: metadit {shlex.join(layout.argv(cell.name, step, strict=False))}")
    return 0


def run_sweep(sweep: Sweep, root: str | Path = "runs/sweeps", only: list[str] | None = None,
              verbose: bool = False, console=None) -> int:
    """Run (or resume) the sweep's cells; 0 when every selected cell is done, 1 otherwise."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column, Table

    from metadit.provenance import git_commit
    from metadit.eval.results import run_info, write_json

    console = console or Console(highlight=False)
    layout = Layout(root, sweep.study)
    cells = select(sweep, only)
    started = time.time()
    lock = _lock(layout.dir)
    commit = git_commit()
    plan = [{"cell": c.name, "params": c.params, "deps": c.deps, "dir": str(layout.cell_dir(c.name)),
             "steps": [{"id": s.id, "template": s.argv} for s in c.steps]} for c in sweep.cells]
    record_path = layout.dir / "sweep.json"
    try:
        previous = json.loads(record_path.read_text()).get("invocations", []) if record_path.is_file() else []
    except (OSError, json.JSONDecodeError, AttributeError):
        previous = []
    record = {"study": sweep.study, "description": sweep.description, "source": sweep.source, "vars": sweep.vars,
              "config": sweep.raw, "plan": plan, "invocations": previous}
    this = {"info": run_info(), "only": only, "status": {}}
    record["invocations"] = previous + [this]
    write_json(record_path, record)

    interactive = console.is_terminal
    total = sum(len(c.steps) for c in cells)
    status: dict[str, dict[str, Any]] = {}
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise _Terminated()

    if threading_main():
        signal.signal(signal.SIGTERM, on_term)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                        BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("[dim]{task.fields[last]}",
                                   table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                        console=console, disable=not interactive, transient=False)

    def say(msg: str) -> None:
        (progress.console if interactive else console).print(escape(msg), soft_wrap=True)

    try:
        with progress:
            task = progress.add_task(f"sweep {sweep.study}", total=total, last="")
            for cell in cells:
                st = {"status": "done", "ran": [], "skipped": [], "wall_time_s": 0.0, "message": ""}
                status[cell.name] = st
                blocked = [d for d in cell.deps if status.get(d, {}).get("status") in ("failed", "blocked", "error")
                           or cell_state(layout, sweep.cell(d))[0] < len(sweep.cell(d).steps)]
                if blocked:
                    st.update(status="blocked", message=f"needs cell(s) {', '.join(blocked)}, not done")
                    say(f"{cell.name}: skipped — {st['message']}")
                    progress.advance(task, len(cell.steps))
                    continue
                first, problem = cell_state(layout, cell)
                if problem:
                    st.update(status="error", message=problem)
                    say(f"{cell.name}: error — {problem}")
                    progress.advance(task, len(cell.steps))
                    continue
                for i, step in enumerate(cell.steps):
                    marker = layout.marker(cell.name, step)
                    if i < first:
                        st["skipped"].append(step.id)
                        say(f"{cell.name} {step.id}: done before, skipped")
                        progress.advance(task)
                        continue
                    marker.unlink(missing_ok=True)  # an earlier step reran: this one's result is stale
                    try:
                        argv = layout.argv(cell.name, step)
                    except MetaditError as e:
                        st.update(status="failed", message=f"step {step.id}: {e}")
                        say(f"{cell.name} {step.id}: FAILED — {e}")
                        break
                    resumed = None
                    if step.command == "fit" and "--ckpt_path" not in step.argv and "--ckpt_path" in argv:
                        resumed = argv[argv.index("--ckpt_path") + 1]
                        metrics = layout.run_dir(cell.name) / "metrics.csv"
                        if metrics.is_file():  # the CSV logger would delete it: keep the first attempt's curve
                            metrics.rename(metrics.with_name(f"metrics.before-resume-{int(time.time())}.csv"))
                    cmd = [sys.executable, "-m", "metadit.cli", *argv]
                    log = layout.log(cell.name, step)
                    progress.update(task, description=f"{cell.name} {step.id}", last="")
                    t0, start = time.time(), _now()
                    header = (f"\n===== metadit sweep {sweep.study} / {cell.name} / {step.id} at {start}"
                              f"{' (resuming ' + resumed + ')' if resumed else ''}\n$ metadit {shlex.join(argv)}\n")
                    rc = _run_step(cmd, log, header, verbose,
                                   lambda line: progress.update(task, last=escape(line[:120])) if interactive else None)
                    wall = round(time.time() - t0, 1)
                    st["wall_time_s"] += wall
                    if rc != 0:
                        st.update(status="failed",
                                  message=f"step {step.id} exited with {rc} after {wall} s — log: {log}")
                        say(f"{cell.name} {step.id}: FAILED (exit {rc}, {wall} s) — cell {cell.name} stops; "
                            f"log {log}, last lines:\n{_tail(log)}")
                        break
                    write_json(marker, {
                        "study": sweep.study, "cell": cell.name, "step": step.id, "template": step.argv,
                        "argv": argv, "command": f"metadit {shlex.join(argv)}", "python": sys.executable,
                        "exit_code": rc, "started": start, "ended": _now(), "wall_time_s": wall,
                        "resumed_from": resumed, "log": str(log), "commit": commit,
                    })
                    st["ran"].append(step.id)
                    st["status"] = "ran"
                    say(f"{cell.name} {step.id}: done in {wall} s{' (resumed ' + resumed + ')' if resumed else ''}")
                    progress.advance(task)
                else:
                    continue
                progress.advance(task, len(cell.steps) - len(st["ran"]) - len(st["skipped"]))
    except (KeyboardInterrupt, _Terminated):
        this["status"] = status
        this["interrupted"] = _now()
        write_json(record_path, record)
        console.print(escape(f"sweep {sweep.study}: interrupted; rerun the same command to resume"))
        raise KeyboardInterrupt from None
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, old_term)
        lock.close()
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
    console.print(escape(f"sweep {sweep.study}: all {len(status)} cell(s) done; "
                         f"`metadit report --study {sweep.study} --sweep-dir {layout.dir}` tabulates them"))
    return 0


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="a sweep YAML (configs/sweep/*.yaml)")
    p.add_argument("--only", nargs="+", metavar="CELL", help="run these cells (and the cells they read from)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded plan and what is done; run nothing")
    p.add_argument("--root", type=Path, default=Path("runs/sweeps"), help="cells go to ROOT/STUDY/CELL")
    p.add_argument("--var", action="append", default=[], metavar="KEY=VALUE", help="override one of the sweep's vars")
    p.add_argument("-v", "--verbose", action="store_true", help="also echo each step's output (always in its log)")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    overrides = {}
    for kv in args.var:
        k, sep, v = kv.partition("=")
        if not sep:
            raise MetaditError(f"--var {kv}: expected KEY=VALUE")
        overrides[k] = v
    sweep = load_sweep(args.config, overrides)
    console = Console(highlight=False)
    if args.dry_run:
        return dry_run(sweep, Layout(args.root, sweep.study), select(sweep, args.only), console)
    try:
        return run_sweep(sweep, args.root, args.only, args.verbose, console)
    except KeyboardInterrupt:
        return 130
