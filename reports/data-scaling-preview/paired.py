"""Paired comparisons behind NOTES.md: top-1 of the likelihood rankings per strictly gated diff (mean over the two
held-out phrasings), paired bootstrap over diffs (metadit.eval.stats: 10,000 resamples, seed 0).
Run from the repository root: python reports/data-scaling-preview/paired.py"""
import json, collections
from metadit.eval.stats import paired_bootstrap, bootstrap_mean
rows = [json.loads(l) for l in open("reports/data-scaling-preview/rows.jsonl")]
def per_diff(entry, method, key):
    acc = collections.defaultdict(list)
    for r in rows:
        if r["entry"] == entry and r["method"] == method and r.get("passed"):
            acc[r["diff"]].append(key(r))
    return {d: sum(v) / len(v) for d, v in acc.items()}
top1 = lambda r: float(r["match"]["exact"])
for name, key in (("top-1", top1),):
    a = per_diff("n112", "likelihood", key); b = per_diff("n112", "likelihood_base", key); c = per_diff("n48", "likelihood", key)
    ds = list(a)  # first-seen order, as the report resamples them
    for lab, other in (("likelihood n112 - likelihood_base", b), ("likelihood n112 - likelihood n48", c), ("likelihood n48 - likelihood_base", b)):
        first = a if "n112 -" in lab else c
        print(name, lab, len(ds), paired_bootstrap([first[d] for d in ds], [other[d] for d in ds]))
    for lab, m in (("n48 likelihood", c), ("n112 likelihood", a), ("likelihood_base", b)):
        print(name, lab, bootstrap_mean([m[d] for d in ds]))
