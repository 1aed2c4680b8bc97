"""The files a DIT run leaves in its log directory, each written by a callback (`metadit fit|test` add both).

- `SplitWriter`: `split.json`, which labels train, validate and test (`metadit eval` reads it), at every stage's set-up.
- `AdapterExport`: at the end of fit, the best checkpoint's adapter as a peft directory, `adapter/`
  (`PeftModel.from_pretrained(base, RUN/adapter)` loads it; `metadit.json` records the chat format,
  `metadit_best.json` the checkpoint it came from, `split.json` a copy of the run's, so the folder ships alone; an
  encoder mode's `DiffEncoder` beside it, see
  `metadit.dit.adapter`). `metadit eval --run RUN` answers the held-out diffs with it, in every mode.

Files go to the run's log directory on the global-zero process only; a run with no log directory (`fast_dev_run`)
writes none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
import torch

from metadit.dit.adapter import save_adapter


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


class AdapterExport(Callback):
    """At the end of fit, loads the best checkpoint's trainable parts (the trainer's checkpoint callback's
    `best_model_path`: the shipped configs monitor held-out-diff validation loss; none: the final weights) and saves
    them with `metadit.dit.adapter.save_adapter` to `RUN/adapter/`, with `metadit_best.json` ({checkpoint, best_val_loss})
    and a copy of the run's `split.json`: the folder alone is what ships, and `metadit eval` refuses an adapter without
    the split it trained on (it might have trained on the diffs it is asked about)."""

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
        hp = pl_module.hparams
        path = save_adapter(pl_module.model, out / self.DIRNAME, hp.base_model, hp.chat_format, pl_module.reader)
        score = cb.best_model_score if best else None
        (path / "metadit_best.json").write_text(json.dumps({"checkpoint": best or None,
                                                            "best_val_loss": float(score) if score is not None else None}))
        split = out / SplitWriter.FILENAME
        if split.is_file():
            shutil.copyfile(split, path / SplitWriter.FILENAME)


def default_callbacks() -> list[Callback]:
    """The callbacks `metadit fit|validate|test|predict` add unless the config lists one of the same class."""
    return [SplitWriter(), AdapterExport()]
