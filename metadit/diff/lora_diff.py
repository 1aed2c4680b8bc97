"""`LoraDiff`: one low-rank weight diff, as per-module factors in peft's convention.

`A[name]: [r, in]`, `B[name]: [out, r]`, `ΔW[name] = scale[name] · B[name] @ A[name]`. Module names are the
base model's own (`model.layers.0.self_attn.q_proj`); peft's `base_model.model.` prefix is added and removed
only at the edge (`from_peft` / `save_peft`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metadit.errors import MetaditError

try:  # a regex engine with a timeout: patterns in a stranger's adapter_config.json must not hang us
    import regex as _regex
except ImportError:  # pragma: no cover - regex ships with transformers
    _regex = None

PEFT_PREFIX = "base_model.model."
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
METADIT_FILE = "metadit.json"  # metadit's own record beside a peft adapter (peft ignores it)
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


_PATTERN_TIMEOUT_S = 1.0


def _pattern_matches(key: str, name: str) -> bool:
    """peft's rule: `re.match(rf"(.*\.)?({key})$", name)`, but with a time limit (a hostile pattern such as
    `(.*)*x` backtracks for hours in Python's `re`) and with a bad pattern reported, not raised as `re.error`."""
    pattern = rf"(.*\.)?({key})$"
    try:
        if _regex is not None:
            return _regex.match(pattern, name, timeout=_PATTERN_TIMEOUT_S) is not None
        return re.match(pattern, name) is not None
    except TimeoutError as e:
        raise MetaditError(f"pattern {key!r} takes too long to match module names (catastrophic backtracking)") from e
    except (re.error, *((_regex.error,) if _regex is not None else ())) as e:
        raise MetaditError(f"pattern {key!r} is not a valid regular expression ({e})") from e


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's rule for rank_pattern/alpha_pattern: a key matches a module whose name ends with it (as a regex)."""
    for key, value in pattern.items():
        if _pattern_matches(key, name):
            return value
    return default


def _config_number(config_file: Path, field: str, value: Any, integer: bool) -> float | int:
    """A finite number (a positive int when `integer`) from adapter_config.json, or one clear error."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value) and (not integer or value.is_integer())
    if ok and integer:
        ok = value >= 1
    if not ok:
        kind = "a positive integer" if integer else "a finite number"
        raise MetaditError(f"{config_file}: {field} must be {kind}, got {str(value)[:40]!r}")
    return int(value) if integer else float(value)


@dataclass
class LoraDiff:
    """A low-rank weight diff: per-module factors `A`, `B` and scale, in peft's convention."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scale: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)  # e.g. base model name, SVD relative error

    def __post_init__(self) -> None:
        if set(self.A) != set(self.B) or set(self.A) != set(self.scale):
            raise MetaditError("LoraDiff: A, B and scale must name the same modules")
        if not self.A:
            raise MetaditError("LoraDiff: a diff needs at least one module")
        for name in self.A:
            a, b = self.A[name], self.B[name]
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                raise MetaditError(f"LoraDiff: module {name}: factors must be tensors")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
                raise MetaditError(
                    f"LoraDiff: module {name}: A{tuple(a.shape)} and B{tuple(b.shape)} are not LoRA factors "
                    "(need A: [r, in], B: [out, r], r >= 1)"
                )
            if not a.is_floating_point() or not b.is_floating_point():
                raise MetaditError(f"LoraDiff: module {name}: factors are {a.dtype}/{b.dtype}, not floating point")

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    @property
    def ranks(self) -> dict[str, int]:
        return {n: int(a.shape[0]) for n, a in self.A.items()}

    @property
    def rank(self) -> int:
        """The largest rank over modules (all modules share it for the diffs metadit makes)."""
        return max(self.ranks.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.A.values())).dtype

    def delta(self, name: str) -> torch.Tensor:
        """Dense ΔW of one module in fp32 (for merging and tests; never used on the hot path)."""
        return self.scale[name] * (self.B[name].float() @ self.A[name].float())

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "LoraDiff":
        conv = lambda t: t.to(device=device or t.device, dtype=dtype or t.dtype)  # noqa: E731
        return LoraDiff(
            {n: conv(t) for n, t in self.A.items()}, {n: conv(t) for n, t in self.B.items()}, dict(self.scale), dict(self.info)
        )

    def check_finite(self, source: str = "diff") -> None:
        for name in self.modules:
            try:
                finite = math.isfinite(float(self.scale[name]))
            except (TypeError, ValueError, OverflowError):
                finite = False
            if not finite:
                raise MetaditError(f"{source}: module {name} has scale {self.scale[name]!r}, not a finite number")
            for which, t in (("A", self.A[name]), ("B", self.B[name])):
                if not torch.isfinite(t).all():
                    raise MetaditError(f"{source}: module {name} factor {which} holds NaN or Inf")

    # ------------------------------------------------------------------ peft directories
    @classmethod
    def from_peft(cls, path: str | Path) -> "LoraDiff":
        """Read a peft LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

        Honours `r`, `lora_alpha`, `use_rslora`, `rank_pattern` and `alpha_pattern`. Only safetensors are
        read: pickled weights (`adapter_model.bin`, ...) are refused, never loaded.
        """
        path = Path(path)
        config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not config_file.is_file():
            raise MetaditError(f"{config_file}: not found (a peft adapter directory holds adapter_config.json)")
        if not weights_file.is_file():
            unsafe = sorted(p.name for p in path.iterdir() if p.suffix in UNSAFE_SUFFIXES)
            if unsafe:
                raise MetaditError(
                    f"{path}: only pickled weights found ({', '.join(unsafe)}); metadit reads safetensors only "
                    "and never unpickles adapter files"
                )
            raise MetaditError(f"{weights_file}: not found")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge integers
            raise MetaditError(f"{config_file}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
        except OSError as e:
            raise MetaditError(f"{config_file}: cannot read ({e.strerror or e})") from e
        if not isinstance(config, dict):
            raise MetaditError(f"{config_file}: not a peft adapter config (a JSON object)")
        if config.get("peft_type", "LORA") != "LORA":
            raise MetaditError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are diffs")
        if config.get("use_dora"):
            raise MetaditError(f"{config_file}: DoRA adapters are not low-rank diffs; not supported")
        if config.get("fan_in_fan_out"):
            raise MetaditError(f"{config_file}: fan_in_fan_out (Conv1D/GPT-2 style) adapters are not supported")
        r = _config_number(config_file, "r", config.get("r", 8), integer=True)
        alpha = _config_number(config_file, "lora_alpha", config.get("lora_alpha", 8), integer=False)
        rslora = bool(config.get("use_rslora", False))
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        for field_name, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            if not isinstance(pat, dict):
                raise MetaditError(f"{config_file}: {field_name} must be a JSON object")

        from metadit.diff.safe_io import read_all_tensors

        tensors = read_all_tensors(weights_file)
        A: dict[str, torch.Tensor] = {}
        B: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            m = _PEFT_KEY.match(key)
            if m is None:
                if "lora_embedding" in key or "lora_magnitude" in key:
                    raise MetaditError(f"{weights_file}: tensor {key} is not a Linear LoRA factor; not supported")
                continue  # e.g. modules_to_save copies: not part of the low-rank diff
            (A if m["which"] == "A" else B)[m["module"]] = t
        if not A:
            raise MetaditError(f"{weights_file}: holds no lora_A/lora_B weights")
        if set(A) != set(B):
            missing = sorted(set(A) ^ set(B))
            raise MetaditError(f"{weights_file}: modules without both lora_A and lora_B: {missing[:5]}")
        scale: dict[str, float] = {}
        for name in A:
            try:
                rank = _config_number(config_file, f"rank_pattern for {name}", _pattern_value(rank_pattern, name, r), True)
                a = _config_number(config_file, f"alpha_pattern for {name}", _pattern_value(alpha_pattern, name, alpha),
                                   False)
            except MetaditError as e:
                msg = str(e)
                raise MetaditError(msg if msg.startswith(str(config_file)) else f"{config_file}: {msg}") from e
            if A[name].dim() != 2 or B[name].dim() != 2:
                raise MetaditError(
                    f"{weights_file}: module {name}: lora_A {tuple(A[name].shape)} / lora_B {tuple(B[name].shape)} "
                    "are not 2-D LoRA factors"
                )
            if A[name].shape[0] != rank:
                raise MetaditError(
                    f"{weights_file}: module {name} has rank {A[name].shape[0]} but the config says r={rank}"
                )
            scale[name] = a / math.sqrt(rank) if rslora else a / rank
        info = {"base_model": config.get("base_model_name_or_path"), "source": str(path)}
        extra_file = path / METADIT_FILE
        if extra_file.is_file():  # what metadit recorded beside the peft files (e.g. the chat format)
            try:
                extra = json.loads(extra_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise MetaditError(f"{extra_file}: not readable JSON ({e})") from e
            if not isinstance(extra, dict):
                raise MetaditError(f"{extra_file}: expected a JSON object")
            info.update({k: v for k, v in extra.items() if k not in info})
        try:
            diff = cls(A, B, scale, info)
        except MetaditError as e:
            raise MetaditError(f"{weights_file}: {str(e).removeprefix('LoraDiff: ')}") from e
        diff.check_finite(str(weights_file))
        return diff

    def save_peft(self, path: str | Path, base_model_name_or_path: str | None = None,
                  metadata: dict[str, Any] | None = None) -> Path:
        """Write a peft LoRA adapter directory that `peft.PeftModel.from_pretrained` loads.

        Module-specific ranks and scales go to `rank_pattern` / `alpha_pattern` (alpha = scale · r).
        `metadata` (JSON: e.g. the chat format the adapter was trained with) goes to `metadit.json` beside the
        peft files, which peft ignores and `from_peft` reads back into `info`.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        ranks = self.ranks
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        alphas = {n: self.scale[n] * ranks[n] for n in self.modules}
        a0 = max(set(alphas.values()), key=list(alphas.values()).count)
        # Full module names: peft wraps exactly these (a suffix like `q_proj` would also wrap layers the diff
        # does not cover). The patterns are escaped full names, which peft's `(.*\.)?(key)$` rule matches only
        # for that module.
        target_modules = self.modules
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or self.info.get("base_model"),
            "r": int(r0),
            "lora_alpha": a0,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "target_modules": target_modules,
            "rank_pattern": {re.escape(n): ranks[n] for n in self.modules if ranks[n] != r0},
            "alpha_pattern": {re.escape(n): alphas[n] for n in self.modules if alphas[n] != a0},
            "modules_to_save": None,
            "inference_mode": True,
        }
        tensors = {}
        for n in self.modules:
            tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = self.A[n].detach().contiguous().cpu()
            tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = self.B[n].detach().contiguous().cpu()
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if metadata:
            (path / METADIT_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        return path

    # ------------------------------------------------------------------ full finetunes
    @classmethod
    def from_full_diff(
        cls,
        base_state: Mapping[str, torch.Tensor],
        tuned_state: Mapping[str, torch.Tensor],
        rank: int,
        modules: list[str] | None = None,
    ) -> "LoraDiff":
        """Factor a full-parameter diff by truncated SVD: `B = U_r √S_r`, `A = √S_r V_rᵀ`, scale 1.

        `modules` are module names (state-dict keys without `.weight`); by default every 2-D weight that
        changed. `info["relative_error"]` is ‖ΔW − BA‖_F / ‖ΔW‖_F over all modules together, and
        `info["relative_error_per_module"]` the same per module.
        """
        if rank < 1:
            raise MetaditError(f"from_full_diff: rank must be >= 1, got {rank}")
        if modules is None:
            modules = [
                k[: -len(".weight")]
                for k, w in tuned_state.items()
                if k.endswith(".weight") and w.dim() == 2 and k in base_state and not torch.equal(w, base_state[k])
            ]
        if not modules:
            raise MetaditError("from_full_diff: no module differs between the two state dicts")
        A, B, scale, per_module = {}, {}, {}, {}
        err2 = total2 = 0.0
        for name in sorted(modules):
            key = f"{name}.weight"
            if key not in base_state or key not in tuned_state:
                raise MetaditError(f"from_full_diff: {key} missing from one of the state dicts")
            dw = tuned_state[key].double() - base_state[key].double()
            U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
            r = min(rank, S.numel())
            root = S[:r].sqrt()
            B[name] = (U[:, :r] * root).float()
            A[name] = (root[:, None] * Vh[:r]).float()
            scale[name] = 1.0
            e2 = float((S[r:] ** 2).sum())  # Eckart–Young: the error of the best rank-r approximation
            t2 = float((S**2).sum())
            per_module[name] = math.sqrt(e2 / t2) if t2 > 0 else 0.0
            err2, total2 = err2 + e2, total2 + t2
        info = {"relative_error": math.sqrt(err2 / total2) if total2 > 0 else 0.0, "relative_error_per_module": per_module,
                "svd_rank": rank}
        return cls(A, B, scale, info)
