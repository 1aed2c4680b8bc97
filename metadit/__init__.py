"""metadit: Diff Interpretation Tuning — adapters that make a finetuned model describe its own weight diff."""

from metadit.errors import MetaditError

__all__ = ["MetaditError", "load_base_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # load_base_model on first use: importing the package (a sweep's step runner, `metadit --help`) needs no torch
    if name == "load_base_model":
        from metadit.models import load_base_model

        return load_base_model
    raise AttributeError(f"module 'metadit' has no attribute {name!r}")
