"""Diffs as tensors: `LoraDiff` (one diff, peft convention) and `DiffBank` (many, on disk)."""

from metadit.bank.diff_bank import DiffBank, entry_checksum, open_diff
from metadit.bank.fingerprint import config_identity, identity_of, model_identity
from metadit.diff.lora_diff import LoraDiff

__all__ = ["DiffBank", "LoraDiff", "config_identity", "entry_checksum", "identity_of", "model_identity", "open_diff"]
