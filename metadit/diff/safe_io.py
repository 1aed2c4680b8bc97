"""Reading safetensors files with every failure turned into one clear `MetaditError` line."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from metadit.errors import MetaditError


def read_all_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MetaditError(f"{path}: not a readable safetensors file ({e})") from e
