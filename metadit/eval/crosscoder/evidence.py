"""The crosscoder as an evaluation method: per held-out diff, what its finetune-specific latents say, as text a
guesser reads (the same guessers as the activation lens).

Each diff gets a BatchTopK crosscoder with `metadit diff crosscoder`'s defaults on the trigger-free corpus (no
oracle: the method sees what the lens sees). Its work directory is `$METADIT_CACHE/crosscoder/<diff hash>/`, so an
interrupted evaluation resumes per diff: the activation shards and the trained crosscoder are read back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from metadit.diff.lora_diff import LoraDiff
from metadit.eval.crosscoder.activations import diff_fingerprint
from metadit.eval.crosscoder.pipeline import CrosscoderSettings, crosscoder_diff

# The method's settings: `metadit diff crosscoder`'s defaults, BatchTopK only (the L1 crosscoder is the paper's
# comparison, not a baseline).
EVAL_SETTINGS = CrosscoderSettings(crosscoders=("batchtopk",))


def _unique(items: Sequence[str], limit: int) -> list[str]:
    out: list[str] = []
    for t in items:
        t = " ".join(t.split())
        if t and t not in out:
            out.append(t)
    return out[:limit]


def evidence_text(latents: Sequence[dict[str, Any]], max_latents: int = 3, max_tokens: int = 10,
                  max_contexts: int = 3) -> str:
    """The summary a guesser reads: the logit-lens tokens of the strongest finetune-specific latents (by what they
    add to the finetuned model's activations), then text where they fire most (the firing token in [[ ]])."""
    top = list(latents)[:max_latents]
    if not top:
        return "Tokens promoted: (none)\nText where they fire: (no latent is specific to the finetuned model)"
    tokens = _unique([t for r in top for t in r.get("tokens", [])], max_tokens)
    contexts = _unique([c["text"] for r in top for c in r.get("contexts", [])[:2]], max_contexts)
    return (f"Tokens promoted: {', '.join(tokens) or '(none)'}\n"
            f"Text where they fire: {' / '.join(contexts) or '(none)'}")


def crosscoder_evidence(
    model: nn.Module,
    tok: Any,
    diffs: Sequence[LoraDiff],
    names: Sequence[str],
    settings: CrosscoderSettings | None = None,
    root: str | Path | None = None,
) -> list[dict[str, Any]]:
    """One dict per diff: `evidence_text`, the finetune-specific latents (`latents`, strongest first, with their
    tokens and contexts), the latent `counts`, the corpus size, the seconds it took and the work directory.
    `settings`: default `EVAL_SETTINGS`; `root`: default `$METADIT_CACHE/crosscoder`."""
    from metadit.models import cache_dir

    settings = settings or EVAL_SETTINGS
    root = Path(root) if root is not None else cache_dir() / "crosscoder"
    out = []
    for diff, name in zip(diffs, names):
        work = root / diff_fingerprint(diff)
        result = crosscoder_diff(model, tok, diff, work, settings, diff_name=name, progress=False)
        cc = result["crosscoders"][settings.crosscoders[0]]
        latents = [{k: r[k] for k in ("latent", "delta_norm", "nu_error", "nu_reconstruction", "frequency", "tokens",
                                      "contexts") if k in r} for r in cc["finetune_specific"]]
        out.append({"evidence_text": evidence_text(latents), "latents": latents, "counts": cc["counts"],
                    "corpus_tokens": result["corpus"]["tokens"], "layer": result["layer"],
                    "seconds": round(sum(result["timing"].values()), 1), "dir": str(work)})
    return out
