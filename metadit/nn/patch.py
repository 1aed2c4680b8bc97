"""`patch_model` wraps target Linears once; `use_diffs` gives batch row i its own diff for a block of code."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from metadit.diff.lora_diff import LoraDiff
from metadit.errors import MetaditError
from metadit.models import pins_host_memory
from metadit.nn.diff_linear import DiffLinear, RowFactors

# Llama, Qwen2/Qwen3, Mistral and Gemma 2/3 all name their projections this way.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_INDEX = re.compile(r"\.\d+\.")


def _matches(name: str, target: str) -> bool:
    """A target is a module-name suffix (`q_proj`, `self_attn.q_proj`) or a regex matching the full name."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def _linear_summary(model: nn.Module) -> str:
    names = sorted({_LAYER_INDEX.sub(".*.", n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return ", ".join(names) or "(none)"


def diff_layers(model: nn.Module) -> dict[str, DiffLinear]:
    """The patched layers of `model`, by the original module name. Empty if the model is not patched."""
    return {m.name: m for m in model.modules() if isinstance(m, DiffLinear)}


def patch_model(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every target `nn.Linear` in a `DiffLinear` (idempotent) and return the patched module names.

    Decoder-layer projections only: modules under a vision tower are skipped. A target list that matches
    nothing raises an error listing the model's linear layers.
    """
    existing = diff_layers(model)
    to_wrap: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if isinstance(module, DiffLinear) or not isinstance(module, nn.Linear) or "vision" in name:
            continue
        if name.endswith(".base") and name[: -len(".base")] in existing:
            continue
        if any(_matches(name, t) for t in targets):
            to_wrap.append((name, module))
    matched_existing = [n for n in existing if any(_matches(n, t) for t in targets)]
    if not to_wrap and not matched_existing:
        raise MetaditError(
            f"patch_model: targets {list(targets)} match no linear layer; the model's linear layers are: "
            f"{_linear_summary(model)}"
        )
    for name, linear in to_wrap:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DiffLinear(linear, name))
    return sorted(diff_layers(model))


def _layers_or_error(model: nn.Module) -> dict[str, DiffLinear]:
    layers = diff_layers(model)
    if not layers:
        raise MetaditError("the model is not patched: call metadit.nn.patch_model(model) first")
    return layers


def _source(d: LoraDiff) -> str:
    """Where a diff came from, for error messages: ` (bank B entry E)` or ` (from DIR)`, else nothing."""
    info = d.info or {}
    if info.get("bank") is not None:
        return f" (bank {info['bank']} entry {info.get('id')})"
    if info.get("source") is not None:
        return f" (from {info['source']})"
    return ""


class DiffBatch:
    """Stacked per-row factors for every patched layer: what `use_diffs` installs.

    Built once per batch (e.g. in a collate function) from a list of `LoraDiff | None`; rows with
    different ranks are zero-padded to the largest, `None` rows are all-zero factors.
    """

    def __init__(self, factors: dict[str, RowFactors], n_rows: int) -> None:
        self.factors = factors
        self.n_rows = n_rows

    def __len__(self) -> int:
        return self.n_rows

    def repeated(self, n: int) -> "DiffBatch":
        """This one-row batch as `n` rows of the same diff, the factors expanded, not copied (many rows scored under
        one diff: likelihood ranking)."""
        if self.n_rows != 1:
            raise MetaditError(f"DiffBatch.repeated: needs a one-row batch, this one has {self.n_rows} rows")
        return DiffBatch({k: RowFactors(f.A.expand(n, -1, -1), f.B.expand(n, -1, -1)) for k, f in self.factors.items()}, n)

    @classmethod
    def from_diffs(
        cls,
        diffs: Sequence[LoraDiff | None],
        shapes: dict[str, tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "DiffBatch":
        """`shapes[name] = (in_features, out_features)` of every patched layer (see `layer_shapes`).

        For a CUDA `device`, a module whose factors all sit on the host (a bank's diffs) is stacked in pinned host
        memory and sent in one asynchronous copy per tensor (`pins_host_memory`), instead of one blocking copy per
        row; the values are the same (the scale is folded in fp32 and cast to `dtype` either way)."""
        n = len(diffs)
        if n == 0:
            raise MetaditError("use_diffs: got an empty list of diffs")
        for i, d in enumerate(diffs):
            if d is None:
                continue
            if not isinstance(d, LoraDiff):
                raise MetaditError(f"use_diffs: row {i} is a {type(d).__name__}, expected LoraDiff or None")
            unknown = sorted(set(d.A) - set(shapes))
            if unknown:
                raise MetaditError(
                    f"use_diffs: row {i}'s diff{_source(d)} targets modules the patched model lacks: {unknown[:4]}"
                    f"{' ...' if len(unknown) > 4 else ''}"
                )
            d.check_finite(f"use_diffs: row {i}'s diff{_source(d)}")
        factors: dict[str, RowFactors] = {}
        for name, (fan_in, fan_out) in shapes.items():
            present = [d for d in diffs if d is not None and name in d.A]
            if not present:
                continue
            r = max(d.A[name].shape[0] for d in present)
            staged = pins_host_memory(device) and all(d.A[name].device.type == d.B[name].device.type == "cpu"
                                                      for d in present)
            at = "cpu" if staged else device
            A = torch.zeros(n, r, fan_in, dtype=dtype, device=at, pin_memory=staged)
            B = torch.zeros(n, fan_out, r, dtype=dtype, device=at, pin_memory=staged)
            for i, d in enumerate(diffs):
                if d is None or name not in d.A:
                    continue
                a, b = d.A[name], d.B[name]
                if a.shape[1] != fan_in or b.shape[0] != fan_out:
                    raise MetaditError(
                        f"use_diffs: row {i}{_source(d)}, module {name}: factors A{tuple(a.shape)} B{tuple(b.shape)} "
                        f"do not fit Linear({fan_in} -> {fan_out})"
                    )
                ri = a.shape[0]
                if ri > min(fan_in, fan_out):
                    raise MetaditError(
                        f"use_diffs: row {i}{_source(d)}, module {name}: rank {ri} exceeds the layer's size "
                        f"(Linear({fan_in} -> {fan_out}))"
                    )
                A[i, :ri] = a.to(torch.float32) * d.scale[name]  # fold the scale in (in fp32, then cast)
                B[i, :, :ri] = b
            if staged:  # the pinned buffers outlive the copies: torch's host allocator waits on them before reuse
                A, B = A.to(device, non_blocking=True), B.to(device, non_blocking=True)
            factors[name] = RowFactors(A, B)
        return cls(factors, n)


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in _layers_or_error(model).items()}


class TrainableDiffs(nn.Module):
    """K diffs trained at once: per-row factors `A: [K, r, in]`, `B: [K, out, r]` for every patched layer.

    Initialised like peft (A Kaiming-uniform, B zero), so every diff starts at ΔW = 0. Install with
    `use_diffs(model, trainable)`; batch row i then trains diff i, and one optimizer over `parameters()`
    updates all K.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        n_diffs: int,
        rank: int,
        alpha: float | None = None,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        row_seeds: Sequence[int] | None = None,
    ) -> None:
        """`row_seeds` gives each row its own initialisation stream, so a diff starts from the same factors
        whether it is trained alone or among K others (otherwise rows are drawn from `generator` in turn)."""
        super().__init__()
        if n_diffs < 1 or rank < 1:
            raise MetaditError(f"TrainableDiffs: need n_diffs >= 1 and rank >= 1, got {n_diffs}, {rank}")
        if row_seeds is not None and len(row_seeds) != n_diffs:
            raise MetaditError(f"TrainableDiffs: {len(row_seeds)} row seeds for {n_diffs} diffs")
        self.names = sorted(shapes)
        self.n_diffs, self.rank = n_diffs, rank
        self.scale = float(alpha if alpha is not None else rank) / rank
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        gens = [torch.Generator().manual_seed(int(s)) for s in row_seeds] if row_seeds is not None else None
        for name in self.names:
            fan_in, fan_out = shapes[name]
            bound = 1 / math.sqrt(fan_in)
            a = torch.empty(n_diffs, rank, fan_in)
            for i in range(n_diffs):
                a[i].uniform_(-bound, bound, generator=gens[i] if gens else generator)
            self.A.append(nn.Parameter(a.to(device)))
            self.B.append(nn.Parameter(torch.zeros(n_diffs, fan_out, rank, device=device)))

    def as_batch(self) -> DiffBatch:
        # The scale is folded into A as part of the graph, so gradients reach the stored (unscaled) factors.
        s = self.scale
        return DiffBatch({n: RowFactors(a * s if s != 1.0 else a, b) for n, a, b in zip(self.names, self.A, self.B)},
                         self.n_diffs)

    def to_diffs(self, dtype: torch.dtype = torch.float32) -> list[LoraDiff]:
        """Detached copies, one `LoraDiff` per row."""
        out = []
        for i in range(self.n_diffs):
            A = {n: a[i].detach().to(dtype).cpu().clone() for n, a in zip(self.names, self.A)}
            B = {n: b[i].detach().to(dtype).cpu().clone() for n, b in zip(self.names, self.B)}
            out.append(LoraDiff(A, B, {n: self.scale for n in self.names}))
        return out


DiffsLike = Sequence["LoraDiff | None"] | DiffBatch | TrainableDiffs


@contextmanager
def use_diffs(model: nn.Module, diffs: DiffsLike) -> Iterator[DiffBatch]:
    """Within the block, batch row i of every forward (and every step of `generate`) uses `diffs[i]`.

    `diffs` is a list of `LoraDiff | None` (`None`: no diff for that row), a prebuilt `DiffBatch`, or a
    `TrainableDiffs` (gradients then flow into its factors). The batch size of each forward must equal the
    number of diffs.
    """
    layers = _layers_or_error(model)
    if isinstance(diffs, TrainableDiffs):
        batch = diffs.as_batch()
    elif isinstance(diffs, DiffBatch):
        batch = diffs
    else:
        some = next(iter(layers.values())).base.weight
        batch = DiffBatch.from_diffs(list(diffs), layer_shapes(model), dtype=some.dtype, device=some.device)
    unknown = set(batch.factors) - set(layers)
    if unknown:
        raise MetaditError(f"use_diffs: diffs for modules the model does not have patched: {sorted(unknown)[:4]}")
    previous = {n: layer.rows for n, layer in layers.items()}
    try:
        for n, layer in layers.items():
            layer.rows = batch.factors.get(n)
        yield batch
    finally:
        for n, layer in layers.items():
            layer.rows = previous[n]


# ---------------------------------------------------------------------- the shared adapter
def add_adapter(model: nn.Module, rank: int = 16, alpha: float | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Give every patched layer a fresh shared LoRA adapter (peft init, ΔW = 0); return its parameters."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(alpha if alpha is not None else rank) / rank
    params = []
    for _, layer in sorted(_layers_or_error(model).items()):
        layer.add_adapter(rank, scale, generator=gen)
        params += [layer.adapter_A, layer.adapter_B]
    return params


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, l in sorted(diff_layers(model).items()) if l.adapter_A is not None for p in (l.adapter_A, l.adapter_B)]


def get_adapter(model: nn.Module) -> LoraDiff:
    """The shared adapter as a `LoraDiff` (so it saves as a peft adapter directory like any diff)."""
    layers = {n: l for n, l in diff_layers(model).items() if l.adapter_A is not None}
    if not layers:
        raise MetaditError("the model has no adapter: call metadit.nn.add_adapter first")
    return LoraDiff(
        {n: l.adapter_A.detach().float().cpu().clone() for n, l in layers.items()},
        {n: l.adapter_B.detach().float().cpu().clone() for n, l in layers.items()},
        {n: l.adapter_scale for n, l in layers.items()},
    )


def set_adapter(model: nn.Module, adapter: LoraDiff) -> None:
    """Install a saved adapter (e.g. `LoraDiff.from_peft(dir)`) as the shared adapter."""
    layers = _layers_or_error(model)
    unknown = sorted(set(adapter.A) - set(layers))
    if unknown:
        raise MetaditError(f"set_adapter: adapter targets modules the patched model lacks: {unknown[:4]}")
    for n in adapter.modules:
        layers[n].set_adapter(adapter.A[n], adapter.B[n], adapter.scale[n])


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    layers = list(diff_layers(model).values())
    before = [l.adapter_enabled for l in layers]
    try:
        for l in layers:
            l.adapter_enabled = False
        yield
    finally:
        for l, b in zip(layers, before):
            l.adapter_enabled = b
