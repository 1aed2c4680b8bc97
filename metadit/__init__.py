"""metadit: Diff Interpretation Tuning — adapters that make a finetuned model describe its own weight diff."""

from metadit.errors import MetaditError
from metadit.models import load_base_model

__all__ = ["MetaditError", "load_base_model"]
__version__ = "0.1.0"
