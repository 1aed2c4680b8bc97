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


def read_tensors(path: str | Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Read only `keys` (safetensors memory-maps; the rest of the file is not loaded)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            missing = [k for k in keys if k not in present]
            if missing:
                raise MetaditError(f"{path}: missing tensors {missing[:3]}")
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MetaditError(f"{path}: not a readable safetensors file ({e})") from e


def tensor_keys(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MetaditError(f"{path}: not a readable safetensors file ({e})") from e
