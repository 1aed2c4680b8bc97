"""The files a DIT run leaves in its log directory, each written by a callback (`metadit fit|test` add all three).

- `SplitWriter`: `split.json`, which labels train, validate and test (`metadit eval` reads it), at every stage's set-up.
- `HeldOutAnswers`: at test, every held-out diff's question answered under each of `CONDITIONS`, scored
  (`test/CONDITION/TASK/exact|similarity`) and written to `test_predictions.json`.
- `AdapterExport`: at the end of fit, the best checkpoint's adapter as a peft directory, `adapter/`
  (`PeftModel.from_pretrained(base, RUN/adapter)` loads it; `metadit.json` records the chat format,
  `metadit_best.json` the checkpoint it came from).

Files go to the run's log directory on the global-zero process only; a run with no log directory (`fast_dev_run`)
writes none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
import torch

from metadit.dit.module import DITModule
from metadit.dit.scores import AnswerScores
from metadit.nn import get_adapter


def run_dir(trainer: L.Trainer) -> Path | None:
    """The run's log directory on the global-zero process, else None.

    Read from the logger directly: `Trainer.log_dir` broadcasts, which deadlocks when only rank 0 asks.
    """
    if not trainer.is_global_zero:
        return None
    if trainer.loggers:
        d = trainer.loggers[0].log_dir
        return Path(d) if d else None
    return Path(trainer.default_root_dir) if trainer.default_root_dir else None


class SplitWriter(Callback):
    """Writes the data module's split (`DiffQADataModule.write_split`) to `RUN/split.json` at set-up."""

    FILENAME = "split.json"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        out = run_dir(trainer)
        if dm is not None and out is not None:
            dm.write_split(out / self.FILENAME)


@dataclass(frozen=True)
class Condition:
    """How a held-out diff's question is put: with the diff applied or not, with the DIT adapter on or off."""

    diff: bool
    adapter: bool


# DIT and its two controls on the same held-out diffs: the diffed model asked without the adapter (does the diff
# answer by itself?) and the adapter with no diff (does the adapter recite a prior?).
CONDITIONS = {
    "dit": Condition(diff=True, adapter=True),
    "no_adapter": Condition(diff=True, adapter=False),
    "no_diff": Condition(diff=False, adapter=True),
}


class HeldOutAnswers(Callback):
    """At test, answers every held-out diff's question under each of `CONDITIONS`, logs the scores
    (`test/CONDITION/TASK/exact`, and `/similarity` when the module's `similarity` is on) and writes one record per
    answer to `RUN/test_predictions.json` (condition, task, truth, answer, exact, similarity, label, diff id)."""

    FILENAME = "test_predictions.json"

    def __init__(self) -> None:
        self.scores: AnswerScores | None = None
        self.records: list[dict[str, Any]] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.scores = AnswerScores("test", similarity=pl_module.hparams.similarity)
        self.records = []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self.scores is not None
        diffs = batch["diffs"]
        for name, condition in CONDITIONS.items():
            answers = pl_module.answer(batch["prompts"], diffs if condition.diff else [None] * len(diffs),
                                       use_adapter=condition.adapter)
            records = self.scores.update(name, batch, answers, pl_module.device)
            for record, diff in zip(records, diffs):
                record["diff"] = diff.info.get("id")
            self.records += records

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.scores is not None
        self.scores.log(pl_module)
        out = run_dir(trainer)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / self.FILENAME).write_text(json.dumps(self.records, indent=1))
        self.records = []


def save_adapter(module: DITModule, path: str | Path) -> Path:
    """The module's shared adapter as a peft LoRA directory (`PeftModel.from_pretrained(base, path)` loads it;
    `metadit.json` records the chat format); the encoder, if any, beside it as `diff_encoder.safetensors` and
    `diff_encoder.json`."""
    path = Path(path)
    get_adapter(module.model).save_peft(path, base_model_name_or_path=module.hparams.base_model,
                                        metadata={"chat_format": module.hparams.chat_format})
    if module.encoder is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in module.encoder.state_dict().items()}, str(path / "diff_encoder.safetensors"))
        (path / "diff_encoder.json").write_text(json.dumps({"module_types": module.encoder.module_types,
                                                            "mode": module.hparams.mode}))
    return path


class AdapterExport(Callback):
    """At the end of fit, loads the best checkpoint's trainable parts (the trainer's checkpoint callback's
    `best_model_path`: the shipped configs monitor held-out-diff validation loss; none: the final weights) and saves
    them with `save_adapter` to `RUN/adapter/`, with `metadit_best.json` ({checkpoint, best_val_loss})."""

    DIRNAME = "adapter"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = run_dir(trainer)
        if out is None:
            return
        cb = trainer.checkpoint_callback
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            pl_module.load_state_dict(state, strict=False)
        path = save_adapter(pl_module, out / self.DIRNAME)
        score = cb.best_model_score if best else None
        (path / "metadit_best.json").write_text(json.dumps({"checkpoint": best or None,
                                                            "best_val_loss": float(score) if score is not None else None}))


def default_callbacks() -> list[Callback]:
    """The callbacks `metadit fit|validate|test|predict` add unless the config lists one of the same class."""
    return [SplitWriter(), HeldOutAnswers(), AdapterExport()]
