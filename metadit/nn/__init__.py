"""The per-row diff layer and the functions that install it into a model."""

from metadit.nn.diff_encoder import DiffEncoder
from metadit.nn.diff_linear import DiffLinear, RowFactors, dense_row_delta, factored_row_delta
from metadit.nn.patch import (
    DEFAULT_TARGETS,
    DiffBatch,
    TrainableDiffs,
    adapter_disabled,
    adapter_parameters,
    add_adapter,
    diff_layers,
    get_adapter,
    layer_shapes,
    patch_model,
    set_adapter,
    use_diffs,
)

__all__ = [
    "DEFAULT_TARGETS", "DiffBatch", "DiffEncoder", "DiffLinear", "RowFactors", "TrainableDiffs", "adapter_disabled",
    "adapter_parameters", "add_adapter", "dense_row_delta", "diff_layers", "factored_row_delta", "get_adapter",
    "layer_shapes", "patch_model", "set_adapter", "use_diffs",
]
