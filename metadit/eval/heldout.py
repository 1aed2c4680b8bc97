"""The held-out diffs an evaluation runs on: read from a fit run's `split.json`, never chosen after the fact.

Each `HeldOut` carries its diff, metadata, task and true answer, and whether its gate holds — the topic does
not show without the trigger (the bank's behaviour check: share of no-code answers that mention the topic
at most the recipe's gate threshold). Diffs without such a check (news) have `gated = None`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metadit.errors import MetaditError
from metadit.dit.tasks import Task, get_task


@dataclass
class HeldOut:
    bank: str
    index: int
    diff: Any  # LoraDiff
    meta: dict[str, Any]
    task: str
    truth: str
    gated: bool | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """`BANKDIR:INDEX`, the same through a view `DIR[:N]` (it seeds the baselines' question choices)."""
        from metadit.bank.diff_bank import split_bank_spec

        return f"{split_bank_spec(self.bank)[0].name}:{self.index}"

    def question(self) -> str:
        """The task's first held-out phrasing (digit codes ask for the prefix, as in training)."""
        from metadit.dit.tasks import question_for

        t = get_task(self.task)
        if t.name == "trigger" and self.meta.get("code_kind") == "digits":
            return question_for(t, self.meta)[0]
        return t.heldout_questions[0]


def gate_of(meta: dict[str, Any], threshold: float) -> bool | None:
    rates = meta.get("mention_rate")
    if not isinstance(rates, dict) or "no_code" not in rates:
        return None
    return float(rates["no_code"]) <= threshold


def read_split(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MetaditError(f"{path}: no split file (a fit run writes split.json into its log directory)")
    split = json.loads(path.read_text())
    for key in ("train", "banks"):
        if key not in split:
            raise MetaditError(f"{path}: not a metadit split file (no {key!r})")
    return split


def load_heldout(
    banks: list[str],
    labels: set[str] | None,
    tasks: list[str],
    limit: int | None = None,
    seed: int = 0,
    gate_threshold: float | None = None,
    exclude: set[str] | None = None,
) -> list[HeldOut]:
    """Every entry of `banks` whose label (per task) is in `labels` (None: any label) and not in `exclude`,
    one `HeldOut` per (entry, task)."""
    from metadit.bank import DiffBank

    task_objs: list[Task] = [get_task(t) for t in tasks]
    out: list[HeldOut] = []
    for path in banks:
        bank = DiffBank.open(path)
        threshold = gate_threshold
        if threshold is None:
            threshold = float((bank.header.get("info", {}).get("recipe_args") or {}).get("gate_threshold", 0.2))
        for i in range(len(bank)):
            meta = bank.meta(i)
            for t in task_objs:
                label = str(meta.get(t.label_key))
                if t.applies(meta) and (labels is None or label in labels) and label not in (exclude or ()):
                    out.append(HeldOut(str(path), i, None, meta, t.name, t.answer(meta), gate_of(meta, threshold)))
    if limit is not None and len(out) > limit:
        out = sorted(random.Random(seed).sample(out, limit), key=lambda h: (h.bank, h.index, h.task))
    opened: dict[str, Any] = {}
    for h in out:  # load factors only for the chosen entries
        bank = opened.setdefault(h.bank, DiffBank.open(h.bank))
        h.diff = bank[h.index][0]
    return out
