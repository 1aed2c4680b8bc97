"""The evaluation's record: one row per (held-out diff, method), written as `eval.json`, and its summary.

Row fields: `diff` (bank entry id), `bank`, `index`, `task`, `truth`, `method`, `prediction`, `gated`
(True: the topic does not show without the trigger — measured in the bank's behaviour check; None when the
bank has no such check, e.g. news), `scores` (judge name → value; `judge` is the 1–5 score used in tables),
and optional `extra` (method-specific details such as the 20 answers a guesser saw).

`summarize(rows)` gives, per method, the mean of every score over all rows and over the gated and leaky
groups separately (they are reported beside each other, never mixed), with counts; rows that carry the
bank's strict verdict are also grouped by it (`strict_gated` / `strict_leaky` / `strict_unlearned`, as
`metadit.eval.rows.strict_group` places them). The tables' intervals come from `metadit.eval.tables`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from metadit.eval.rows import strict_group

GROUPS = ("all", "gated", "leaky")
# The strict verdict of the bank's check: the topic learned and shown in no negative condition (no code, a wrong
# code, the code word elsewhere). The lenient split above asks only "does it show without a code?".
STRICT_GROUPS = ("strict_gated", "strict_leaky", "strict_unlearned")


def _group_of(row: dict[str, Any]) -> str | None:
    g = row.get("gated")
    return None if g is None else "gated" if g else "leaky"


def _strict_group_of(row: dict[str, Any]) -> str | None:
    g = strict_group(row)
    return None if g == "unchecked" else g


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {group: {"n": count, score_name: mean, ...}}} with groups all / gated / leaky (when known)."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        for group in ("all", _group_of(r), _strict_group_of(r)):
            if group is None:
                continue
            g = acc.setdefault(r["method"], {}).setdefault(group, {"n": []})
            g["n"].append(1.0)
            for name, v in (r.get("scores") or {}).items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    g.setdefault(name, []).append(float(v))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method, groups in acc.items():
        out[method] = {}
        for group in GROUPS + STRICT_GROUPS:
            if group not in groups:
                continue
            vals = groups[group]
            out[method][group] = {"n": len(vals.pop("n"))}
            out[method][group].update({k: sum(v) / len(v) for k, v in sorted(vals.items()) if v})
    return out


def command_line() -> str:
    """This process's command as a user would type it: `metadit ...` also when it ran as `python -m metadit.cli`
    (sweep steps) or through the console script's full path."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "metadit" or argv0.parts[-2:] == ("metadit", "cli.py"):
        return shlex.join(["metadit", *sys.argv[1:]])
    return shlex.join(sys.argv)


def run_info(started: float | None = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What reproduces a result: the command, the commit, the config, the machine and the wall time."""
    from metadit.provenance import git_commit, machine

    info: dict[str, Any] = {
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cwd": os.getcwd(),
    }
    if config is not None:
        info["config"] = config
    if started is not None:
        info["wall_time_s"] = round(time.time() - started, 1)
    return info


def write_json(path: str | Path, data: Any) -> Path:
    """Write atomically (temp file + rename): a killed run never leaves a half-written result behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path
