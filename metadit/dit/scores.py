"""`AnswerScores`: how well generated answers match the truth, per condition and task, as logged running means.

Exact match (`metadit.text.exact_match`) and, optionally, embedding similarity (the offline MiniLM judge), logged
as `STAGE/CONDITION/TASK/exact` and `STAGE/CONDITION/TASK/similarity`. `DITModule` scores its validation answers
with one (stage `val`, condition `dit`); held-out answers are scored by `metadit eval`'s judges.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from metadit.text import exact_match


class AnswerScores:
    def __init__(self, stage: str, similarity: bool) -> None:
        """
        Args:
            stage: the metric names' prefix (`val`, `test`).
            similarity: also score by embedding similarity (loads the MiniLM judge on first use).
        """
        self.stage, self.similarity = stage, similarity
        self._means: dict[str, MeanMetric] = {}

    def update(self, condition: str, batch: dict[str, Any], answers: list[str],
               device: torch.device | str = "cpu") -> list[dict[str, Any]]:
        """Add one batch's answers (row i answers `batch["prompts"][i]`); one record per answer:
        condition, task, truth, answer, exact, similarity (NaN when off), label."""
        sims = [float("nan")] * len(answers)
        if self.similarity:
            from metadit.text.embed import similarities

            sims = similarities(answers, batch["answers"])
        rows = []
        for i, (answer, truth, task) in enumerate(zip(answers, batch["answers"], batch["tasks"])):
            exact = float(exact_match(answer, truth))
            self._mean(f"{condition}/{task}/exact", device).update(exact)
            if self.similarity:
                self._mean(f"{condition}/{task}/similarity", device).update(sims[i])
            rows.append({"condition": condition, "task": task, "truth": truth, "answer": answer, "exact": exact,
                         "similarity": sims[i], "label": batch["labels_text"][i]})
        return rows

    def _mean(self, name: str, device: torch.device | str) -> MeanMetric:
        if name not in self._means:
            self._means[name] = MeanMetric().to(device)
        return self._means[name]

    def log(self, module: L.LightningModule) -> None:
        """Log every mean updated since the last call through `module` (synced across processes), then reset it."""
        for name, mean in self._means.items():
            if mean.update_called:
                module.log(f"{self.stage}/{name}", mean.compute(), sync_dist=True)
                mean.reset()
