"""An on-disk cache of generated text, keyed by model, prompt and generation settings."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metadit.models import cache_dir


def text_cache_key(identity: dict[str, str], dtype: str = "bfloat16", device: str | Any = "cpu") -> str:
    """The text cache of a model computed in `dtype` on `device` (its type: `cuda:1` and `cuda` share one).

    Greedy answers differ between dtypes and between CPU and GPU kernels, and a bank's diffs must follow from
    its recipe, seed and index alone, so each (dtype, device type) has its own cache. bf16 and the CPU add no
    suffix: caches made before either was part of the key stay valid."""
    key = f"{identity['name'].replace('/', '--')}-{identity['fingerprint']}"
    key = key if dtype == "bfloat16" else f"{key}-{dtype}"
    kind = str(device).split(":")[0]
    return key if kind == "cpu" else f"{key}-{kind}"


class TextCache:
    """Generated text keyed by (model fingerprint, prompt, settings), appended to JSON-lines files.

    Each writer (process) appends to its own file so concurrent ranks never interleave lines; all
    files are read on open. A torn last line (a killed process) is skipped.
    """

    def __init__(self, model_key: str, writer: str = "main", root: Path | None = None) -> None:
        self.dir = (root or cache_dir() / "text") / model_key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / f"{writer}.jsonl"
        self.data: dict[str, str] = {}
        for f in sorted(self.dir.glob("*.jsonl")):
            for line in f.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self.data[row["k"]] = row["v"]
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(prompt: str, settings: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([prompt, settings], sort_keys=True).encode()).hexdigest()

    def get_or_generate(
        self, prompts: Sequence[str], settings: dict[str, Any], generate, tags: Sequence[Any] | None = None
    ) -> list[str]:
        """Return cached texts; call `generate(missing_prompts)` once for the rest and store them.

        `tags` (one per prompt) make otherwise equal prompts distinct entries, e.g. the k-th sampled story.
        """
        tags = list(tags) if tags is not None else [None] * len(prompts)
        keys = [self.key(p, {**settings, "tag": t} if t is not None else settings) for p, t in zip(prompts, tags)]
        missing = sorted({(k, p) for k, p in zip(keys, prompts) if k not in self.data})
        if missing:
            texts = generate([p for _, p in missing])
            with open(self.file, "a") as f:
                for (k, _), t in zip(missing, texts):
                    self.data[k] = t
                    f.write(json.dumps({"k": k, "v": t}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return [self.data[k] for k in keys]
