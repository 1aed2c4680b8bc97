"""The held-out diffs an evaluation runs on: read from a fit run's `split.json`, never chosen after the fact.

Each `HeldOut` carries its diff, metadata, task and true answer, and whether its gate holds — the topic does
not show without the trigger (the bank's behaviour check: share of no-code answers that mention the topic
at most the recipe's gate threshold). Diffs without such a check (news) have `gated = None`.

A held-out diff is never scored if its split group (news: the headline's event template) is shared with a label
the run trained on: `label_groups` gives the groups of a set of labels and `load_heldout(exclude_groups=...)`
leaves those diffs out (splits made before groups existed held some out). Methods that ask the task's
question ask it in every held-out phrasing: `per_phrasing` makes one item per phrasing.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
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
    phrasing: int = 0  # which of the task's held-out phrasings `question()` asks

    @property
    def id(self) -> str:
        """`BANKDIR:INDEX`, the same through a view `DIR[:N]` (it seeds the baselines' question choices)."""
        from metadit.bank.diff_bank import split_bank_spec

        return f"{split_bank_spec(self.bank)[0].name}:{self.index}"

    def questions(self) -> list[str]:
        """Every held-out phrasing of the task (digit codes: the prefix question, as in training)."""
        from metadit.dit.tasks import heldout_phrasings

        return heldout_phrasings(get_task(self.task), self.meta)

    def question(self) -> str:
        """The held-out phrasing this item asks (`phrasing`; the first by default)."""
        return self.questions()[self.phrasing]


def per_phrasing(items: list[HeldOut]) -> list[HeldOut]:
    """Each item once per held-out phrasing of its task, in order (item 0 in every phrasing, then item 1, ...)."""
    return [replace(h, phrasing=k, extra=dict(h.extra)) for h in items for k in range(len(h.questions()))]


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
    exclude_groups: set[str] | None = None,
    load_diffs: bool = True,
) -> list[HeldOut]:
    """Every entry of `banks` whose label (per task) is in `labels` (None: any label) and not in `exclude`, and
    whose split group (`Task.group_of`) is not in `exclude_groups`; one `HeldOut` per (entry, task), with its
    diff's factors unless `load_diffs` is off (then `diff` is None)."""
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
                if t.applies(meta) and (labels is None or label in labels) and label not in (exclude or ()) \
                        and t.group_of(meta) not in (exclude_groups or ()):
                    out.append(HeldOut(str(path), i, None, meta, t.name, t.answer(meta), gate_of(meta, threshold)))
    if limit is not None and len(out) > limit:
        out = sorted(random.Random(seed).sample(out, limit), key=lambda h: (h.bank, h.index, h.task))
    opened: dict[str, Any] = {}
    for h in out if load_diffs else ():  # load factors only for the chosen entries
        bank = opened.setdefault(h.bank, DiffBank.open(h.bank))
        h.diff = bank[h.index][0]
    return out


def label_groups(banks: list[str], labels: set[str], tasks: list[str]) -> set[str]:
    """The split groups (`Task.group_of`) of the entries of `banks` whose label, per task, is in `labels`."""
    from metadit.bank import DiffBank

    task_objs: list[Task] = [get_task(t) for t in tasks]
    out: set[str] = set()
    for path in banks:
        bank = DiffBank.open(path)
        for i in range(len(bank)):
            meta = bank.meta(i)
            out |= {t.group_of(meta) for t in task_objs if t.applies(meta) and str(meta.get(t.label_key)) in labels}
    return out
