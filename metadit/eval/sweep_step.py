"""One step of a `metadit sweep`, as its Snakemake job runs it: `python -m metadit.eval.sweep_step PLAN CELL/ID`.

PLAN is the sweep's expanded plan (`metadit.eval.sweep.write_plan`). The step's runtime placeholders are filled
here, when it runs ({best_ckpt} names a checkpoint that exists only once the cell's fit has run), and the
sweep-managed options added (`Layout.argv`: the fit's fixed log dir, its resume checkpoint, an eval's --out).
Then `python -m metadit.cli ...` runs in a fresh process from the directory the sweep was started in, its output
appended to CELL_DIR/ID.log after a header line; the log keeps every attempt. On success CELL_DIR/ID.done.json
(argv, exit code, start, end, wall time, commit) is written atomically: the job's output. On failure
CELL_DIR/ID.failed.json records the exit code and wall time for the sweep's summary, and the job fails.
Starting a step removes the markers of the later steps of its cell: their results are stale from now on.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from metadit.errors import MetaditError
from metadit.eval.sweep import Layout, Step, resume_checkpoint


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class _Stopped(Exception):
    pass


def _run(cmd: list[str], log: Path, header: str, verbose: bool) -> int:
    """Run `cmd` with its output (stdout and stderr) appended to `log`, and echoed with `verbose`; an interrupt
    stops it (SIGTERM, then SIGKILL after 30 s) and notes so in the log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(header.encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if verbose else f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        try:
            if verbose:
                assert proc.stdout is not None
                for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
                    f.write(chunk)
                    f.flush()
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
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


def run_step(plan_path: str | Path, key: str) -> int:
    """Run the step `key` ("CELL/ID") of the plan; its exit code (0: its marker is written)."""
    from metadit.eval.results import write_json

    plan = json.loads(Path(plan_path).read_text())
    cell_name, _, step_id = key.partition("/")
    cell = next((c for c in plan["cells"] if c["name"] == cell_name), None)
    steps = [Step(s["id"], s["name"], s["argv"]) for s in (cell or {}).get("steps", [])]
    index = next((i for i, s in enumerate(steps) if s.id == step_id), None)
    if index is None:
        raise MetaditError(f"{plan_path}: no step {key}")
    step = steps[index]
    os.chdir(plan["cwd"])  # the steps name configs/... relative to where the sweep was started
    layout = Layout(plan["root"], plan["study"])
    log, marker, failed = layout.log(cell_name, step), layout.marker(cell_name, step), layout.failed(cell_name, step)
    failed.unlink(missing_ok=True)
    for later in steps[index + 1:]:
        layout.marker(cell_name, later).unlink(missing_ok=True)
    t0, start = time.time(), _now()

    def record_failure(**what) -> None:
        write_json(failed, {"study": plan["study"], "cell": cell_name, "step": step.id, "started": start,
                            "ended": _now(), "wall_time_s": round(time.time() - t0, 1), "log": str(log), **what})

    try:
        argv = layout.argv(cell_name, step)
    except MetaditError as e:  # e.g. {best_ckpt} of a fit that saved none
        record_failure(exit_code=None, error=str(e))
        print(f"metadit sweep {cell_name} {step.id}: {e}", file=sys.stderr)
        return 1
    resumed = None
    if step.command == "fit" and "--ckpt_path" not in step.argv and "--ckpt_path" in argv:
        resumed = argv[argv.index("--ckpt_path") + 1]
        metrics = layout.run_dir(cell_name) / "metrics.csv"
        if metrics.is_file():  # the CSV logger would delete it: keep the first attempt's curve
            metrics.rename(metrics.with_name(f"metrics.before-resume-{int(time.time())}.csv"))
    header = (f"\n===== metadit sweep {plan['study']} / {cell_name} / {step.id} at {start}"
              f"{' (resuming ' + resumed + ')' if resumed else ''}\n$ metadit {shlex.join(argv)}\n")
    rc = _run([plan["python"], "-m", "metadit.cli", *argv], log, header, bool(plan.get("verbose")))
    wall = round(time.time() - t0, 1)
    if rc != 0:
        record_failure(exit_code=rc, argv=argv)
        return rc
    write_json(marker, {
        "study": plan["study"], "cell": cell_name, "step": step.id, "template": step.argv,
        "argv": argv, "command": f"metadit {shlex.join(argv)}", "python": plan["python"],
        "exit_code": rc, "started": start, "ended": _now(), "wall_time_s": wall,
        "resumed_from": resumed, "log": str(log), "commit": plan.get("commit"),
        "threads": os.environ.get("OMP_NUM_THREADS"),  # what Snakemake gave the job (torch's intra-op threads)
    })
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m metadit.eval.sweep_step PLAN CELL/ID", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise _Stopped()

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run_step(*args)
    except MetaditError as e:
        print(f"metadit sweep: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stopped):
        return 130


if __name__ == "__main__":
    sys.exit(main())
