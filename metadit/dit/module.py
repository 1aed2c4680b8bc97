"""`DITModule`: the shared DIT adapter trained while each example's own diff is applied.

A thin LightningModule around injected parts: the patched base model (`base`, a `PatchedBaseModel`: frozen, every
target Linear carries the row's diff and the shared adapter, `metadit.nn`), loaded in `configure_model`, and, for the
hypernetwork ablation, a `DiffEncoder`. Modes (`metadit.dit.adapter.DITReader`, which `metadit eval` answers through
too): `dit` (diff applied, no encoder), `encoder` (diff not applied; the encoder's soft tokens are the only way the
diff gets in), `dit+encoder`. One `step` (the loss) serves train/val/test; `answer` generates under a batch of diffs
(K diffs per `generate` call). Validation also scores answers for every held-out diff (`val/dit/TASK/exact`, a
metric a checkpoint callback may monitor); the test stage reports the held-out diffs' loss (`test/loss`), and their
answers are `metadit eval`'s. What a run writes — the split, the exported adapter — is done by the callbacks in
`metadit.dit.callbacks`.
"""

from __future__ import annotations

from contextlib import nullcontext
import inspect
from typing import Any

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
import torch

from metadit.errors import MetaditError
from metadit.models import pins_host_memory, training_attention
from metadit.nn import DiffBatch, DiffEncoder, layer_shapes, use_diffs
from metadit.dit.adapter import DITReader, Mode, check_mode
from metadit.dit.base import FLAT_KEYS, PatchedBaseModel
from metadit.dit.scores import AnswerScores


class DITModule(L.LightningModule):
    def __init__(
        self,
        base_model: str = "smollm2-135m-instruct",
        mode: Mode = "dit",
        adapter_rank: int = 16,
        adapter_alpha: float | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        encoder: DiffEncoder | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 24,
        generate_in_validation: bool = True,
        similarity: bool = True,
        seed: int = 0,
        dtype: str = "auto",
        chat_format: str = "default",
        base: PatchedBaseModel | None = None,
    ) -> None:
        """
        Args:
            base_model: the model the banks were made for (embedded name, HF id or directory).
            mode: `dit`, `encoder` or `dit+encoder`.
            adapter_rank: rank of the shared DIT adapter (paper: 16).
            adapter_alpha: its alpha (None: alpha = rank).
            lr: AdamW learning rate (paper: 1e-4), when no `optimizer` is given.
            weight_decay: AdamW weight decay, when no `optimizer` is given.
            encoder: the DiffEncoder (the encoder modes; default: a `DiffEncoder()`).
            optimizer: the optimizer over the trainable parameters, from the YAML as LightningCLI writes it
                (`model.optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3e-4}}`); default AdamW(lr, weight_decay).
            lr_scheduler: its learning-rate scheduler, the same way (`model.lr_scheduler: {class_path: ...}`); default none.
            max_new_tokens: answer length when generating.
            generate_in_validation: generate and score answers for held-out diffs at each validation.
            similarity: also score validation answers by embedding similarity (the offline MiniLM judge).
            seed: the adapter's initialisation.
            dtype: the base model's dtype (`bfloat16`, `float32`, or `auto`: bf16 where the hardware computes it
                natively, else fp32).
            chat_format: prompt layout (`default`, `no_system`): the banks' (`metadit gen --chat_format`; the CLI
                sets it from `data.banks`), recorded with the exported adapter.
            base: the patched base model, injected (default: a `PatchedBaseModel` from `base_model`, `dtype`,
                `chat_format`, `adapter_rank`, `adapter_alpha` and `seed`). Given, it sets those keys: each left at
                its default takes the base's value, one set otherwise must agree with it.
        """
        super().__init__()
        check_mode(mode)
        flat = {"base_model": base_model, "dtype": dtype, "chat_format": chat_format, "adapter_rank": adapter_rank,
                "adapter_alpha": adapter_alpha, "seed": seed}
        injected = base is not None
        if base is None:
            base = PatchedBaseModel(**{FLAT_KEYS[k]: v for k, v in flat.items()})
        else:
            _check_agrees(flat, base)
        if "encoder" in mode and encoder is None:
            encoder = DiffEncoder()
        self.save_hyperparameters(ignore=["base", "encoder", "optimizer", "lr_scheduler"])
        if injected:  # the checkpoint and hparams.yaml record the base's values, not the keys' defaults
            self.save_hyperparameters({**self.hparams, **base.settings()})
        self.base = base
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.encoder = encoder if "encoder" in mode else None
        self.model: Any = None
        self.tok: Any = None
        self.strict_loading = False  # checkpoints hold only the trainable parts (adapter, encoder)
        self.val_scores = AnswerScores("val", similarity=similarity)

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model, self.tok = self.base.load()
        self.shapes = layer_shapes(self.model)
        if self.encoder is not None:
            self.encoder.configure(self.model.config.hidden_size)

    def setup(self, stage: str) -> None:
        self.configure_model()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            for bank in dm.banks:
                bank.check_model(self.model)
            formats = {b.chat_format for b in dm.banks}
            if formats != {self.hparams.chat_format}:
                raise MetaditError(f"banks {dm.bank_paths} were made with chat format {sorted(formats)}, the model is set "
                                   f"to {self.hparams.chat_format!r}: set model.chat_format to the banks'")

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if self.encoder is not None:
            checkpoint["encoder_module_types"] = dict(self.encoder.module_types)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        if self.encoder is not None and "encoder_module_types" in checkpoint:
            self.encoder.module_types = dict(checkpoint["encoder_module_types"])

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> dict[str, Any]:
        # Only the token tensors move; diffs are stacked onto the device per batch by `DiffBatch.from_diffs`.
        # Non-blocking where the data module pinned them (a CUDA run); on a CPU run `to` is a no-op either way.
        non_blocking = pins_host_memory(device)
        return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ the forward
    @property
    def reader(self) -> DITReader:
        """How the adapter reads a batch of diffs (this mode, this encoder), as `metadit eval` reads an exported one."""
        return DITReader(self.hparams.mode, self.encoder)

    def _diff_context(self, diffs: list[Any] | None):
        if diffs is None or not self.reader.applies_diffs:
            return nullcontext()
        dtype = next(self.model.parameters()).dtype
        return use_diffs(self.model, DiffBatch.from_diffs(diffs, self.shapes, dtype=dtype, device=self.device))

    def _soft(self, diffs: list[Any] | None, n: int) -> torch.Tensor | None:
        return self.reader.soft_tokens(diffs, n, next(self.model.parameters()).dtype)

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor | None):
        return DITReader.prepend(self.model, ids, mask, soft)

    def step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        diffs = batch["diffs"]
        soft = self._soft(diffs, len(diffs))
        labels = batch["labels"]
        if soft is not None:
            labels = torch.cat([torch.full((labels.shape[0], soft.shape[1]), -100, device=labels.device), labels], 1)
        # Eager attention while training: CPU flash-attention's backward is slow on short rows (models.training_attention).
        attention = training_attention(self.model) if stage == "train" else nullcontext()
        with self._diff_context(diffs), attention:
            logits = self.model(**self._embed(batch["input_ids"], batch["attention_mask"], soft)).logits
        # Mean over each row's answer tokens, then over rows: every diff weighs the same whatever its answer's
        # length, and the mean of equal-sized per-process batches is the global batch's (DDP = one process).
        target = labels[:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), target.clamp_min(0), reduction="none")
        valid = (target != -100).float()
        loss = ((per_token * valid).sum(1) / valid.sum(1).clamp_min(1)).mean()
        self.log(f"{stage}/loss", loss, batch_size=len(diffs), prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    # ------------------------------------------------------------------ answers
    def answer(self, prompts: list[str], diffs: list[Any] | None, use_adapter: bool = True) -> list[str]:
        """Greedy answers in one `generate` call; row i under `diffs[i]` (None: no diff at all) as the mode reads it,
        with or without the adapter (`DITReader.answer`)."""
        return self.reader.answer(self.model, self.tok, prompts, diffs, self.hparams.max_new_tokens,
                                  use_adapter=use_adapter)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.step(batch, "val")
        if self.hparams.generate_in_validation and not self.trainer.sanity_checking:
            self.val_scores.update("dit", batch, self.answer(batch["prompts"], batch["diffs"]), self.device)

    def on_validation_epoch_end(self) -> None:
        self.val_scores.log(self)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The held-out diffs' loss (`test/loss`); their answers, under DIT and beside the baselines, are `metadit eval`'s."""
        self.step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        answers = self.answer(batch["prompts"], batch["diffs"])
        return [{"question": p, "answer": a, "truth": t} for p, a, t in zip(batch["prompts"], answers, batch["answers"])]


def _check_agrees(flat: dict[str, Any], base: PatchedBaseModel) -> None:
    """An injected base sets the flat keys: each one left at its default is fine, one set otherwise must agree."""
    defaults = inspect.signature(DITModule.__init__).parameters
    for key, value in flat.items():
        injected = getattr(base, FLAT_KEYS[key])
        if value != defaults[key].default and value != injected:
            raise MetaditError(f"model.{key} is {value!r} but the injected base has {FLAT_KEYS[key]}={injected!r}: "
                               f"set one of them")
