"""`DITModule`: the shared DIT adapter trained while each example's own diff is applied.

A thin LightningModule around plain parts: the patched base model (frozen; every target Linear carries the
row's diff and the shared adapter, `metadit.nn`) and, for the hypernetwork ablation, a `DiffEncoder`.
Modes: `dit` (diff applied, no encoder), `encoder` (diff not applied; the encoder's soft tokens are the only
way the diff gets in), `dit+encoder`. One `step` serves train/val/test. Validation and test also generate
answers for every held-out diff (K diffs per `generate` call) and score them per task.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
import torch
from torchmetrics import MeanMetric

from metadit.errors import MetaditError
from metadit.models import training_attention
from metadit.nn import DiffBatch, DiffEncoder, add_adapter, adapter_disabled, get_adapter, layer_shapes, patch_model, use_diffs
from metadit.dit.tasks import TASKS
from metadit.text import exact_match

Mode = Literal["dit", "encoder", "dit+encoder"]


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
    ) -> None:
        """
        Args:
            base_model: the model the banks were made for (embedded name, HF id or directory).
            mode: `dit`, `encoder` or `dit+encoder`.
            adapter_rank: rank of the shared DIT adapter (paper: 16).
            adapter_alpha: its alpha (None: alpha = rank).
            lr: AdamW learning rate (paper: 1e-4), when no `optimizer` is given.
            weight_decay: AdamW weight decay, when no `optimizer` is given.
            optimizer: the optimizer over the trainable parameters, from the YAML as LightningCLI writes it
                (`model.optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3e-4}}`); default AdamW(lr, weight_decay).
            lr_scheduler: its learning-rate scheduler, the same way (`model.lr_scheduler: {class_path: ...}`); default none.
            encoder: the DiffEncoder (required for the encoder modes).
            max_new_tokens: answer length when generating.
            generate_in_validation: generate and score answers for held-out diffs at each validation.
            similarity: also score answers by embedding similarity (the offline MiniLM judge).
            seed: the adapter's initialisation.
            dtype: the base model's dtype (`bfloat16`, `float32`, or `auto`: bf16 where the hardware computes it
                natively, else fp32).
            chat_format: prompt layout (`default`, `no_system`): the banks' (`metadit gen --chat_format`; the CLI
                sets it from `data.banks`), recorded with the exported adapter.
        """
        super().__init__()
        if mode not in ("dit", "encoder", "dit+encoder"):
            raise MetaditError(f"mode must be dit, encoder or dit+encoder, got {mode!r}")
        if "encoder" in mode and encoder is None:
            encoder = DiffEncoder()
        self.save_hyperparameters(ignore=["encoder", "optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.encoder = encoder if "encoder" in mode else None
        self.model: Any = None
        self.tok: Any = None
        self.strict_loading = False  # checkpoints hold only the trainable parts (adapter, encoder)
        self.metrics = torch.nn.ModuleDict()
        self.predictions: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from metadit.models import load_base_model

        model, tok = load_base_model(self.hparams.base_model, dtype=self.hparams.dtype,
                                     chat_format=self.hparams.chat_format)
        patch_model(model)
        add_adapter(model, self.hparams.adapter_rank, self.hparams.adapter_alpha, seed=self.hparams.seed)
        self.model, self.tok = model, tok
        self.shapes = layer_shapes(model)
        if self.encoder is not None:
            self.encoder.configure(model.config.hidden_size)

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
            run_dir = self.run_dir()
            if run_dir is not None:
                dm.write_split(run_dir / "split.json")

    def run_dir(self) -> Path | None:
        """The run's log directory on the global-zero process, else None.

        Read from the logger directly: `Trainer.log_dir` broadcasts, which deadlocks when only rank 0 asks.
        """
        trainer = self.trainer
        if not trainer.is_global_zero:
            return None
        if trainer.loggers:
            d = trainer.loggers[0].log_dir
            return Path(d) if d else None
        return Path(trainer.default_root_dir) if trainer.default_root_dir else None

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
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ the forward
    def _diff_context(self, diffs: list[Any] | None):
        if diffs is None or self.hparams.mode == "encoder":
            return nullcontext()
        dtype = next(self.model.parameters()).dtype
        return use_diffs(self.model, DiffBatch.from_diffs(diffs, self.shapes, dtype=dtype, device=self.device))

    def _soft(self, diffs: list[Any] | None, n: int) -> torch.Tensor | None:
        if self.encoder is None:
            return None
        return self.encoder(diffs if diffs is not None else [None] * n).to(next(self.model.parameters()).dtype)

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor | None):
        if soft is None:
            return {"input_ids": ids, "attention_mask": mask}
        emb = self.model.get_input_embeddings()(ids)
        ones = torch.ones(ids.shape[0], soft.shape[1], dtype=mask.dtype, device=mask.device)
        return {"inputs_embeds": torch.cat([soft.to(emb.dtype), emb], 1), "attention_mask": torch.cat([ones, mask], 1)}

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

    # ------------------------------------------------------------------ answers and scores
    @torch.no_grad()
    def answer(self, prompts: list[str], diffs: list[Any] | None, use_adapter: bool = True) -> list[str]:
        """Greedy answers; row i under `diffs[i]` (None: no diff at all), with or without the adapter."""
        from metadit.text import generate_texts

        soft = self._soft(diffs, len(prompts)) if use_adapter or self.encoder is None else None
        embed = (lambda ids, mask, a, b: self._embed(ids, mask, soft[a:b])) if soft is not None else None
        with self._diff_context(diffs):
            return generate_texts(self.model, self.tok, prompts, self.hparams.max_new_tokens,
                                  batch_size=max(1, len(prompts)), adapter=use_adapter, embed=embed)

    def _metric(self, name: str) -> MeanMetric:
        key = name.replace("/", "__")
        if key not in self.metrics:
            self.metrics[key] = MeanMetric().to(self.device)
        return self.metrics[key]

    def score(self, stage: str, condition: str, batch: dict[str, Any], answers: list[str]) -> list[dict[str, Any]]:
        sims = [float("nan")] * len(answers)
        if self.hparams.similarity:
            from metadit.text.embed import similarities

            sims = similarities(answers, batch["answers"])
        rows = []
        for i, (a, truth, task) in enumerate(zip(answers, batch["answers"], batch["tasks"])):
            exact = float(exact_match(a, truth))
            self._metric(f"{stage}/{condition}/{task}/exact").update(exact)
            if self.hparams.similarity:
                self._metric(f"{stage}/{condition}/{task}/similarity").update(sims[i])
            rows.append({"condition": condition, "task": task, "truth": truth, "answer": a, "exact": exact,
                         "similarity": sims[i], "label": batch["labels_text"][i]})
        return rows

    def _log_metrics(self, stage: str) -> None:
        for key, metric in list(self.metrics.items()):
            name = key.replace("__", "/")
            if name.startswith(stage + "/") and metric.update_called:
                self.log(name, metric.compute(), sync_dist=True)
                metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.step(batch, "val")
        if self.hparams.generate_in_validation and not self.trainer.sanity_checking:
            self.score("val", "dit", batch, self.answer(batch["prompts"], batch["diffs"]))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """DIT against its two controls on the same held-out diffs: the diffed model asked without the adapter
        (does the diff answer by itself?) and the adapter with no diff (does the adapter recite a prior?)."""
        self.step(batch, "test")
        n = len(batch["prompts"])
        conditions = {
            "dit": (batch["diffs"], True),
            "no_adapter": (batch["diffs"], False),
            "no_diff": ([None] * n, True),
        }
        for cond, (diffs, use_adapter) in conditions.items():
            rows = self.score("test", cond, batch, self.answer(batch["prompts"], diffs, use_adapter=use_adapter))
            for r, d in zip(rows, batch["diffs"]):
                r["diff"] = d.info.get("id")
            self.predictions += rows

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        run_dir = self.run_dir()
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "test_predictions.json").write_text(json.dumps(self.predictions, indent=1))
        self.predictions = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        answers = self.answer(batch["prompts"], batch["diffs"])
        return [{"question": p, "answer": a, "truth": t} for p, a, t in zip(batch["prompts"], answers, batch["answers"])]

    # ------------------------------------------------------------------ saving the adapter
    def save_adapter(self, path: str | Path) -> Path:
        """The shared adapter as a peft LoRA directory (`PeftModel.from_pretrained(base, path)` loads it);
        the encoder, if any, beside it as `diff_encoder.safetensors`."""
        path = Path(path)
        get_adapter(self.model).save_peft(path, base_model_name_or_path=self.hparams.base_model,
                                          metadata={"chat_format": self.hparams.chat_format})
        if self.encoder is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.encoder.state_dict().items()}, str(path / "diff_encoder.safetensors"))
            (path / "diff_encoder.json").write_text(json.dumps({"module_types": self.encoder.module_types,
                                                                "mode": self.hparams.mode}))
        return path

    def on_fit_end(self) -> None:
        """Save the best checkpoint's adapter (lowest held-out-diff validation loss) as a peft directory."""
        run_dir = self.run_dir()
        if run_dir is None:
            return
        cb = self.trainer.checkpoint_callback
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            self.load_state_dict(state, strict=False)
        out = self.save_adapter(run_dir / "adapter")
        (out / "metadit_best.json").write_text(json.dumps({"checkpoint": best or None,
                                                           "best_val_loss": float(cb.best_model_score) if best and cb.best_model_score is not None else None}))
