"""The numbers of every evaluation table, computed from per-item rows alone (`metadit.eval.rows`).

`interval_tables(rows)` gives, per score (every judge's score and every match column), per group of the
strict split (`rows.STRICT_GROUPS`, the strictly gated diffs first, the others apart) and per method: n, the
mean and its 95 % bootstrap interval; and, where DIT scored the same diffs in that group, the paired
bootstrap of DIT minus the method (`metadit.eval.stats`).

The unit is the diff, not the row. A method that asks every held-out phrasing writes one row per (diff,
phrasing), and those rows are not independent draws: resampling them as if they were would narrow the interval
by about the square root of the phrasings per diff. So each (diff, task) is first reduced to the mean of its
rows (a cluster mean), and the bootstrap resamples those: n counts diffs, `rows` the rows behind them. Pairs are
(diff, task) cluster means of both methods, so a method asked once per diff compares with DIT's mean over its
phrasings, on the diffs both scored; the pair count says how many. Rows that name no diff are their own cluster.
"""

from __future__ import annotations

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


def cluster_means(rows: list[dict[str, Any]], score: str) -> dict[tuple[Any, ...], float]:
    """(diff, task) → the mean of `score` over that diff's rows (its phrasings), in first-seen order; a row that
    names no diff is a cluster of its own, keyed by its position."""
    sums: dict[tuple[Any, ...], list[float]] = {}
    for i, r in enumerate(rows):
        v = metrics(r).get(score)
        if v is None:
            continue
        key = (r["diff"], r.get("task")) if r.get("diff") is not None else ("row", i)
        sums.setdefault(key, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def interval_tables(rows: list[dict[str, Any]], scores: list[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{score: {group: {method: {"n", "rows", "mean", "low", "high"[, "vs_dit": {"n", "difference", "low", "high",
    "p", "mean_a", "mean_b"}]}}}} over `rows`, n and the bootstrap over (diff, task) cluster means; groups and
    methods that have no value for a score are left out."""
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
            reference = cluster_means([r for r in grows if r["method"] == REFERENCE], score)
            for m in methods:
                mine = [r for r in grows if r["method"] == m]
                clusters = cluster_means(mine, score)
                if not clusters:
                    continue
                cell: dict[str, Any] = bootstrap_mean(list(clusters.values())).as_dict()
                cell["rows"] = sum(metrics(r).get(score) is not None for r in mine)
                if m != REFERENCE and reference:
                    other = clusters
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


# The controls a DIT result is read against, and what each one rules out (the verdict lines say it in words).
CONTROLS = {
    "no_diff": "the adapter asked with no diff: a prior it recites whatever the diff",
    "base_question": "the diffed model asked directly, without the adapter",
}


def verdicts(cells: dict[str, dict[str, Any]], score: str) -> list[str]:
    """What one group's table (`interval_tables(...)[score][group]`) says about DIT against each control, in words:
    beats it only when the whole 95 % interval of the paired difference is above 0."""
    lines = []
    for method, what in CONTROLS.items():
        vs = (cells.get(method) or {}).get("vs_dit")
        if not vs:
            continue
        if vs["low"] > 0:
            word = f"DIT beats {method}"
        elif vs["high"] < 0:
            word = f"DIT is worse than {method}"
        else:
            word = f"DIT does not beat {method} (the interval includes 0)"
        lines.append(f"{word}: {score} {vs['difference']:+.2f} [{vs['low']:+.2f}, {vs['high']:+.2f}] on "
                     f"{vs['n']} diffs; {method} is {what}.")
    return lines
