"""Training a crosscoder on paired activations held in memory (`x: [tokens, 2, d]`).

Adam over shuffled batches; the learning rate warms up linearly over the first steps and decays linearly to zero
over the last fifth; the L1 penalty ramps in linearly over the first 5 % of steps (as in Anthropic's crosscoder
recipe), so early training finds the directions before the penalty prunes them. BatchTopK crosscoders add the
auxiliary loss on latents that fired on none of the last `dead_after_tokens` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from metadit.errors import MetaditError
from metadit.eval.crosscoder.model import Crosscoder, aux_loss


@dataclass
class TrainSettings:
    """How a crosscoder is trained (the defaults `metadit diff crosscoder` states)."""

    train_tokens: int = 262_144  # tokens seen in training (steps × batch_size), corpus repeated as needed
    batch_size: int = 512  # tokens per step; BatchTopK keeps k × batch_size codes per batch, at inference too
    lr: float = 1e-3
    warmup_steps: int = 20
    aux_k: int = 64  # dead latents each token may use in the auxiliary loss (BatchTopK)
    aux_alpha: float = 1 / 32  # weight of the auxiliary loss (BatchTopK)
    dead_after_tokens: int | None = None  # None: one pass over the corpus
    l1_warmup_share: float = 0.05
    seed: int = 0

    def check(self) -> None:
        for name in ("train_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise MetaditError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MetaditError(f"lr must be a positive number, got {self.lr}")

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_start = int(0.8 * steps)
    if step >= decay_start and steps > decay_start:
        return max(0.0, (steps - step) / (steps - decay_start))
    return 1.0


def train_crosscoder(
    model: Crosscoder,
    x: torch.Tensor,
    settings: TrainSettings,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    target_l0: float | None = None,
) -> dict[str, float]:
    """Train `model` in place on `x: [tokens, 2, d]`; returns the last step's loss parts (`reconstruction`,
    `penalty`, `aux`, `dead`: latents counted dead at the end, `l0`, and `l1_coefficient` for an L1 crosscoder).
    `on_step(step, steps, parts)` follows progress. `target_l0` (L1 crosscoders): calibrate μ to this L0."""
    settings.check()
    n = x.shape[0]
    if n == 0:
        raise MetaditError("no activations to train a crosscoder on")
    batch = min(settings.batch_size, n)
    steps = max(1, math.ceil(settings.train_tokens / batch))
    dead_after = settings.dead_after_tokens or n
    # Decoder biases start at each model's mean activation: the latents then only have to explain the rest.
    with torch.no_grad():
        model.b_dec.copy_(x.mean(dim=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    g = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(n, generator=g).to(x.device)
    cursor = 0
    since_fired = torch.zeros(model.dict_size, dtype=torch.long, device=x.device)
    parts: dict[str, float] = {}
    l0_average = 0.0
    l1_ramp = max(1, int(settings.l1_warmup_share * steps))
    model.train()
    for step in range(steps):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=g).to(x.device), 0
        xb = x[order[cursor : cursor + batch]]
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, steps, settings.warmup_steps)
        out = model(xb)
        loss, parts = model.loss(xb, out, penalty_weight=min(1.0, (step + 1) / l1_ramp))
        fired = (out.codes > 0).any(dim=0)
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + batch)
        dead = since_fired >= dead_after
        aux = x.new_zeros(())
        if model.sparsity == "batchtopk" and settings.aux_alpha > 0:
            aux = aux_loss(model, xb, out, dead, settings.aux_k)
            loss = loss + settings.aux_alpha * aux
        if not torch.isfinite(loss):
            raise MetaditError(f"crosscoder training diverged at step {step} (loss {float(loss)}): lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        l0 = float((out.codes > 0).float().sum(dim=-1).mean())
        l0_average = l0 if step == 0 else 0.9 * l0_average + 0.1 * l0
        if target_l0 is not None and model.sparsity == "l1" and l1_ramp <= step < steps // 2:
            # log μ moves toward the L0 target, slowly (the codes take a few steps to follow μ) and by a bounded
            # step, so that it settles instead of overshooting.
            error = math.log(max(l0_average, 1e-3) / target_l0)
            model.l1_coefficient *= math.exp(0.02 * max(-1.0, min(1.0, error)))
        parts = {**parts, "aux": float(aux.detach()), "dead": float(dead.sum()), "l0": l0}
        if model.sparsity == "l1":
            parts["l1_coefficient"] = model.l1_coefficient
        if on_step is not None:
            on_step(step, steps, parts)
    model.eval()
    return parts
