"""`DiffLinear`: a frozen Linear in which batch row i carries its own low-rank diff, plus one shared adapter.

    y_i = W x_i + b  +  scale_i · B_i (A_i x_i)  +  s · B_ad (A_ad x_i)
                        └ row i's diff ┘           └ shared DIT adapter ┘

Factors follow peft's convention (`A: [r, in]`, `B: [out, r]`). The per-row term is applied in factored
form with two batched matmuls; a dense per-row `[out, in]` matrix is never built (at Qwen3-8B that costs
~14 GB per example). Rows with different ranks are zero-padded to the batch's largest rank, which is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from metadit.errors import MetaditError


@dataclass
class RowFactors:
    """The diffs of one batch for one layer: row i adds `B[i] @ A[i]`, the row's scale already folded into A.

    Folding the scale in when the batch is built saves one elementwise op per layer, forward and backward.
    """

    A: torch.Tensor  # [N, r, in], scale_i · A_i
    B: torch.Tensor  # [N, out, r]


def factored_row_delta(y: torch.Tensor, x: torch.Tensor, rows: RowFactors) -> torch.Tensor:
    """`y_i + (x_i @ A_iᵀ) @ B_iᵀ` for every row i: two batched matmuls, the add fused into the second.

    x: [N, T, in], y: [N, T, out] (the base layer's output).
    """
    h = torch.bmm(x, rows.A.to(x.dtype).transpose(1, 2))  # [N, T, r]
    return torch.baddbmm(y, h, rows.B.to(x.dtype).transpose(1, 2))


def dense_row_delta(y: torch.Tensor, x: torch.Tensor, rows: RowFactors) -> torch.Tensor:
    """The paper's reference code's way: materialize ΔW_i = B_i A_i ([out, in]) per row. Benchmarks only."""
    delta_w = torch.bmm(rows.B.to(x.dtype), rows.A.to(x.dtype))
    return torch.baddbmm(y, x, delta_w.transpose(1, 2))


class DiffLinear(nn.Module):
    """Wraps a frozen `nn.Linear`; adds the current batch's per-row diffs and an optional shared LoRA adapter.

    The per-row factors are set for the duration of a `use_diffs` block and are not parameters of this
    layer: frozen bank diffs carry no gradient, trainable ones (`TrainableDiffs`) are parameters of their own
    module, so one optimizer over them trains K diffs at once.
    """

    row_delta = staticmethod(factored_row_delta)

    def __init__(self, base: nn.Linear, name: str) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise MetaditError(f"{name}: DiffLinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rows: RowFactors | None = None
        self.adapter_A: nn.Parameter | None = None
        self.adapter_B: nn.Parameter | None = None
        self.adapter_scale: float = 0.0
        self.adapter_enabled: bool = True

    # HF code sometimes reads `proj.weight` (dtype/device checks); forward them to the wrapped layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add_adapter(self, rank: int, scale: float, generator: torch.Generator | None = None) -> None:
        """Create the shared adapter, initialised as peft does: A Kaiming-uniform, B zero (so ΔW starts at 0)."""
        if rank < 1:
            raise MetaditError(f"{self.name}: adapter rank must be >= 1, got {rank}")
        w = self.base.weight
        A = torch.empty(rank, self.in_features, dtype=torch.float32)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        A.uniform_(-bound, bound, generator=generator)
        self.adapter_A = nn.Parameter(A.to(device=w.device))
        self.adapter_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device))
        self.adapter_scale = float(scale)

    def set_adapter(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Load adapter factors (fp32 master copy; cast to the activation dtype in forward)."""
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features or A.shape[0] != B.shape[1]:
            raise MetaditError(
                f"{self.name}: adapter factors A{tuple(A.shape)} B{tuple(B.shape)} do not fit "
                f"a Linear({self.in_features} -> {self.out_features})"
            )
        dev = self.base.weight.device
        self.adapter_A = nn.Parameter(A.detach().to(dev, torch.float32).clone())
        self.adapter_B = nn.Parameter(B.detach().to(dev, torch.float32).clone())
        self.adapter_scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.rows
        if rows is not None:
            if x.shape[0] != rows.A.shape[0]:
                raise MetaditError(
                    f"{self.name}: batch has {x.shape[0]} rows but use_diffs was given {rows.A.shape[0]} diffs "
                    "(beam search and num_return_sequences > 1 are not supported under use_diffs)"
                )
            shape = x.shape
            x3 = x.reshape(shape[0], -1, shape[-1])
            y3 = y.reshape(shape[0], -1, self.out_features)
            y = type(self).row_delta(y3, x3, rows).reshape(*shape[:-1], self.out_features)
        if self.adapter_A is not None and self.adapter_enabled:
            h = nn.functional.linear(x, self.adapter_A.to(x.dtype))
            y = y + nn.functional.linear(h, self.adapter_B.to(x.dtype)) * self.adapter_scale
        return y

    def extra_repr(self) -> str:
        ad = f", adapter_rank={self.adapter_A.shape[0]}" if self.adapter_A is not None else ""
        return f"{self.name}, in={self.in_features}, out={self.out_features}{ad}"
