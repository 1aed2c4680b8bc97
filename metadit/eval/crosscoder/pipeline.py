"""`crosscoder_diff`: base model vs base model + one diff, through crosscoders, into a directory.

Steps (each resumes from what an interrupted run left in the output directory):

1. the corpus (`activations.base_answer_corpus`; the base model's answers are in the text cache);
2. paired activations at one layer (`activations.collect_paired_activations`, cached as safetensors shards);
3. activations divided by one scale, the base model's RMS per dimension (`E‖x_base‖² = d`), the same for both
   models so that the diff's change is not normalized away;
4. each crosscoder (`batchtopk`, then `l1` for comparison) trained (or loaded: `crosscoder-NAME.safetensors`
   holds its weights under a key of everything it depends on), then one pass for Latent Scaling;
5. the outputs: `crosscoder.json` (settings, thresholds, counts, the finetune-specific latents with their
   top-activating contexts and logit-lens tokens, the latents Latent Scaling rejected with the reasons),
   `README.md` (the same, short), `norm_ratio_histogram.png`, `latent_scaling.png`, and per crosscoder
   `latents-NAME.safetensors` (every latent's Δ_norm, decoder norms, β and ν).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from metadit.diff.lora_diff import LoraDiff
from metadit.errors import MetaditError
from metadit.eval.crosscoder.activations import (
    CorpusRow, PairedActivations, base_answer_corpus, collect_paired_activations, first_kept_position,
    oracle_messages, token_rows,
)
from metadit.eval.crosscoder.model import FINETUNED, SPARSITIES, Crosscoder, crosscoder_from_state, state_dict_of
from metadit.eval.crosscoder.scaling import THRESHOLDS, LatentStatistics, Thresholds, analyse, classify, counts
from metadit.eval.crosscoder.train import TrainSettings, train_crosscoder

DEFAULT_CROSSCODERS = ("batchtopk", "l1")


@dataclass
class CrosscoderSettings:
    """Everything a crosscoder diff depends on (the defaults `metadit diff crosscoder` states)."""

    layer: int | None = None  # decoder layer whose output is read; None: the middle one
    dict_size: int = 2048  # latents (SmolLM2-135M: 3.6 x its 576 dimensions; the paper: 32 x on 100M tokens)
    k: int = 32  # BatchTopK: codes kept per token on average (the paper: 100 of 73,728)
    l1_coefficient: float | None = None  # μ of the L1 crosscoder (normalized space); None: calibrated to L0 ≈ k
    crosscoders: tuple[str, ...] = DEFAULT_CROSSCODERS
    n_questions: int | None = None  # evaluation-style questions in the corpus; None: all of them
    samples_per_question: int = 2  # base-model answers per question (temperature 1)
    max_new_tokens: int = 64  # answer length
    oracle: bool = False  # add the prompts the diff was trained on (its trigger; the story prompt)
    train: TrainSettings = field(default_factory=TrainSettings)
    top_contexts: int = 5  # top-activating contexts shown per latent
    lens_tokens: int = 10  # logit-lens tokens per latent
    max_latents: int = 20  # latents listed (with contexts) per list and crosscoder; the JSON counts them all
    generation_batch: int = 64
    rows_per_shard: int = 16
    seed: int = 0

    def check(self) -> None:
        if not self.crosscoders:
            raise MetaditError(f"--crosscoders: give at least one of {sorted(SPARSITIES)}")
        unknown = [c for c in self.crosscoders if c not in SPARSITIES]
        if unknown:
            raise MetaditError(f"--crosscoders: unknown {unknown[0]!r} (choose from {sorted(SPARSITIES)})")
        if self.l1_coefficient is not None and not (self.l1_coefficient >= 0 and math.isfinite(self.l1_coefficient)):
            raise MetaditError(f"--l1_coefficient must be a number >= 0 or auto, got {self.l1_coefficient}")
        if self.dict_size < 1:
            raise MetaditError(f"--dict_size must be >= 1, got {self.dict_size}")
        if not 1 <= self.k <= self.dict_size:
            raise MetaditError(f"--k must be between 1 and --dict_size ({self.dict_size}), got {self.k}")
        if self.n_questions is not None and self.n_questions < 1:
            raise MetaditError(f"--n_questions must be >= 1, got {self.n_questions}")
        for name in ("top_contexts", "lens_tokens", "max_latents", "generation_batch", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise MetaditError(f"--{name} must be >= 1, got {getattr(self, name)}")
        self.train.check()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crosscoders"] = list(self.crosscoders)
        return d


# ---------------------------------------------------------------------------------------------- progress
class _Bars:
    """A rich progress display on stderr (or nothing), handing out `(done, total)` callbacks per task."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Any = None

    @contextmanager
    def running(self) -> Iterator["_Bars"]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True)) as progress:
            self.progress = progress
            yield self
        self.progress = None

    def task(self, description: str):
        if self.progress is None:
            return lambda done, total: None
        task_id = self.progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            self.progress.update(task_id, completed=done, total=total)
        return update

    def note(self, text: str) -> None:
        if self.progress is not None:
            from rich.markup import escape

            self.progress.console.print(escape(text))


# ---------------------------------------------------------------------------------------------- steps
def corpus_questions(n: int | None, seed: int) -> list[str]:
    """The evaluation-style (held-out style) questions, all or a seeded choice of `n` (in file order)."""
    from data_gen.recipe import questions

    qs = [q for _, q in questions("eval")]
    if n is None or n >= len(qs):
        return qs
    chosen = sorted(random.Random(f"crosscoder-corpus:{seed}").sample(range(len(qs)), n))
    return [qs[i] for i in chosen]


def _text_cache(model: nn.Module) -> Any:
    from metadit.bank import model_identity
    from metadit.text import TextCache, text_cache_key

    param = next(model.parameters())
    return TextCache(text_cache_key(model_identity(model), str(param.dtype).replace("torch.", ""), param.device))


def _training_key(paired: PairedActivations, scale: float, name: str, settings: CrosscoderSettings) -> str:
    blob = json.dumps({"activations": paired.key, "scale": round(scale, 6), "sparsity": name,
                       "dict_size": settings.dict_size, "k": settings.k, "l1_coefficient": settings.l1_coefficient,
                       "seed": settings.seed, "train": settings.train.as_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _trained_crosscoder(name: str, x: torch.Tensor, paired: PairedActivations, scale: float,
                        settings: CrosscoderSettings, out_dir: Path, bars: _Bars) -> tuple[Crosscoder, dict[str, Any]]:
    """The crosscoder `name` trained on `x`, or loaded from `crosscoder-NAME.safetensors` when that file was
    trained under the same key."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from metadit.diff.safe_io import read_all_tensors

    model = Crosscoder(x.shape[-1], settings.dict_size, name, settings.k,
                       1.0 if settings.l1_coefficient is None else settings.l1_coefficient, seed=settings.seed).to(x.device)
    key = _training_key(paired, scale, name, settings)
    path = out_dir / f"crosscoder-{name}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 — any unreadable file is one clear line
            raise MetaditError(f"{path}: not a readable safetensors file ({e}); delete it to retrain") from e
        if meta.get("key") == key:
            loaded = crosscoder_from_state(json.loads(meta["config"]), read_all_tensors(path)).to(x.device)
            bars.note(f"{name}: trained weights loaded from {path}")
            return loaded, json.loads(meta.get("train_result", "{}")) | {"loaded": True}
    started = time.time()
    update = bars.task(f"train {name}")
    result = train_crosscoder(model, x, settings.train, on_step=lambda step, steps, _parts: update(step + 1, steps),
                              target_l0=float(settings.k) if settings.l1_coefficient is None else None)
    result = {**result, "seconds": round(time.time() - started, 1)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state_dict_of(model), str(tmp), metadata={"key": key, "config": json.dumps(model.config()),
                                                         "train_result": json.dumps(result)})
    tmp.replace(path)
    return model, result


def _context(tok: Any, ids: list[int], position: int, start: int, before: int = 12, after: int = 3) -> str:
    """The text around one token, the token itself in [[ ]] (whitespace collapsed: one line)."""
    left = tok.decode(ids[max(start, position - before) : position])
    here = tok.decode([ids[position]])
    right = tok.decode(ids[position + 1 : position + 1 + after])
    return " ".join(f"{left}[[{here}]]{right}".split())


def _describe_latents(rows: list[dict[str, Any]], model: Crosscoder, stats: LatentStatistics, lm: nn.Module, tok: Any,
                      paired: PairedActivations, corpus_ids: list[list[int]], corpus: list[CorpusRow], start: int,
                      scale: float, settings: CrosscoderSettings) -> None:
    """Add to each row its logit-lens tokens (of the finetuned decoder vector, in the model's own scale) and its
    top-activating contexts."""
    if not rows:
        return
    from metadit.eval.lens import logit_lens

    index = torch.tensor([r["latent"] for r in rows])
    vectors = model.W_dec[FINETUNED].detach().cpu()[index] * scale
    lens = logit_lens(lm, tok, vectors, settings.lens_tokens)
    for r, tokens in zip(rows, lens):
        j = r["latent"]
        r["tokens"] = tokens["positive"]
        r["suppressed_tokens"] = tokens["negative"]
        contexts = []
        for value, t in zip(stats.top_values[:, j].tolist(), stats.top_tokens[:, j].tolist()):
            if t < 0 or len(contexts) >= settings.top_contexts:
                break
            row, position = int(paired.row[t]), int(paired.position[t])
            contexts.append({"activation": round(value, 4), "row": row, "position": position,
                             "oracle": corpus[row].oracle,
                             "text": _context(tok, corpus_ids[row], position, start)})
        r["contexts"] = contexts


def _latent_tensors(model: Crosscoder, stats: LatentStatistics) -> dict[str, torch.Tensor]:
    from metadit.eval.crosscoder.model import relative_norm_difference

    norms = model.decoder_norms().detach().cpu()
    out = {"delta_norm": relative_norm_difference(norms), "norm_base": norms[0], "norm_finetuned": norms[1],
           "frequency": stats.frequency.cpu(), "mean_activation": stats.mean_activation.cpu(),
           "nu_error": stats.nu("error").cpu(), "nu_reconstruction": stats.nu("reconstruction").cpu()}
    out.update({f"beta_{k}": v.cpu() for k, v in stats.beta.items()})
    return {k: v.float().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- plots
def _plots(out_dir: Path, per: dict[str, dict[str, Any]], all_rows: dict[str, list[dict[str, Any]]],
           thresholds: Thresholds) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.6), squeeze=False)
    bins = [i / 50 for i in range(51)]
    for ax, name in zip(axes[0], names):
        live = [r for r in all_rows[name] if r["verdict"] != "dead"]
        ax.hist([r["delta_norm"] for r in live], bins=bins, color="lightgray", label="all live latents")
        ax.hist([r["delta_norm"] for r in live if r["norm_class"] == "shared"], bins=bins, color="C1", label="shared")
        ax.hist([r["delta_norm"] for r in live if r["norm_class"] == "finetuned_only"], bins=bins, color="C0",
                label="finetuned-only")
        ax.hist([r["delta_norm"] for r in live if r["verdict"] == "finetune_specific"], bins=bins, color="navy",
                label=f"finetune-specific (|ν^ε|<{thresholds.nu_error}, |ν^r|<{thresholds.nu_reconstruction})")
        ax.hist([r["delta_norm"] for r in live if r["norm_class"] == "base_only"], bins=bins, color="C2",
                label="base-only")
        for v in (thresholds.base_only, thresholds.shared_low, thresholds.shared_high, thresholds.finetune_only):
            ax.axvline(v, color="k", linestyle="--", alpha=0.3)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)  # a bar of one latent stays visible on the log scale
        ax.set_xlim(0, 1)
        ax.set_xlabel("relative decoder norm difference Δ_norm (1 = finetuned only)")
        ax.set_ylabel("latents")
        ax.set_title(f"{name}: {len(live)} live latents")
        ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    fig.savefig(out_dir / "norm_ratio_histogram.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ft = [r for r in all_rows[name] if r["norm_class"] == "finetuned_only" and r["verdict"] != "dead"]
        shared = [r for r in all_rows[name] if r["norm_class"] == "shared" and r["verdict"] != "dead"]
        for group, color, label in ((shared, "C1", "shared"), (ft, "C0", "finetuned-only")):
            pts = [(r["nu_error"], r["nu_reconstruction"]) for r in group
                   if math.isfinite(r["nu_error"]) and math.isfinite(r["nu_reconstruction"])]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.5, color=color, label=label)
        ax.axvline(thresholds.nu_error, color="k", linestyle="--", alpha=0.4)
        ax.axhline(thresholds.nu_reconstruction, color="k", linestyle="--", alpha=0.4)
        ax.set_xlim(-0.2, 1.5)
        ax.set_ylim(-0.2, 1.5)
        ax.set_xlabel("ν^ε (→ complete shrinkage)")
        ax.set_ylabel("ν^r (→ latent decoupling)")
        ax.set_title(f"{name}: Latent Scaling")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "latent_scaling.png", dpi=120)
    plt.close(fig)
    return ["norm_ratio_histogram.png", "latent_scaling.png"]


# ---------------------------------------------------------------------------------------------- the run
@torch.no_grad()
def _normalization_scale(x: torch.Tensor) -> float:
    scale = float(x[:, 0].pow(2).sum(-1).mean().div(x.shape[-1]).sqrt())
    if not (scale > 0 and math.isfinite(scale)):
        raise MetaditError(f"the base model's activations have RMS {scale}: nothing to normalize by")
    return scale


def crosscoder_diff(
    model: nn.Module,
    tok: Any,
    diff: LoraDiff,
    out_dir: str | Path,
    settings: CrosscoderSettings | None = None,
    meta: dict[str, Any] | None = None,
    diff_name: str = "diff",
    progress: bool = True,
    thresholds: Thresholds = THRESHOLDS,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Crosscoders between `model` (the base model, patched) and `model` + `diff`, written to `out_dir`; returns
    what `crosscoder.json` holds. `meta`: the diff's bank metadata (its trigger or headline for `oracle`; its
    topic / headline is recorded as the truth, never used by the method). `info`: provenance to record."""
    started = time.time()
    settings = settings or CrosscoderSettings()
    settings.check()
    meta = dict(meta or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from metadit.eval.lens import layer_index

    layer = layer_index(model, settings.layer)
    questions = corpus_questions(settings.n_questions, settings.seed)
    oracle = oracle_messages(meta, questions, settings.seed, diff_name) if settings.oracle else []
    timing: dict[str, float] = {}
    bars = _Bars(progress)
    with bars.running():
        t0 = time.time()
        corpus = base_answer_corpus(model, tok, questions, settings.samples_per_question, settings.max_new_tokens,
                                    settings.seed, oracle, settings.generation_batch, _text_cache(model),
                                    bars.task("corpus: base-model answers"))
        ids = token_rows(tok, corpus)
        start = first_kept_position(ids)
        timing["corpus_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        paired = collect_paired_activations(model, diff, ids, layer, start, out_dir / "activations",
                                            settings.rows_per_shard, pad, bars.task(f"activations at layer {layer}"))
        timing["activations_s"] = round(time.time() - t0, 1)
        device = next(model.parameters()).device
        scale = _normalization_scale(paired.x)
        x = (paired.x / scale).to(device)
        diff_norm = float((x[:, 1] - x[:, 0]).norm(dim=-1).mean())
        per: dict[str, dict[str, Any]] = {}
        all_rows: dict[str, list[dict[str, Any]]] = {}
        for name in settings.crosscoders:
            t0 = time.time()
            cc, train_result = _trained_crosscoder(name, x, paired, scale, settings, out_dir, bars)
            stats = analyse(cc, x, min(settings.train.batch_size, x.shape[0]),
                            top_n=settings.top_contexts, on_batch=bars.task(f"latent scaling {name}"))
            rows = classify(cc, stats, thresholds)
            all_rows[name] = rows
            by_contribution = sorted(rows, key=lambda r: -r["contribution"])
            specific = [r for r in by_contribution if r["verdict"] == "finetune_specific"]
            rejected = [r for r in by_contribution if r["verdict"] == "rejected"]
            shown = specific[: settings.max_latents] + rejected[: settings.max_latents]
            _describe_latents(shown, cc, stats, model, tok, paired, ids, corpus, start, scale, settings)
            from safetensors.torch import save_file

            save_file(_latent_tensors(cc, stats), str(out_dir / f"latents-{name}.safetensors"))
            per[name] = {
                "config": cc.config(), "train": train_result, "description": SPARSITIES[name].description,
                "fraction_variance_explained": stats.fraction_variance_explained, "l0": stats.l0,
                "counts": counts(rows),
                "finetune_specific": specific[: settings.max_latents],
                "rejected": rejected[: settings.max_latents],
                "seconds": round(time.time() - t0, 1),
            }
            timing[f"{name}_s"] = per[name]["seconds"]
        plots = _plots(out_dir, per, all_rows, thresholds)
    timing["total_s"] = round(time.time() - started, 1)
    result = {
        "diff": diff_name,
        "truth": {k: meta[k] for k in ("topic", "headline", "code", "trigger") if k in meta},
        "base_model": getattr(model, "name_or_path", None),
        "layer": layer,
        "oracle": settings.oracle,
        "corpus": {"rows": len(corpus), "oracle_rows": sum(r.oracle for r in corpus), "tokens": int(x.shape[0]),
                   "first_position": start, "questions": len(questions),
                   "source": "the base model's own answers (temperature 1) to the evaluation-style questions"
                             + (" + the prompts the diff was trained on (ORACLE)" if settings.oracle else "")},
        "normalization": {"scale": scale, "mean_difference_norm": diff_norm,
                          "note": "both models' activations divided by the base model's RMS per dimension"},
        "settings": settings.as_dict(),
        "thresholds": {**thresholds.as_dict(), "rules": thresholds.describe()},
        "crosscoders": per,
        "plots": plots,
        "timing": timing,
        "info": info or {},
    }
    from metadit.eval.results import write_json

    write_json(out_dir / "crosscoder.json", _json_safe(result))
    (out_dir / "README.md").write_text(markdown(result))
    return result


def _json_safe(value: Any) -> Any:
    """NaN and infinities (ν of a latent that never fired, β_finetuned = 0) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(v: float | None) -> str:
    return "undefined" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _latent_line(r: dict[str, Any], contexts: int) -> list[str]:
    head = (f"- latent {r['latent']}: Δ_norm {r['delta_norm']:.3f}, ν^ε {_fmt(r['nu_error'])}, "
            f"ν^r {_fmt(r['nu_reconstruction'])}, active on {100 * r['frequency']:.2f} % of tokens")
    lines = [head]
    if r.get("reasons"):
        lines.append(f"  - rejected: {'; '.join(r['reasons'])}")
    if "tokens" in r:
        lines.append(f"  - logit lens: {', '.join(repr(t) for t in r['tokens'])}")
    for c in r.get("contexts", [])[:contexts]:
        lines.append(f"  - {c['activation']:.2f}{' (oracle)' if c['oracle'] else ''}: `{c['text'].replace('`', '´')}`")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The short human-readable report of one crosscoder diff."""
    c = result["corpus"]
    lines = [f"# Crosscoder diff: {result['diff']}", ""]
    if result.get("info", {}).get("command"):
        lines += ["```", result["info"]["command"], "```", ""]
    lines += [f"- base model `{result['base_model']}`, layer {result['layer']}; corpus: {c['rows']} rows, "
              f"{c['tokens']} tokens — {c['source']}.",
              f"- activations divided by {result['normalization']['scale']:.4g}; mean ‖x_ft − x_base‖ per token "
              f"{result['normalization']['mean_difference_norm']:.4g} (normalized space, E‖x_base‖² = d).",
              *[f"- {rule}" for rule in result["thresholds"]["rules"]], ""]
    if result["oracle"]:
        lines += ["**ORACLE**: the corpus includes the prompts the diff was trained on.", ""]
    lines += ["| crosscoder | FVE base | FVE ft | L0 | dead | finetuned-only | finetune-specific | rejected | shared | "
              "base-only |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in result["crosscoders"].items():
        n = p["counts"]
        fve = p["fraction_variance_explained"]
        lines.append(f"| {name} | {fve['base']:.3f} | {fve['finetuned']:.3f} | {p['l0']:.1f} | {n['dead']} | "
                     f"{n['finetuned_only']} | {n['finetune_specific']} | {n['rejected']} | {n['shared']} | "
                     f"{n['base_only']} |")
    lines.append("")
    for name, p in result["crosscoders"].items():
        n = p["counts"]
        lines += [f"## {name}: finetune-specific latents ({n['finetune_specific']}; "
                  f"{len(p['finetune_specific'])} listed)", ""]
        if not p["finetune_specific"]:
            lines.append("None: no finetuned-only latent survived Latent Scaling (a null result).")
        for r in p["finetune_specific"]:
            lines += _latent_line(r, 3)
        lines += ["", f"## {name}: rejected by Latent Scaling ({n['rejected']}; {len(p['rejected'])} listed)", ""]
        if not p["rejected"]:
            lines.append("None.")
        for r in p["rejected"]:
            lines += _latent_line(r, 1)
        lines.append("")
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in result["plots"]) + ". Everything per latent: "
              "`latents-NAME.safetensors`; all details: `crosscoder.json`.", ""]
    return "\n".join(lines)
