"""Likelihood ranking: does the diff make its own label the most likely answer?

For held-out diff i and every held-out label j of the same task, the mean log-probability of label j's
answer tokens (teacher-forced, after the task's held-out question) under diff i + the DIT adapter, minus the
same under the adapter with no diff — the second term removes the adapter's prior over labels, so a label
ranks high only if *this diff* raises it. The rank of the true label among the n candidates: chance top-1 is
1/n. Cheap (forward passes only), needs no judge, and sees more than one greedy answer does.

With `adapter=False` the same ranking runs on the diffed model against the base model, no adapter: the
white-box control (`likelihood_base`) that says how much of the ranking the diff gives away by itself — a gated
diff is trained to leave untriggered *samples* alone, not every log-probability — and so how much the adapter adds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from metadit.eval.heldout import HeldOut
from metadit.nn import adapter_disabled


@torch.no_grad()
def label_scores(ev: Any, items: list[HeldOut], labels: list[str], max_answer_tokens: int = 32,
                 adapter: bool = True) -> torch.Tensor:
    """[len(items), len(labels)]: per-token log-probability of each label under each diff, minus under no diff;
    under the DIT adapter, or (`adapter=False`) the bare model."""
    from metadit.text import prompt_answer_losses

    if not adapter:
        with adapter_disabled(ev.model):
            return label_scores(ev, items, labels, max_answer_tokens)
    model, tok = ev.model, ev.tok
    scores = torch.zeros(len(items), len(labels))
    prior_cache: dict[str, list[float]] = {}
    for i, h in enumerate(items):
        prompt = ev.chat(h.question())
        if prompt not in prior_cache:  # the adapter alone, no diff: one pass per distinct question
            prior_cache[prompt] = prompt_answer_losses(model, tok, prompt, labels, None, max_answer_tokens,
                                                       batch_size=ev.batch_size)
        with_diff = prompt_answer_losses(model, tok, prompt, labels, h.diff, max_answer_tokens,
                                         batch_size=ev.batch_size)
        # losses are mean negative log-probabilities: score = log p(diff) - log p(no diff)
        scores[i] = torch.tensor(prior_cache[prompt]) - torch.tensor(with_diff)
    return scores


def rank_labels(ev: Any, items: list[HeldOut], adapter: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """Per item: the top-scoring held-out label of its task, with the true label's rank (1 = best) and n; under the
    DIT adapter, or (`adapter=False`) the bare model."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for k, h in enumerate(items):
        by_task[h.task].append(k)
    out: list[tuple[str, dict[str, Any]] | None] = [None] * len(items)
    for task, idx in by_task.items():
        labels = sorted({items[k].truth for k in idx})
        scores = label_scores(ev, [items[k] for k in idx], labels, adapter=adapter)
        for row, k in enumerate(idx):
            order = torch.argsort(scores[row], descending=True).tolist()
            rank = order.index(labels.index(items[k].truth)) + 1
            out[k] = (labels[order[0]], {"rank": rank, "n_labels": len(labels), "reciprocal_rank": 1.0 / rank,
                                         "top5": [labels[j] for j in order[:5]], "question": items[k].question()})
    return [o for o in out if o is not None]
