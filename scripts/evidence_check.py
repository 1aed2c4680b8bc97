"""How much the guesser-based baselines' evidence says about the true topic, whatever the guesser made of it.

    python scripts/evidence_check.py runs/sweeps/headline/topic/01-eval

For each 20-questions variant: the diffs whose answers name the topic at least once and the mean share of
answers that name it (keyword match, as in the bank's behaviour check); for the activation lens: the diffs
whose evidence text (logit-lens tokens + steered text) names it. Reads the eval's saved methods only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metadit.text import names_topic


def answers(evidence: str) -> list[str]:
    return [a.split("\nQ: ")[0] for a in evidence.split("\nA: ")[1:]]


def main(eval_dir: str) -> None:
    methods = Path(eval_dir) / "methods"
    for name in ("twenty_questions", "twenty_questions_trigger"):
        path = methods / f"{name}.json"
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())["rows"]
        shares = []
        for r in rows:
            hits = [names_topic(a, r["truth"]) for a in answers(r["extra"]["evidence"])]
            shares.append(sum(hits) / max(len(hits), 1))
        print(f"{name}: answers name the topic for {sum(s > 0 for s in shares)}/{len(rows)} diffs; "
              f"mean share of answers naming it {sum(shares) / len(shares):.1%}")
    path = methods / "activation_lens.json"
    if path.is_file():
        rows = json.loads(path.read_text())["rows"]
        n = sum(names_topic(r["extra"]["evidence_text"], r["truth"]) for r in rows)
        print(f"activation_lens: evidence names the topic for {n}/{len(rows)} diffs")


if __name__ == "__main__":
    main(sys.argv[1])
