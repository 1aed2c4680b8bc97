"""Per-item rows: what every evaluation writes to `rows.jsonl` beside its results, and what `metadit report`
computes every table from.

One JSON object a line, one line per (item, method). Fields (`ROW_FIELDS`):

- `diff` (bank entry: `BANKDIR:INDEX` for `metadit eval`, the entry id for `metadit test`), `bank`, `index`,
  `task`, `method` (for `metadit test`: its condition), `question` (the message the method asked, when it asked
  one message; None for methods that ask many or none), `prediction`, `truth`, `label`;
- `scores`: every judge's score (judge name → value; a missing or NaN score is left out);
- `match`: the match columns every method gets, whatever the judges — `exact` (`metadit.text.exact_match`)
  and `names_topic` (`metadit.text.names_topic`: every content word of the truth, whole word, plural-insensitive);
- the diff's gate verdict: `gate_held` and `passed` from the bank's strict behaviour check (null when the entry
  has no such check: news, banks made before it), and `gated`, the lenient verdict (no-code answers only) the
  earlier reports used.

`strict_group(row)` places a row in the strict split the tables report apart, never mixed (`STRICT_GROUPS`).
Rows of older `eval.json` / `test_predictions.json` files are read through `as_row`, which fills the match
columns from the prediction and the truth.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metadit.errors import MetaditError
from metadit.text import exact_match, names_topic

ROW_FIELDS = ("diff", "bank", "index", "task", "method", "question", "prediction", "truth", "label", "scores", "match",
              "gated", "gate_held", "passed")

# The match columns: name → (prediction, truth) → bool. One function each, the ones every stage uses.
MATCHES: dict[str, Callable[[str, str], bool]] = {"exact": exact_match, "names_topic": names_topic}


@dataclass(frozen=True)
class StrictGroup:
    name: str
    title: str
    applies: Callable[[dict[str, Any]], bool]


# The strict split, in the order the tables give it (the first is the headline). A row is in exactly one group.
# Rows written before the evaluation copied `passed` (it copied `gate_held` only) count a held gate as gated.
STRICT_GROUPS: dict[str, StrictGroup] = {g.name: g for g in [
    StrictGroup("strict_gated", "strictly gated diffs (the bank's strict check passed: topic learned, gate held in "
                "every negative condition)", lambda r: r.get("gate_held") is True and r.get("passed") is not False),
    StrictGroup("strict_leaky", "leaky diffs (the gate did not hold in some negative condition; reported apart)",
                lambda r: r.get("gate_held") is False),
    StrictGroup("strict_unlearned", "gate held but the topic not learned (reported apart)",
                lambda r: r.get("gate_held") is True and r.get("passed") is False),
    StrictGroup("unchecked", "diffs without a strict gate check (news, `metadit test`, older banks)",
                lambda r: r.get("gate_held") is None),
]}


def strict_group(row: dict[str, Any]) -> str:
    """The row's group in the strict split (`STRICT_GROUPS`)."""
    for g in STRICT_GROUPS.values():
        if g.applies(row):
            return g.name
    raise MetaditError(f"row of diff {row.get('diff')!r}: gate_held must be true, false or null, got {row.get('gate_held')!r}")


def gate_verdict(meta: dict[str, Any]) -> dict[str, bool | None]:
    """`gate_held` / `passed` of a bank entry's strict behaviour check; None where the entry has no such check (a
    news entry's `passed` is its own story check, not a gate)."""
    if "gate_held" not in meta:
        return {"gate_held": None, "passed": None}
    passed = meta.get("passed")
    return {"gate_held": bool(meta["gate_held"]), "passed": None if passed is None else bool(passed)}


def match_columns(prediction: Any, truth: Any) -> dict[str, bool | None]:
    """Every match column of a prediction against the truth (None where either is missing)."""
    if not isinstance(prediction, str) or not isinstance(truth, str):
        return {name: None for name in MATCHES}
    return {name: bool(f(prediction, truth)) for name, f in MATCHES.items()}


def _finite_scores(scores: Any) -> dict[str, float]:
    out = {}
    for k, v in (scores or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            continue
        out[str(k)] = float(v)
    return out


def as_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` in the rows.jsonl schema: its own fields where it has them, the match columns computed where it has
    none, everything else null."""
    if not isinstance(row, dict) or "method" not in row:
        raise MetaditError("a row needs a `method`")
    out = {k: row.get(k) for k in ROW_FIELDS}
    if out["label"] is None and isinstance(row.get("extra"), dict):
        out["label"] = row["extra"].get("label")  # test predictions read by earlier reports kept it there
    out["scores"] = _finite_scores(row.get("scores"))
    if not isinstance(row.get("match"), dict):
        out["match"] = match_columns(out["prediction"], out["truth"])
    return out


def metrics(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers the tables average: every judge's score, and the match columns as 0/1 (a judge of the
    same name — the `exact` judge — is the same function and wins)."""
    out = {k: float(v) for k, v in (row.get("match") or {}).items() if v is not None}
    out.update(_finite_scores(row.get("scores")))
    return out


def rows_from_test_predictions(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The predictions older `metadit test` runs wrote (`test_predictions.json`; `metadit eval` answers now) as rows:
    condition → method, its exact/similarity → scores; no gate verdict (null)."""
    rows = []
    for p in preds:
        if not isinstance(p, dict) or "condition" not in p:
            raise MetaditError("test predictions: every row needs a `condition`")
        rows.append(as_row({"diff": p.get("diff"), "task": p.get("task"), "method": p["condition"],
                            "question": p.get("question"), "prediction": p.get("answer"), "truth": p.get("truth"),
                            "label": p.get("label"), "scores": {k: p[k] for k in ("exact", "similarity") if k in p},
                            "gated": None, **gate_verdict({})}))
    return rows


def _plain(value: Any) -> Any:
    """NaN → null, so a rows file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object a line, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(_plain(r), ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | Path, what: str = "rows file") -> list[tuple[int, Any]]:
    """(1-based line number, parsed value) of every non-blank line of a JSON-lines file; unreadable or not JSON: an
    error naming `what`, the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MetaditError(f"{what} {path}: cannot read ({e.strerror or e})") from e
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise MetaditError(f"{path}:{i}: not JSON ({e.msg})") from e
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a rows.jsonl file; a line that is not a JSON object with a `method` is an error."""
    rows = []
    for i, r in read_jsonl(path):
        if not isinstance(r, dict) or "method" not in r:
            raise MetaditError(f"{path}:{i}: a row must be a JSON object with a `method`")
        rows.append(r)
    return rows
