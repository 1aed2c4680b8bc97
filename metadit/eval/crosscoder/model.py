"""The crosscoder: one sparse dictionary over two models' activations at one layer, a decoder per model.

Activations come in as `x: [batch, 2, d]` (model 0 = base, model 1 = finetuned). With `D` latents,

    pre   = Σ_m x[:, m] @ W_enc[m] + b_enc                      [batch, D]   (one encoder reads both models)
    f     = sparsity(relu(pre))                                  [batch, D]
    x̂[m] = f @ W_dec[m] + b_dec[m]                             [batch, d]   (one decoder per model)

Latent j's decoder vectors are `W_dec[0, j]` (base) and `W_dec[1, j]` (finetuned); a latent whose base vector has
shrunk to nothing is a candidate for something finetuning introduced (Lindsey et al. 2024). Two sparsities
(`SPARSITIES`), as compared by Minder, Dumas et al. 2025:

- `batchtopk`: of the batch's `batch · D` values `relu(pre_j) · (‖W_dec[0, j]‖ + ‖W_dec[1, j]‖)`, the
  `k · batch` largest are kept (the rest are zero): exactly `k` per token on average, not per token. The loss is
  the reconstruction error alone (plus the auxiliary dead-latent loss, see `aux_loss`). Applied at inference too,
  over batches of the training batch size.
- `l1`: `f = relu(pre)`; the loss adds `μ · Σ_j f_j (‖W_dec[0, j]‖ + ‖W_dec[1, j]‖)` (the original crosscoder
  loss, whose sparsity pressure on each model's decoder norm separately causes the artefacts Latent Scaling
  detects).

The reconstruction error is `Σ_m ‖x[m] − x̂[m]‖²`, summed over both models and the hidden dimension and averaged
over tokens. Decoder norms are not constrained: both losses weigh a latent by its decoder norms, so moving scale
between `f` and `W_dec` changes neither the selection nor the penalty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import einops
import torch
from torch import nn

from metadit.errors import MetaditError

N_MODELS = 2  # base, finetuned
BASE, FINETUNED = 0, 1


@dataclass
class CrosscoderOutput:
    reconstruction: torch.Tensor  # [batch, 2, d]
    codes: torch.Tensor  # [batch, D]: the latent activations f after the sparsity
    pre: torch.Tensor  # [batch, D]: encoder pre-activations


def batch_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The mask of the `k · batch` largest entries of `scores: [batch, D]` over the whole batch (ties: torch.topk's
    choice), as a float tensor of the same shape. Exactly `min(k · batch, batch · D)` entries are 1."""
    if k < 1:
        raise MetaditError(f"k must be >= 1, got {k}")
    flat = scores.flatten()
    keep = min(k * scores.shape[0], flat.numel())
    mask = torch.zeros_like(flat)
    mask[flat.topk(keep, sorted=False).indices] = 1.0
    return mask.view_as(scores)


class Crosscoder(nn.Module):
    """A crosscoder of `dict_size` latents over two models' `d_model`-dimensional activations."""

    def __init__(self, d_model: int, dict_size: int, sparsity: str = "batchtopk", k: int = 32,
                 l1_coefficient: float = 1.0, init_norm: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        if d_model < 1 or dict_size < 1:
            raise MetaditError(f"a crosscoder needs d_model >= 1 and dict_size >= 1, got {d_model} and {dict_size}")
        if sparsity not in SPARSITIES:
            raise MetaditError(f"unknown crosscoder sparsity {sparsity!r}; choose from {sorted(SPARSITIES)}")
        if sparsity == "batchtopk" and not 1 <= k <= dict_size:
            raise MetaditError(f"k must be between 1 and the dictionary size ({dict_size}), got {k}")
        if l1_coefficient < 0:
            raise MetaditError(f"l1_coefficient must be >= 0, got {l1_coefficient}")
        self.d_model, self.dict_size, self.sparsity = d_model, dict_size, sparsity
        self.k, self.l1_coefficient = int(k), float(l1_coefficient)
        # Both models' decoders start equal (the same random direction per latent, norm `init_norm`) and each
        # encoder is its decoder's transpose: every latent starts shared, and training has to pull them apart.
        g = torch.Generator().manual_seed(seed)
        directions = torch.randn(dict_size, d_model, generator=g)
        directions = directions / directions.norm(dim=-1, keepdim=True) * init_norm
        self.W_dec = nn.Parameter(directions.expand(N_MODELS, -1, -1).clone())  # [2, D, d]
        self.W_enc = nn.Parameter(einops.rearrange(self.W_dec.detach().clone(), "m D d -> m d D"))  # [2, d, D]
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(N_MODELS, d_model))

    def config(self) -> dict[str, float | int | str]:
        return {"d_model": self.d_model, "dict_size": self.dict_size, "sparsity": self.sparsity, "k": self.k,
                "l1_coefficient": self.l1_coefficient}

    def decoder_norms(self) -> torch.Tensor:
        """`[2, D]`: each latent's decoder norm in each model."""
        return self.W_dec.norm(dim=-1)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1:] != (N_MODELS, self.d_model):
            raise MetaditError(f"crosscoder input must be [batch, 2, {self.d_model}], got {tuple(x.shape)}")
        return einops.einsum(x, self.W_enc, "b m d, m d D -> b D") + self.b_enc

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(codes, pre)` for `x: [batch, 2, d]`."""
        pre = self.pre_activations(x)
        return SPARSITIES[self.sparsity].encode(self, torch.relu(pre)), pre

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return einops.einsum(codes, self.W_dec, "b D, m D d -> b m d") + self.b_dec

    def forward(self, x: torch.Tensor) -> CrosscoderOutput:
        codes, pre = self.encode(x)
        return CrosscoderOutput(self.decode(codes), codes, pre)

    def loss(self, x: torch.Tensor, out: CrosscoderOutput, penalty_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss `reconstruction + penalty_weight · sparsity penalty`, and its parts as numbers.
        `penalty_weight` ramps the L1 penalty in at the start of training (1: the full penalty)."""
        reconstruction = reconstruction_error(x, out.reconstruction)
        penalty = SPARSITIES[self.sparsity].penalty(self, out.codes)
        total = reconstruction + penalty_weight * penalty
        return total, {"reconstruction": float(reconstruction.detach()), "penalty": float(penalty.detach())}


def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """`Σ_m ‖x[m] − x̂[m]‖²` averaged over the batch."""
    return (x - x_hat).pow(2).sum(dim=(-1, -2)).mean()


def aux_loss(model: Crosscoder, x: torch.Tensor, out: CrosscoderOutput, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """The auxiliary loss that revives dead latents (Gao et al. 2024, as BatchTopK crosscoders use it): the
    `aux_k` largest pre-activations among the dead latents (`dead: [D]` bool) of each token reconstruct the
    main reconstruction's residual (held fixed), without decoder bias; the error is divided by the residual's
    variance so the term stays on the scale of 1. Zero when no latent is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0 or aux_k < 1:
        return x.new_zeros(())
    residual = (x - out.reconstruction).detach()
    pre = torch.relu(out.pre).masked_fill(~dead, 0.0)
    values, index = pre.topk(min(aux_k, n_dead), dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, index, values)
    residual_hat = einops.einsum(codes, model.W_dec, "b D, m D d -> b m d")
    variance = (residual - residual.mean(dim=0, keepdim=True)).pow(2).sum(dim=(-1, -2)).mean()
    return (residual - residual_hat).pow(2).sum(dim=(-1, -2)).mean() / variance.clamp_min(1e-12)


@dataclass(frozen=True)
class Sparsity:
    encode: Callable[[Crosscoder, torch.Tensor], torch.Tensor]  # (model, relu(pre)) -> codes
    penalty: Callable[[Crosscoder, torch.Tensor], torch.Tensor]  # (model, codes) -> the loss's sparsity term
    description: str


def _batchtopk_encode(model: Crosscoder, active: torch.Tensor) -> torch.Tensor:
    # Selection weighs each value by its decoder norms (what it adds to the reconstruction); the kept codes are
    # the unweighted values, which is what the decoders multiply.
    norms = model.decoder_norms().sum(dim=0).detach()
    return active * batch_top_k(active * norms, model.k)


def _l1_penalty(model: Crosscoder, codes: torch.Tensor) -> torch.Tensor:
    return model.l1_coefficient * (codes * model.decoder_norms().sum(dim=0)).sum(dim=-1).mean()


SPARSITIES: dict[str, Sparsity] = {
    "batchtopk": Sparsity(_batchtopk_encode, lambda model, codes: codes.new_zeros(()),
                          "BatchTopK: the k·batch largest decoder-norm-weighted activations of a batch are kept"),
    "l1": Sparsity(lambda model, active: active, _l1_penalty,
                   "L1: ReLU codes, loss + μ Σ_j f_j (‖d_j^base‖ + ‖d_j^finetuned‖)"),
}


def relative_norm_difference(norms: torch.Tensor) -> torch.Tensor:
    """Δ_norm per latent from decoder norms `[2, D]`: `½ ((‖d^ft‖ − ‖d^base‖) / max(‖d^ft‖, ‖d^base‖) + 1)`.

    1: only the finetuned model's decoder is non-zero; 0: only the base model's; ½: equal norms (the paper's
    convention, Minder, Dumas et al. 2025). A latent with both norms zero gets ½.
    """
    base, finetuned = norms[BASE], norms[FINETUNED]
    top = torch.maximum(base, finetuned)
    ratio = torch.where(top > 0, (finetuned - base) / top.clamp_min(1e-30), torch.zeros_like(top))
    return 0.5 * (ratio + 1.0)


def state_dict_of(model: Crosscoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def crosscoder_from_state(config: dict[str, float | int | str], state: dict[str, torch.Tensor]) -> Crosscoder:
    """A crosscoder with `config` (from `Crosscoder.config`) and trained weights `state`; a clear error when they
    do not fit each other."""
    model = Crosscoder(int(config["d_model"]), int(config["dict_size"]), str(config["sparsity"]), int(config["k"]),
                       float(config["l1_coefficient"]))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise MetaditError(f"crosscoder weights do not fit the configuration: expected {expected}, got {got}")
    model.load_state_dict(state)
    return model
