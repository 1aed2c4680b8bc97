"""`PatchedBaseModel`: the model a `DITModule` trains its adapter in, described by value and loaded on demand.

The frozen base model with every target Linear patched (`metadit.nn.patch_model`) and a fresh shared DIT
adapter added (`metadit.nn.add_adapter`). It is injected into `DITModule` (`base=`) and only loaded when the module
asks (`configure_model`), so building the module, parsing a config or checking the banks costs no model load.
A subclass that overrides `load` (another loader, a quantized base) plugs in the same way, from Python or as a
`model.base: {class_path: ...}` entry.
"""

from __future__ import annotations

from typing import Any

from metadit import models
from metadit.models import CHAT_FORMATS, EMBEDDED_NAME
from metadit.errors import MetaditError
from metadit.nn import add_adapter, patch_model


class PatchedBaseModel:
    def __init__(
        self,
        name: str = EMBEDDED_NAME,
        dtype: str = "auto",
        chat_format: str = "default",
        adapter_rank: int = 16,
        adapter_alpha: float | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            name: the base model (embedded name, Hugging Face id or directory): the one the banks were made for.
            dtype: its dtype (`bfloat16`, `float32`, or `auto`: bf16 where the hardware computes it natively,
                else fp32).
            chat_format: prompt layout (`default`, `no_system`): the banks' (`metadit gen --chat_format`).
            adapter_rank: rank of the shared DIT adapter (paper: 16).
            adapter_alpha: its alpha (None: alpha = rank).
            seed: the adapter's initialisation.
        """
        if chat_format not in CHAT_FORMATS:
            raise MetaditError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
        if adapter_rank < 1:
            raise MetaditError(f"adapter_rank must be >= 1, got {adapter_rank}")
        self.name, self.dtype, self.chat_format = name, dtype, chat_format
        self.adapter_rank, self.adapter_alpha, self.seed = adapter_rank, adapter_alpha, seed

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer): the base model loaded frozen, patched, with a fresh adapter (`seed`); a new one per call."""
        # `models.load_base_model` looked up at call time: one loader to replace (tests check no model loads early).
        model, tok = models.load_base_model(self.name, dtype=self.dtype, chat_format=self.chat_format)
        patch_model(model)
        add_adapter(model, self.adapter_rank, self.adapter_alpha, seed=self.seed)
        return model, tok

    def settings(self) -> dict[str, Any]:
        """The values that describe it, by `DITModule`'s flat config keys (`model.base_model`, `model.dtype`, ...)."""
        return {key: getattr(self, attr) for key, attr in FLAT_KEYS.items()}

    def __repr__(self) -> str:
        args = ", ".join(f"{attr}={getattr(self, attr)!r}" for attr in FLAT_KEYS.values())
        return f"{type(self).__name__}({args})"


# DITModule's flat config keys (kept from before the base model was injected) → the attribute each one sets.
FLAT_KEYS = {"base_model": "name", "dtype": "dtype", "chat_format": "chat_format", "adapter_rank": "adapter_rank",
             "adapter_alpha": "adapter_alpha", "seed": "seed"}
