"""Latent Scaling and the classification of latents (Minder, Dumas et al. 2025).

A latent's decoder norms alone misattribute concepts: with the L1 loss a concept both models share can end up with
a zero base decoder (**complete shrinkage**: the base model's error term then carries it) or be split into a
finetuned-only latent plus other latents that rebuild it in the base model (**latent decoupling**). Latent Scaling
measures how much of latent j's direction each model really has. With `d_j` the latent's *finetuned* decoder
vector and `f_j(n)` its activation on token n, for a target `y^M_n` of model M,

    β^M_j = argmin_β Σ_n ‖β f_j(n) d_j − y^M_n‖²  =  Σ_n f_j(n) ⟨d_j, y^M_n⟩ / (‖d_j‖² Σ_n f_j(n)²)

(closed form; tokens where the latent is off contribute nothing). Targets per model M:

- `reconstruction`: the crosscoder's reconstruction `x̂^M_n` (every latent, biases included);
- `error`: `x^M_n − x̂^M_n + f_j(n) d^M_j`, the model's activation minus the reconstruction without latent j;
- `activation`: the activation `x^M_n` itself (reported, not used to classify).

The ratios `ν^r_j = β^{base,reconstruction}_j / β^{ft,reconstruction}_j` and
`ν^ε_j = β^{base,error}_j / β^{ft,error}_j` are ≈ 0 for a latent the base model really lacks, ≈ 1 for one it has:
high ν^ε flags complete shrinkage, high ν^r latent decoupling.

Classification (thresholds as in the paper, `THRESHOLDS`): by the relative decoder norm difference Δ_norm
(1 = finetuned only, see `relative_norm_difference`) a latent is finetuned-only (Δ ≥ 0.9), shared (0.4 ≤ Δ < 0.6),
base-only (Δ ≤ 0.1) or other; a finetuned-only latent is **finetune-specific** when Latent Scaling confirms it,
|ν^ε| < 0.2 and |ν^r| < 0.5, and rejected otherwise. Latents that never fire on the corpus are `dead`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from metadit.eval.crosscoder.model import BASE, FINETUNED, Crosscoder, relative_norm_difference

MODELS = ("base", "finetuned")
TARGETS = ("reconstruction", "error", "activation")


@dataclass(frozen=True)
class Thresholds:
    finetune_only: float = 0.9  # Δ_norm ≥ this: finetuned-only
    shared_low: float = 0.4  # shared: shared_low ≤ Δ_norm < shared_high
    shared_high: float = 0.6
    base_only: float = 0.1  # Δ_norm ≤ this: base-only
    nu_error: float = 0.2  # finetune-specific needs |ν^ε| < this ...
    nu_reconstruction: float = 0.5  # ... and |ν^r| < this

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def describe(self) -> list[str]:
        return [
            f"finetuned-only: Δ_norm ≥ {self.finetune_only}; shared: {self.shared_low} ≤ Δ_norm < {self.shared_high}; "
            f"base-only: Δ_norm ≤ {self.base_only} (Δ_norm = ½((‖d_ft‖ − ‖d_base‖)/max + 1))",
            f"finetune-specific: finetuned-only and |ν^ε| < {self.nu_error} and |ν^r| < {self.nu_reconstruction} "
            "(Latent Scaling; ν = β_base / β_finetuned along the latent's finetuned decoder vector)",
        ]


THRESHOLDS = Thresholds()


@dataclass
class LatentStatistics:
    """What one pass of a trained crosscoder over the corpus gives, per latent (`D` = dictionary size)."""

    tokens: int
    frequency: torch.Tensor  # [D] share of tokens on which the latent is active
    mean_activation: torch.Tensor  # [D] mean over all tokens (0 where off)
    max_activation: torch.Tensor  # [D]
    beta: dict[str, torch.Tensor]  # "base_error", "finetuned_reconstruction", ...: [D]
    top_values: torch.Tensor  # [top_n, D] largest activations, descending (0 where fewer)
    top_tokens: torch.Tensor  # [top_n, D] the token (index into the corpus) of each; -1 where none
    fraction_variance_explained: dict[str, float]  # per model
    l0: float  # mean active latents per token
    extras: dict[str, Any] = field(default_factory=dict)

    def nu(self, target: str) -> torch.Tensor:
        """`β_base / β_finetuned` for a target (NaN for latents that never fired)."""
        return self.beta[f"base_{target}"] / self.beta[f"finetuned_{target}"]


@torch.no_grad()
def analyse(model: Crosscoder, x: torch.Tensor, batch_size: int, top_n: int = 8,
            on_batch: Any = None) -> LatentStatistics:
    """One pass over `x: [tokens, 2, d]` in order, in batches of `batch_size` (the batches BatchTopK selects
    within): Latent Scaling's β for every latent and target, activation frequencies and maxima, each latent's
    `top_n` top-activating tokens, and the reconstruction's fraction of variance explained per model."""
    n, D, dev = x.shape[0], model.dict_size, x.device
    direction = model.W_dec[FINETUNED]  # [D, d]: the latent's direction, the same for both models' β
    # ⟨d_j, d^M_j⟩ per model: latent j's own contribution to the error target, projected on its direction.
    self_projection = torch.stack([(direction * model.W_dec[m]).sum(-1) for m in (BASE, FINETUNED)])  # [2, D]
    numerators = {f"{m}_{t}": torch.zeros(D, dtype=torch.float64, device=dev) for m in MODELS for t in TARGETS}
    code_squares = torch.zeros(D, dtype=torch.float64, device=dev)
    active = torch.zeros(D, dtype=torch.float64, device=dev)
    code_sums = torch.zeros(D, dtype=torch.float64, device=dev)
    top_values = torch.zeros(top_n, D, device=dev)
    top_tokens = torch.full((top_n, D), -1, dtype=torch.long, device=dev)
    error_sq = torch.zeros(2, dtype=torch.float64, device=dev)
    total_sq = torch.zeros(2, dtype=torch.float64, device=dev)
    mean = x.mean(dim=0)  # [2, d]
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        out = model(xb)
        f = out.codes
        f64 = f.double()
        for m_index, m in enumerate(MODELS):
            xm, rec = xb[:, m_index], out.reconstruction[:, m_index]
            err = xm - rec
            for target, y in (("reconstruction", rec), ("error", err), ("activation", xm)):
                projection = (y @ direction.T).double()  # [batch, D]: ⟨d_j, y_n⟩
                numerators[f"{m}_{target}"] += (f64 * projection).sum(dim=0)
            numerators[f"{m}_error"] += self_projection[m_index].double() * f64.pow(2).sum(dim=0)
            error_sq[m_index] += err.double().pow(2).sum()
            total_sq[m_index] += (xm - mean[m_index]).double().pow(2).sum()
        code_squares += f64.pow(2).sum(dim=0)
        active += (f > 0).double().sum(dim=0)
        code_sums += f64.sum(dim=0)
        values = torch.cat([top_values, f])
        tokens = torch.cat([top_tokens, torch.arange(start, start + f.shape[0], device=dev)[:, None].expand(-1, D)])
        best = values.topk(top_n, dim=0)
        top_values, top_tokens = best.values, tokens.gather(0, best.indices)
        if on_batch is not None:
            on_batch(min(start + batch_size, n), n)
    top_tokens = torch.where(top_values > 0, top_tokens, torch.full_like(top_tokens, -1))
    denominator = direction.double().pow(2).sum(-1) * code_squares
    beta = {k: torch.where(code_squares > 0, v / denominator.clamp_min(1e-300), torch.full_like(v, math.nan)).float()
            for k, v in numerators.items()}
    fve = {m: float(1 - error_sq[i] / total_sq[i]) if total_sq[i] > 0 else math.nan for i, m in enumerate(MODELS)}
    # Per-latent results live on the CPU, whatever device the pass ran on.
    return LatentStatistics(tokens=n, frequency=(active / max(n, 1)).float().cpu(),
                            mean_activation=(code_sums / max(n, 1)).float().cpu(), max_activation=top_values[0].cpu(),
                            beta={k: v.cpu() for k, v in beta.items()}, top_values=top_values.cpu(),
                            top_tokens=top_tokens.cpu(), fraction_variance_explained=fve, l0=float(active.sum() / max(n, 1)))


def norm_class(delta: float, thresholds: Thresholds = THRESHOLDS) -> str:
    if delta >= thresholds.finetune_only:
        return "finetuned_only"
    if delta <= thresholds.base_only:
        return "base_only"
    if thresholds.shared_low <= delta < thresholds.shared_high:
        return "shared"
    return "other"


def latent_scaling_verdict(nu_error: float, nu_reconstruction: float,
                           thresholds: Thresholds = THRESHOLDS) -> tuple[bool, list[str]]:
    """`(finetune_specific, reasons it was rejected)` for a finetuned-only latent's ν^ε and ν^r."""
    reasons = []
    if not math.isfinite(nu_error) or abs(nu_error) >= thresholds.nu_error:
        reasons.append(f"complete shrinkage: |ν^ε| = {abs(nu_error):.3g} ≥ {thresholds.nu_error} "
                       "(the base model's error term carries the direction)")
    if not math.isfinite(nu_reconstruction) or abs(nu_reconstruction) >= thresholds.nu_reconstruction:
        reasons.append(f"latent decoupling: |ν^r| = {abs(nu_reconstruction):.3g} ≥ {thresholds.nu_reconstruction} "
                       "(other latents rebuild the direction in the base model)")
    return not reasons, reasons


def classify(model: Crosscoder, stats: LatentStatistics, thresholds: Thresholds = THRESHOLDS) -> list[dict[str, Any]]:
    """One row per latent: decoder norms, Δ_norm, cosine of its two decoder vectors, frequency, β and ν,
    its norm class and its verdict (`finetune_specific`, `rejected`, or the norm class for the others; `dead` for
    latents that never fired)."""
    norms = model.decoder_norms().detach().cpu()
    delta = relative_norm_difference(norms)
    cosine = torch.nn.functional.cosine_similarity(model.W_dec[BASE], model.W_dec[FINETUNED], dim=-1).detach().cpu()
    nu_error, nu_reconstruction = stats.nu("error"), stats.nu("reconstruction")
    rows = []
    for j in range(model.dict_size):
        row: dict[str, Any] = {
            "latent": j, "delta_norm": float(delta[j]), "norm_base": float(norms[BASE, j]),
            "norm_finetuned": float(norms[FINETUNED, j]), "decoder_cosine": float(cosine[j]),
            "frequency": float(stats.frequency[j]), "max_activation": float(stats.max_activation[j]),
            # What the latent adds to the finetuned model's reconstruction, on average per token: the order in
            # which latents are listed.
            "contribution": float(stats.mean_activation[j] * norms[FINETUNED, j]),
            "nu_error": float(nu_error[j]), "nu_reconstruction": float(nu_reconstruction[j]),
            "beta": {k: float(v[j]) for k, v in stats.beta.items()},
            "norm_class": norm_class(float(delta[j]), thresholds),
        }
        if row["frequency"] == 0:
            row["verdict"], row["reasons"] = "dead", ["never active on the corpus"]
        elif row["norm_class"] == "finetuned_only":
            ok, reasons = latent_scaling_verdict(row["nu_error"], row["nu_reconstruction"], thresholds)
            row["verdict"], row["reasons"] = ("finetune_specific" if ok else "rejected"), reasons
        else:
            row["verdict"], row["reasons"] = row["norm_class"], []
        rows.append(row)
    return rows


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many latents of each norm class and verdict (dead latents counted apart, not in a norm class)."""
    live = [r for r in rows if r["verdict"] != "dead"]
    out = {c: sum(r["norm_class"] == c for r in live) for c in ("finetuned_only", "shared", "base_only", "other")}
    out.update({v: sum(r["verdict"] == v for r in rows) for v in ("finetune_specific", "rejected", "dead")})
    out["latents"] = len(rows)
    return out
