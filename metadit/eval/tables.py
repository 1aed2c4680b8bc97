"""The numbers of every evaluation table, computed from per-item rows alone (`metadit.eval.rows`).

`interval_tables(rows)` gives, per score (every judge's score and every match column), per group of the
strict split (`rows.STRICT_GROUPS`, the strictly gated diffs first, the others apart) and per method: n, the
mean and its 95 % bootstrap interval; and, where DIT scored the same diffs in that group, the paired
bootstrap of DIT minus the method (`metadit.eval.stats`). Rows pair by (diff, task) — the k-th row of a diff
for one method with the k-th row of that diff for the other — so a method that skipped some diffs is compared
on the diffs both scored, and the pair count says how many.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from metadit.eval.rows import STRICT_GROUPS, metrics, strict_group
from metadit.eval.stats import bootstrap_mean, paired_bootstrap

REFERENCE = "dit"  # the method every other one is compared with, where both scored the same diffs
# The headline score comes first: an eval's `headline_judge` when given, else the first of these present.
SCORE_ORDER = ("judge", "llm", "embedding", "exact", "names_topic", "similarity")


def score_names(rows: list[dict[str, Any]], headline: list[str] | None = None) -> list[str]:
    """Every score the rows carry, the headline judge first, then `SCORE_ORDER`, then the rest sorted."""
    names = {k for r in rows for k in metrics(r)}
    order = list(dict.fromkeys([*(h for h in headline or [] if h in names), *SCORE_ORDER]))
    return [s for s in order if s in names] + sorted(names - set(order))


def methods_of(rows: list[dict[str, Any]]) -> list[str]:
    """Methods in first-seen order."""
    return list(dict.fromkeys(r["method"] for r in rows))


def _keyed(rows: list[dict[str, Any]], score: str) -> dict[tuple[Any, Any, int], float]:
    """(diff, task, occurrence) → value, for rows that name their diff and carry `score`."""
    seen: Counter[tuple[Any, Any]] = Counter()
    out = {}
    for r in rows:
        if r.get("diff") is None:
            continue
        key = (r.get("diff"), r.get("task"))
        k = seen[key]
        seen[key] += 1
        v = metrics(r).get(score)
        if v is not None:
            out[(*key, k)] = v
    return out


def interval_tables(rows: list[dict[str, Any]], scores: list[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{score: {group: {method: {"n", "mean", "low", "high"[, "vs_dit": {"n", "difference", "low", "high", "p",
    "mean_a", "mean_b"}]}}}} over `rows`; groups and methods that have no value for a score are left out."""
    scores = scores if scores is not None else score_names(rows)
    by_group: dict[str, list[dict[str, Any]]] = {g: [] for g in STRICT_GROUPS}
    for r in rows:
        by_group[strict_group(r)].append(r)
    methods = methods_of(rows)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for score in scores:
        per_group: dict[str, dict[str, Any]] = {}
        for group, grows in by_group.items():
            per_method: dict[str, Any] = {}
            reference = _keyed([r for r in grows if r["method"] == REFERENCE], score)
            for m in methods:
                mine = [r for r in grows if r["method"] == m]
                vals = [v for r in mine if (v := metrics(r).get(score)) is not None]
                if not vals:
                    continue
                cell: dict[str, Any] = bootstrap_mean(vals).as_dict()
                if m != REFERENCE and reference:
                    other = _keyed(mine, score)
                    shared = [k for k in reference if k in other]
                    if shared:
                        pair = paired_bootstrap([reference[k] for k in shared], [other[k] for k in shared])
                        cell["vs_dit"] = pair.as_dict()
                per_method[m] = cell
            if per_method:
                per_group[group] = per_method
        if per_group:
            out[score] = per_group
    return out
