"""A base model's identity for banks: its name plus a hash of its architecture and linear-layer shapes.

Computed from the config alone (the model is built on the `meta` device, which allocates nothing), so
a bank made for another model is refused before any weights are loaded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

_CONFIG_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


PATCHED_SUFFIX = ".base"  # a patched layer (`metadit.nn.DiffLinear`) holds the original Linear as `.base`


def linear_shapes(model: nn.Module) -> dict[str, list[int]]:
    """`{module name: [out, in]}` of every Linear; a patched layer's Linear is reported under the name it had before
    patching (storage knows no layers: the wrapper is recognised by where it keeps the Linear)."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            shapes[name.removesuffix(PATCHED_SUFFIX)] = [m.out_features, m.in_features]
    return shapes


def fingerprint_from_parts(config: Any, shapes: dict[str, list[int]]) -> str:
    cfg = _text_config(config)
    fields = {k: getattr(cfg, k, None) for k in _CONFIG_FIELDS}
    blob = json.dumps({"config": fields, "linear_shapes": dict(sorted(shapes.items()))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_identity(model: nn.Module) -> dict[str, str]:
    """`{"name": ..., "fingerprint": ...}` of a loaded (possibly patched) model."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "name_or_path", "") or "unknown"
    return {"name": str(name), "fingerprint": fingerprint_from_parts(model.config, linear_shapes(model))}


def config_linear_shapes(config: Any) -> dict[str, list[int]]:
    """`linear_shapes` of the model a config describes, built on the `meta` device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_shapes(model)


def config_identity(config: Any, name: str) -> dict[str, str]:
    """The same identity from a config alone, without loading weights."""
    return {"name": name, "fingerprint": fingerprint_from_parts(config, config_linear_shapes(config))}


def identity_of(name_or_path: str) -> dict[str, str]:
    """The identity of a base model by name (embedded name, HF id or directory), reading only its config."""
    from metadit.errors import MetaditError
    from metadit.models import load_config

    try:
        return config_identity(load_config(name_or_path), name_or_path)
    except (OSError, ValueError) as e:
        raise MetaditError(f"cannot read the config of base model {name_or_path!r}: {e}") from e
