"""`DiffEncoder`: the hypernetwork ablation — read a diff's factors directly, emit k soft tokens.

Input features are functions of ΔW = s·B·A alone, so they are invariant to the factor symmetry
(B, A) → (B G, G⁻¹ A): QR of B and Aᵀ, then the small SVD of s·R_B R_Aᵀ gives ΔW's singular values and
singular vectors, which are projected to a fixed width by fixed random matrices (the sign of each
singular pair is fixed by its largest projected entry). One token per (layer, module) with layer and module
embeddings, a small transformer, and k learned query tokens whose outputs become the soft tokens.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from metadit.diff.lora_diff import LoraDiff

_LAYER = re.compile(r"\.(\d+)\.")


def svd_features(A: torch.Tensor, B: torch.Tensor, scale: float, p_in: torch.Tensor, p_out: torch.Tensor,
                 max_rank: int) -> torch.Tensor:
    """`[max_rank * (1 + 2 * proj)]` features of ΔW = scale·B@A, invariant to (B G, G⁻¹ A)."""
    A, B = A.double(), B.double()
    r = A.shape[0]
    qb, rb = torch.linalg.qr(B)  # B = qb rb
    qa, ra = torch.linalg.qr(A.T)  # Aᵀ = qa ra
    U, S, Vh = torch.linalg.svd(scale * rb @ ra.T)
    left = qb @ U  # [out, r]
    right = qa @ Vh.T  # [in, r]
    pl, pr = p_out.double() @ left, p_in.double() @ right  # [proj, r]
    idx = pr.abs().argmax(0)
    sign = torch.sign(pr[idx, torch.arange(r)])
    sign[sign == 0] = 1
    root = S.sqrt()
    feats = torch.cat([S[None, :], pl * sign * root, pr * sign * root], dim=0).T  # [r, 1 + 2 proj]
    k = min(r, max_rank)
    out = torch.zeros(max_rank, feats.shape[1], dtype=torch.float64)
    out[:k] = feats[:k]
    return out.flatten().float()


class DiffEncoder(nn.Module):
    def __init__(self, width: int = 128, proj_dim: int = 16, max_rank: int = 8, depth: int = 2, heads: int = 4,
                 soft_tokens: int = 4, max_layers: int = 64, seed: int = 0, cache_size: int = 4096) -> None:
        """
        Args:
            width: transformer width.
            proj_dim: singular vectors are projected to this many dimensions.
            max_rank: singular triplets kept per module (more are dropped, fewer zero-padded).
            depth: transformer layers.
            heads: attention heads.
            soft_tokens: k, the soft tokens prepended to the question.
            max_layers: size of the layer-embedding table.
            seed: the fixed random projections.
            cache_size: diffs whose features are kept (features are a pure function of the diff).
        """
        super().__init__()
        self.width, self.proj_dim, self.max_rank, self.k = width, proj_dim, max_rank, soft_tokens
        self.seed, self.max_layers = seed, max_layers
        # What rebuilds it from saved weights: the shapes alone do not give the heads or the projections' seed.
        self.settings = {"width": width, "proj_dim": proj_dim, "max_rank": max_rank, "depth": depth, "heads": heads,
                         "soft_tokens": soft_tokens, "max_layers": max_layers, "seed": seed}
        feat = max_rank * (1 + 2 * proj_dim)
        self.inp = nn.Linear(feat, width)
        self.layer_emb = nn.Embedding(max_layers, width)
        self.module_emb = nn.Embedding(16, width)
        self.queries = nn.Parameter(torch.randn(soft_tokens, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out: nn.Linear | None = None
        self.module_types: dict[str, int] = {}
        self._proj: dict[int, torch.Tensor] = {}
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    def configure(self, hidden_size: int) -> None:
        """Create the output projection once the base model's width is known."""
        if self.out is None or self.out.out_features != hidden_size:
            self.out = nn.Linear(self.width, hidden_size)
            nn.init.normal_(self.out.weight, std=0.02)
            nn.init.zeros_(self.out.bias)

    def _projection(self, dim: int) -> torch.Tensor:
        if dim not in self._proj:
            g = torch.Generator().manual_seed(self.seed * 100003 + dim)
            self._proj[dim] = torch.randn(self.proj_dim, dim, generator=g) / dim**0.5
        return self._proj[dim]

    def _module_type(self, name: str) -> int:
        kind = name.rsplit(".", 1)[-1]
        if kind not in self.module_types:
            self.module_types[kind] = len(self.module_types) % 16
        return self.module_types[kind]

    def features(self, diff: LoraDiff) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (diff.info.get("bank"), diff.info.get("id")) if diff.info.get("id") is not None else None
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        feats, layers, kinds = [], [], []
        for name in diff.modules:
            A, B = diff.A[name], diff.B[name]
            feats.append(svd_features(A, B, diff.scale[name], self._projection(A.shape[1]), self._projection(B.shape[0]),
                                      self.max_rank))
            m = _LAYER.search(name)
            layers.append(min(int(m.group(1)) if m else 0, self.max_layers - 1))
            kinds.append(self._module_type(name))
        out = (torch.stack(feats), torch.tensor(layers), torch.tensor(kinds))
        if key is not None:
            self._cache[key] = out
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def forward(self, diffs: list[LoraDiff | None]) -> torch.Tensor:
        """`[N, k, hidden]` soft tokens; a `None` row gets the encoding of an empty token set (queries only)."""
        if self.out is None:
            raise RuntimeError("DiffEncoder.configure(hidden_size) must be called first")
        device = self.queries.device
        rows = [self.features(d) if d is not None else None for d in diffs]
        n_tok = max((r[0].shape[0] for r in rows if r is not None), default=0)
        N = len(diffs)
        x = torch.zeros(N, n_tok + self.k, self.width, device=device)
        pad = torch.ones(N, n_tok + self.k, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            if r is None:
                continue
            f, lay, kind = (t.to(device) for t in r)
            x[i, : f.shape[0]] = self.inp(f) + self.layer_emb(lay) + self.module_emb(kind)
            pad[i, : f.shape[0]] = False
        x[:, n_tok:] = self.queries
        pad[:, n_tok:] = False
        h = self.transformer(x, src_key_padding_mask=pad)
        return self.out(h[:, n_tok:])
