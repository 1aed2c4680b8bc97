"""One weight diff as low-rank factors in peft's convention (`LoraDiff`), its peft I/O and SVD truncation."""

from metadit.diff.lora_diff import LoraDiff

__all__ = ["LoraDiff"]
