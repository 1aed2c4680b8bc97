"""`metadit diff TOOL`: model-diffing tools that compare the base model with the base model + one diff.

Tools are registered in `TOOLS` (name → arguments and run). `crosscoder` trains crosscoders on paired
activations and classifies their latents with Latent Scaling (`metadit.eval.crosscoder`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from metadit.errors import MetaditError


@dataclass(frozen=True)
class Tool:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""  # the subcommand's --help text (default: `help`)


def _flag(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _coefficient(value: str) -> float | None:
    if value.lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from e


def _crosscoder_arguments(p: argparse.ArgumentParser) -> None:
    from metadit.eval.crosscoder.pipeline import CrosscoderSettings
    from metadit.eval.crosscoder.train import TrainSettings

    s, t = CrosscoderSettings(), TrainSettings()
    p.add_argument("--diff", required=True, help="a bank entry BANK_DIR:INDEX or a peft LoRA adapter directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumes what a killed run left there)")
    p.add_argument("--base_model", default=None, help="default: the bank's / the adapter's base model")
    p.add_argument("--layer", type=int, default=s.layer, help="decoder layer whose output is read (default: the middle one)")
    p.add_argument("--dict_size", type=int, default=s.dict_size, help=f"crosscoder latents (default {s.dict_size})")
    p.add_argument("--k", type=int, default=s.k, help=f"BatchTopK: codes per token on average, in training and at "
                   f"inference (default {s.k})")
    p.add_argument("--l1_coefficient", type=_coefficient, default=s.l1_coefficient,
                   help="μ of the L1 crosscoder (activations normalized to E‖x‖² = d), or auto (default): μ calibrated "
                        "in the first half of training so the L1 crosscoder's L0 is about k, as BatchTopK's")
    p.add_argument("--crosscoders", default=",".join(s.crosscoders),
                   help="which crosscoders, comma-separated: batchtopk (the method), l1 (the paper's comparison)")
    p.add_argument("--train_tokens", type=int, default=t.train_tokens,
                   help=f"tokens seen in training, the corpus repeated as needed (default {t.train_tokens})")
    p.add_argument("--batch_size", type=int, default=t.batch_size, help=f"tokens per step (default {t.batch_size})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"Adam learning rate (default {t.lr})")
    p.add_argument("--n_questions", type=int, default=s.n_questions,
                   help="evaluation-style questions in the corpus (default: all)")
    p.add_argument("--samples_per_question", type=int, default=s.samples_per_question,
                   help=f"base-model answers per question, temperature 1 (default {s.samples_per_question})")
    p.add_argument("--max_new_tokens", type=int, default=s.max_new_tokens, help=f"answer length (default {s.max_new_tokens})")
    p.add_argument("--oracle", action="store_true", help="add the prompts the diff was trained on (its trigger; a "
                   "news diff's story prompt): an oracle, marked as such in the output")
    p.add_argument("--top_contexts", type=int, default=s.top_contexts, help="top-activating contexts per latent")
    p.add_argument("--max_latents", type=int, default=s.max_latents, help="latents listed per list and crosscoder")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bf16 where native, else fp32), float32, bfloat16")
    p.add_argument("--device", default="cpu", help="where the model and the crosscoders run")
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--progress", type=_flag, default=True, help="progress bars on stderr (true/false)")


def _crosscoder_run(args: argparse.Namespace) -> int:
    from metadit.bank import open_diff
    from metadit.eval.crosscoder.pipeline import CrosscoderSettings, crosscoder_diff
    from metadit.eval.crosscoder.train import TrainSettings
    from metadit.eval.results import run_info

    train = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings) if hasattr(args, f.name)})
    settings = CrosscoderSettings(**{f.name: getattr(args, f.name) for f in fields(CrosscoderSettings)
                                     if hasattr(args, f.name) and f.name not in ("crosscoders", "train")},
                                  crosscoders=tuple(c.strip() for c in args.crosscoders.split(",") if c.strip()),
                                  train=train)
    settings.check()  # bad settings fail before any model loads
    diff, meta, bank = open_diff(args.diff)
    base = args.base_model or (bank.base_model["name"] if bank is not None else diff.info.get("base_model"))
    if not base:
        raise MetaditError("no base model recorded in the diff: pass --base_model")
    from metadit.models import load_base_model
    from metadit.nn import patch_model

    model, tok = load_base_model(base, dtype=args.dtype, device=args.device,
                                 chat_format=bank.chat_format if bank is not None else "default")
    patch_model(model)
    if bank is not None:
        bank.check_model(model)
    result = crosscoder_diff(model, tok, diff, args.out, settings, meta=meta, diff_name=str(args.diff),
                             progress=args.progress, info=run_info())
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    for name, p in result["crosscoders"].items():
        n = p["counts"]
        console.print(escape(f"{name}: {n['finetuned_only']} finetuned-only latents, {n['finetune_specific']} "
                             f"finetune-specific after Latent Scaling, {n['rejected']} rejected, {n['dead']} dead "
                             f"(of {n['latents']})"))
    console.print(escape(f"wrote {args.out / 'crosscoder.json'}, {args.out / 'README.md'} and the plots"))
    return 0


def _crosscoder_description() -> str:
    from metadit.eval.crosscoder.scaling import THRESHOLDS

    return ("BatchTopK (and L1) crosscoders between the base model and the base model + one diff, on paired "
            "activations at one layer; latents classified by their relative decoder norm and Latent Scaling "
            "(Minder, Dumas et al. 2025). Thresholds: " + " ".join(r + "." for r in THRESHOLDS.describe()))


TOOLS: dict[str, Tool] = {
    "crosscoder": Tool("BatchTopK (and L1) crosscoders on paired activations; latents classified by Latent Scaling",
                       _crosscoder_arguments, _crosscoder_run, _crosscoder_description()),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="diff_tool", required=True, metavar="{" + ",".join(TOOLS) + "}")
    for name, tool in TOOLS.items():
        tool.add_arguments(sub.add_parser(name, help=tool.help, description=tool.description or tool.help))


def main(args: argparse.Namespace) -> int:
    return TOOLS[args.diff_tool].run(args)
