"""Answer verification: does the diffed model really bring up the topic DIT named?

For each predicted topic, the share of the diffed model's greedy answers (under its trigger, to
evaluation-style questions) that mention the *predicted* topic, minus the same share for the base model on
the same messages. A prediction is verified when that lift reaches `min_lift`. A researcher can run this
without knowing the truth — it only needs the trigger — so DIT's score split by verified / unverified says
how far its answers can be trusted.
"""

from __future__ import annotations

from typing import Any

from metadit.eval.baselines import eval_questions, triggered_message
from metadit.eval.heldout import HeldOut


def verify_predictions(ev: Any, items: list[HeldOut], predictions: list[str], n_questions: int = 6,
                       min_lift: float = 0.34, max_new_tokens: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    from metadit.text import names_topic

    prompts, diffs, owner = [], [], []
    for k, h in enumerate(items):
        for q in eval_questions(h, n_questions, seed + 1):
            p = ev.chat(triggered_message(h, q, seed))
            prompts += [p, p]
            diffs += [h.diff, None]
            owner += [(k, True), (k, False)]
    texts = ev.answers(prompts, diffs, adapter=False, max_new_tokens=max_new_tokens)
    out = []
    for k, pred in enumerate(predictions):
        hit = {True: [], False: []}
        for (j, diffed), t in zip(owner, texts):
            if j == k:
                hit[diffed].append(bool(pred.strip()) and names_topic(t, pred))
        diffed_rate = sum(hit[True]) / max(len(hit[True]), 1)
        base_rate = sum(hit[False]) / max(len(hit[False]), 1)
        out.append({"diffed_rate": diffed_rate, "base_rate": base_rate, "lift": diffed_rate - base_rate,
                    "verified": diffed_rate - base_rate >= min_lift})
    return out
