"""The trained DIT adapter: how it takes a batch of diffs in, and the directory a run exports it to.

`DITReader` is the adapter's way of reading diffs, by mode: `dit` applies row i's diff to the weights, `encoder` has
the `DiffEncoder` read it into soft tokens prepended to the prompt (the diff is not applied), `dit+encoder` both.
`DITModule` trains and validates through it and `metadit eval` answers through it, so a question is put to the
adapter the same way everywhere; `DITReader.answer` is the one generate loop (`metadit.text.generate_texts`) with the
soft tokens as its `embed` option.

`save_adapter` writes the export (`RUN/adapter/`: a peft LoRA directory, `metadit.json` with the chat format, and for
the encoder modes `diff_encoder.safetensors` beside `diff_encoder.json`, which records the mode, the encoder's
settings and its module types); `load_adapter` installs an export into a patched model and returns its reader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from metadit.diff import LoraDiff
from metadit.errors import MetaditError
from metadit.nn import DiffEncoder, get_adapter, set_adapter

Mode = Literal["dit", "encoder", "dit+encoder"]
MODES: tuple[str, ...] = ("dit", "encoder", "dit+encoder")
ENCODER_WEIGHTS = "diff_encoder.safetensors"
ENCODER_RECORD = "diff_encoder.json"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise MetaditError(f"mode must be dit, encoder or dit+encoder, got {mode!r}")


@dataclass
class DITReader:
    """How the DIT adapter reads a batch of diffs: `mode`, and the `DiffEncoder` of the encoder modes."""

    mode: str = "dit"
    encoder: DiffEncoder | None = None

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if ("encoder" in self.mode) != (self.encoder is not None):
            raise MetaditError(f"mode {self.mode!r} " + ("needs a DiffEncoder" if self.encoder is None
                                                         else "takes no DiffEncoder"))

    @property
    def applies_diffs(self) -> bool:
        """Are the rows' diffs applied to the weights (every mode but `encoder`)?"""
        return self.mode != "encoder"

    def soft_tokens(self, diffs: Sequence[Any] | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """`[n, k, hidden]` soft tokens for the rows' diffs (None rows, or `diffs` None: the encoder's empty reading);
        None without an encoder."""
        if self.encoder is None:
            return None
        return self.encoder(list(diffs) if diffs is not None else [None] * n).to(dtype)

    @staticmethod
    def prepend(model: Any, ids: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The model's inputs for a batch of token ids: the ids as they are, or the soft tokens before their
        embeddings (`inputs_embeds`, the mask extended over the soft tokens)."""
        if soft is None:
            return {"input_ids": ids, "attention_mask": mask}
        emb = model.get_input_embeddings()(ids)
        ones = torch.ones(ids.shape[0], soft.shape[1], dtype=mask.dtype, device=mask.device)
        return {"inputs_embeds": torch.cat([soft.to(emb.dtype), emb], 1), "attention_mask": torch.cat([ones, mask], 1)}

    @torch.no_grad()
    def answer(self, model: Any, tok: Any, prompts: Sequence[str], diffs: Sequence[Any] | None, max_new_tokens: int,
               batch_size: int | None = None, use_adapter: bool = True, do_sample: bool = False,
               temperature: float = 1.0, seed: int = 0) -> list[str]:
        """Answers to chat-formatted prompts, row i under `diffs[i]` (None: no diff; `diffs` None: none at all) as
        this mode reads it, with the adapter (and the soft tokens) or without both.

        Args:
            batch_size: prompts per `generate` call (default: all of them); soft tokens are computed per call.
            do_sample, temperature, seed: as `metadit.text.generate_texts`.
        """
        prompts = list(prompts)
        dtype = next(model.parameters()).dtype
        encoded = use_adapter and self.encoder is not None
        embed = (lambda ids, mask, a, b: self.prepend(model, ids, mask, self.soft_tokens(
            None if diffs is None else diffs[a:b], b - a, dtype))) if encoded else None
        from metadit.text import generate_texts

        return generate_texts(model, tok, prompts, max_new_tokens, diffs=diffs if self.applies_diffs else None,
                              batch_size=batch_size or max(1, len(prompts)), do_sample=do_sample,
                              temperature=temperature, seed=seed, adapter=use_adapter, embed=embed)


# ---------------------------------------------------------------------- the export directory
def save_adapter(model: Any, path: str | Path, base_model: str, chat_format: str, reader: DITReader) -> Path:
    """The model's shared adapter as a peft LoRA directory (`PeftModel.from_pretrained(base, path)` loads it;
    `metadit.json` records the chat format); the encoder, if any, beside it as `diff_encoder.safetensors` and
    `diff_encoder.json` (mode, settings, module types)."""
    path = Path(path)
    get_adapter(model).save_peft(path, base_model_name_or_path=base_model, metadata={"chat_format": chat_format})
    if reader.encoder is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in reader.encoder.state_dict().items()}, str(path / ENCODER_WEIGHTS))
        (path / ENCODER_RECORD).write_text(json.dumps({"module_types": reader.encoder.module_types, "mode": reader.mode,
                                                       "settings": reader.encoder.settings}))
    return path


def adapter_mode(path: str | Path) -> str:
    """The mode an exported adapter was trained in (`diff_encoder.json`'s; `dit` without an encoder): read without
    loading anything."""
    path = Path(path)
    if not (path / ENCODER_WEIGHTS).is_file():
        return "dit"
    record = _encoder_record(path)
    mode = record.get("mode")
    if mode not in MODES or "encoder" not in mode:
        raise MetaditError(f"{path / ENCODER_RECORD}: mode {mode!r} is not an encoder mode (encoder, dit+encoder)")
    return mode


def load_adapter(model: Any, path: str | Path, chat_format: str | None = None) -> DITReader:
    """Install the adapter exported at `path` into the patched `model` (every mode) and return how it reads diffs:
    its mode and, for the encoder modes, its `DiffEncoder` rebuilt from the saved weights on the model's device.
    Refuses one trained in a chat format other than `chat_format` (None: not checked)."""
    from metadit.models import require_chat_format

    path = Path(path)
    mode = adapter_mode(path)
    loaded = LoraDiff.from_peft(path)
    if chat_format is not None:
        require_chat_format(str(path), loaded.info.get("chat_format", "default"), chat_format)
    encoder = _load_encoder(path, model) if "encoder" in mode else None
    set_adapter(model, loaded)
    return DITReader(mode, encoder)


def _encoder_record(path: Path) -> dict[str, Any]:
    record_file = path / ENCODER_RECORD
    if not record_file.is_file():
        raise MetaditError(f"{path}: has {ENCODER_WEIGHTS} but no {ENCODER_RECORD} (its mode and module types)")
    try:
        record = json.loads(record_file.read_text())
    except ValueError as e:
        raise MetaditError(f"{record_file}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise MetaditError(f"{record_file}: expected a JSON object")
    return record


def _load_encoder(path: Path, model: Any) -> DiffEncoder:
    from safetensors.torch import load_file

    record = _encoder_record(path)
    settings = record.get("settings")
    if settings is None:
        settings = _settings_from_run_config(path)
    encoder = DiffEncoder(**settings)
    encoder.configure(model.config.hidden_size)
    try:
        encoder.load_state_dict(load_file(str(path / ENCODER_WEIGHTS)))
    except RuntimeError as e:
        raise MetaditError(f"{path / ENCODER_WEIGHTS}: does not fit DiffEncoder({settings}) on a model of hidden size "
                           f"{model.config.hidden_size}: {str(e).splitlines()[0]}") from e
    encoder.module_types = {str(k): int(v) for k, v in record.get("module_types", {}).items()}
    return encoder.to(next(model.parameters()).device).eval()


def _settings_from_run_config(path: Path) -> dict[str, Any]:
    """An export written before `diff_encoder.json` recorded the settings: the run's `config.yaml` beside it."""
    config_file = path.parent / "config.yaml"
    if not config_file.is_file():
        raise MetaditError(f"{path / ENCODER_RECORD}: records no encoder settings and there is no run config.yaml "
                           f"beside {path} to read them from")
    import yaml

    encoder = ((yaml.safe_load(config_file.read_text()) or {}).get("model") or {}).get("encoder")
    if encoder is None:  # the run built the module's default DiffEncoder()
        return {}
    if not isinstance(encoder, dict) or str(encoder.get("class_path", "")).rsplit(".", 1)[-1] != "DiffEncoder":
        raise MetaditError(f"{config_file}: model.encoder is not a DiffEncoder: {encoder!r}")
    return {k: v for k, v in (encoder.get("init_args") or {}).items() if k != "cache_size"}
