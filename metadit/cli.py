"""`metadit`: one entry point. `fit|validate|test|predict` are LightningCLI subcommands; the rest are ours.

Each subcommand is registered in `COMMANDS` with a function that adds its arguments and one that runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from metadit.commands import SUBCOMMANDS
from metadit.errors import MetaditError


@dataclass
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    passthrough: bool = False  # hands its raw argv to another parser (LightningCLI)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, passthrough: bool = False):
    def register(add_arguments: Callable[[argparse.ArgumentParser], None]):
        def attach(run: Callable[[argparse.Namespace], int]):
            COMMANDS[name] = Command(help, add_arguments, run, passthrough)
            return run
        return attach
    return register


# ---------------------------------------------------------------------- bank
def _bank_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bank_command", required=True,
                           metavar="{info,rows,verify,repair,import-peft,export-peft,import-dit,import-dit-adapter}")
    info = sub.add_parser("info", help="summary of a bank: base model, diffs, ranks, problems")
    info.add_argument("bank", type=Path)
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    rows = sub.add_parser("rows", help="one JSON line per entry (index, id, sha256, rank and its metadata: the "
                          "behaviour check's counts and verdicts): the per-diff rows a report commits")
    rows.add_argument("bank", type=Path)
    rows.add_argument("--out", type=Path, help="write them to this file (default: standard output)")
    verify = sub.add_parser("verify", help="recompute every entry's checksum and list files that are not part of the "
                            "bank; non-zero exit if an entry is corrupt or a pickle-format file is there")
    verify.add_argument("bank", type=Path)
    repair = sub.add_parser("repair", help="remove the torn tail an interrupted write left behind")
    repair.add_argument("bank", type=Path)
    imp = sub.add_parser("import-peft", help="append a peft LoRA adapter directory to a bank")
    imp.add_argument("bank", type=Path)
    imp.add_argument("adapter", type=Path)
    imp.add_argument("--meta", default="{}", help="JSON object stored as the entry's metadata")
    exp = sub.add_parser("export-peft", help="write bank entry INDEX as a peft adapter directory")
    exp.add_argument("bank", type=Path)
    exp.add_argument("index", type=int)
    exp.add_argument("out", type=Path)
    dit = sub.add_parser("import-dit", help="import the paper's released diffs (index.csv + weight-diffs/*.pt, read "
                         "with torch's restricted loader only) into a bank")
    dit.add_argument("src", type=Path, help="a released experiment folder (e.g. hidden-topic/qwen3-8b) or its index.csv")
    dit.add_argument("out_bank", type=Path, help="the bank to create (or resume)")
    dit.add_argument("--base_model", required=True, help="the model the diffs belong to (HF id, directory, embedded name)")
    dit.add_argument("--kind", default="auto", choices=("auto", "topic", "news"),
                     help="news: the index's topic column holds headlines (auto: news when no row has a trigger)")
    dad = sub.add_parser("import-dit-adapter", help="write the paper's released DIT adapter (dit-adapter*.pt) as a "
                         "peft adapter directory")
    dad.add_argument("file", type=Path)
    dad.add_argument("out_dir", type=Path)
    dad.add_argument("--base_model", required=True, help="the model the adapter belongs to")


def _bank_import_reference(args: argparse.Namespace) -> int:
    """`bank import-dit` and `bank import-dit-adapter` (metadit.bank.reference_import): no bank to open first."""
    from rich.console import Console
    from rich.markup import escape

    from metadit.bank.reference_import import import_reference_adapter, import_reference_bank

    console = Console(stderr=True, soft_wrap=True)  # one line per message: scripts read them
    if args.bank_command == "import-dit":
        done = import_reference_bank(args.src, args.out_bank, args.base_model, kind=args.kind,
                                     log=lambda line: console.print(escape(line)))
        console.print(escape(f"{done['bank']}: imported {done['imported']} diffs ({done['already_present']} already "
                             f"there) of {done['rows']} index rows, kind {done['kind']}, splits {done['splits']}"))
        return 0
    adapter = import_reference_adapter(args.file, args.out_dir, args.base_model)
    console.print(escape(f"wrote {args.out_dir}: peft adapter for {args.base_model} ({len(adapter.modules)} modules, "
                         f"rank {adapter.rank}; chat format no_thinking)"))
    return 0


@command("bank", "inspect, verify, repair, import into and export from a diff bank")(_bank_args)
def _bank(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from metadit.bank import DiffBank, LoraDiff

    if args.bank_command in ("import-dit", "import-dit-adapter"):
        return _bank_import_reference(args)
    console = Console(soft_wrap=True)  # a path per line, unbroken
    bank = DiffBank.open(args.bank)  # bank text is data: escaped below, never read as rich markup
    if args.bank_command == "info":
        s = bank.summary()
        if args.json:
            print(json.dumps(s, indent=2))
            return 0
        table = Table(title=f"diff bank {escape(s['path'])}", show_header=False)
        for k in ("base_model", "created", "diffs", "ranks", "behaviour_check", "writers", "shards", "bytes"):
            v = s[k]
            table.add_row(k, escape(f"{v['name']} (fingerprint {v['fingerprint']})" if k == "base_model" else str(v)))
        for k, v in s["info"].items():
            table.add_row(escape(f"info.{k}"), escape(str(v)))
        table.add_row("problems", escape("\n".join(s["problems"])) or "none")
        console.print(table)
        return 0
    if args.bank_command == "rows":
        lines = "".join(json.dumps({"index": i, "id": r["id"], "sha256": r["sha256"], "rank": r["rank"], **r["meta"]})
                        + "\n" for i, r in enumerate(bank.rows))
        if args.out is None:
            sys.stdout.write(lines)
        else:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(lines)
            console.print(escape(f"wrote {len(bank)} rows to {args.out}"))
        return 0
    if args.bank_command == "verify":
        bad = bank.verify()
        for line in bad:
            console.print(f"[red]corrupt[/red] {escape(line)}")
        for p in bank.problems:
            console.print(f"[yellow]torn tail[/yellow] {escape(str(p))}")
        foreign = bank.foreign_files()
        for f in foreign:
            console.print(f"[{'red' if f.pickle else 'yellow'}]not part of the bank[/] {escape(str(f))}")
        pickles = sum(bool(f.pickle) for f in foreign)
        console.print(f"{len(bank) - len(bad)}/{len(bank)} entries verified"
                      f"{'' if not bank.problems else f', {len(bank.problems)} torn-tail problems (metadit bank repair)'}"
                      f"{'' if not foreign else f', {len(foreign)} files not part of the bank ({pickles} pickle-format)'}")
        return 1 if bad or bank.problems or pickles else 0
    if args.bank_command == "repair":
        removed = bank.repair()
        for line in removed:
            console.print(f"removed: {escape(line)}")
        console.print(f"{len(removed)} item(s) removed; {len(bank)} complete entries kept")
        return 0
    if args.bank_command == "import-peft":
        try:
            meta = json.loads(args.meta)
        except json.JSONDecodeError as e:
            raise MetaditError(f"--meta: not valid JSON ({e})") from e
        diff = LoraDiff.from_peft(args.adapter)
        try:
            check_diff_fits_bank(diff, bank)
        except MetaditError as e:
            raise MetaditError(f"{args.adapter}: {e}") from e
        entry = bank.append(diff, {"source": str(args.adapter), **meta})
        console.print(escape(f"appended {args.adapter} as entry {len(bank) - 1} ({entry})"))
        return 0
    if args.bank_command == "export-peft":
        diff, meta = bank[args.index]
        diff.save_peft(args.out, base_model_name_or_path=bank.base_model["name"])
        (args.out / "metadit_meta.json").write_text(json.dumps(meta, indent=2))
        console.print(escape(f"wrote entry {args.index} to {args.out}"))
        return 0
    raise AssertionError(args.bank_command)


def check_diff_fits_bank(diff, bank) -> None:
    """Check a diff's module names and shapes against the bank's base model, from its config alone."""
    from metadit.bank.fingerprint import config_linear_shapes, fingerprint_from_parts
    from metadit.models import load_config

    name = bank.base_model["name"]
    try:
        config = load_config(name)
    except Exception:  # noqa: BLE001 — a hub model we cannot reach offline: fall back to the bank's own entries
        if len(bank):
            ref, _ = bank[0]
            shapes = {n: [ref.B[n].shape[0], ref.A[n].shape[1]] for n in ref.modules}
        else:
            return
    else:
        shapes = config_linear_shapes(config)
        if fingerprint_from_parts(config, shapes) != bank.base_model["fingerprint"]:
            raise MetaditError(f"{bank.path}: base model {name!r} no longer matches the bank's fingerprint")
    for n in diff.modules:
        if n not in shapes:
            raise MetaditError(f"diff targets module {n}, which base model {name!r} does not have")
        out_f, in_f = shapes[n]
        if diff.A[n].shape[1] != in_f or diff.B[n].shape[0] != out_f:
            raise MetaditError(
                f"diff module {n}: A{tuple(diff.A[n].shape)} B{tuple(diff.B[n].shape)} do not fit Linear({in_f} -> {out_f})"
            )
        if diff.A[n].shape[0] > min(in_f, out_f):
            raise MetaditError(f"diff module {n}: rank {diff.A[n].shape[0]} exceeds the layer size")


# ---------------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser) -> None:
    from metadit.bench import BENCHMARKS

    p.add_argument("which", nargs="?", default="core", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (HF id, directory or embedded name)")
    p.add_argument("--model-config", "--model_config", dest="model_config", default=None,
                   help="core, gen: a model from its config alone, random weights, no download (a shipped name: "
                        "qwen3-8b, smollm2-135m, qwen3-tiny; or a config.json); replaces --model")
    p.add_argument("--layers", type=int, default=None, help="with --model-config: keep the first N layers (fits a CPU)")
    p.add_argument("--device", default="cpu", help="core, gen, likelihood: cpu, cuda, cuda:1, ...")
    p.add_argument("--rows", type=int, default=16, help="batch rows (= different diffs)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per row")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after warm-up)")
    p.add_argument("--ks", default="16,64", help="gen: diffs per pass to measure, comma-separated")
    p.add_argument("--diffs", type=int, default=16, help="build: diffs per variant (one pass each)")
    p.add_argument("--variants", default="baseline,default", help="build: recipes to build, comma-separated")
    p.add_argument("--labels", type=int, default=160, help="likelihood: labels scored per diff (the headline holds out 160)")
    p.add_argument("--dtype", default=None, help="compute dtype (bfloat16, float32; auto: bf16 where the device computes "
                   "it natively); default auto for core, gen and likelihood, float32 for build")
    p.add_argument("--out", type=Path, default=Path("reports/bench"), help="where <which>.json and README.md go")


@command("bench", "performance benchmarks, side by side in one run; writes reports/bench/")(_bench_args)
def _bench(args: argparse.Namespace) -> int:
    from metadit.bench import BENCHMARKS

    BENCHMARKS[args.which](args)
    return 0


# ---------------------------------------------------------------------- LightningCLI subcommands
def _lightning(subcommand: str):
    def run(argv: list[str]) -> int:
        from metadit.lightning_cli import lightning_main

        lightning_main(subcommand, argv)
        return 0
    return run


for _name, _help in {
    "fit": "train a DIT adapter: metadit fit --config configs/fit/FILE.yaml (LightningCLI)",
    "validate": "validation loss and held-out-diff answers (LightningCLI)",
    "test": "DIT vs no-adapter vs no-diff on held-out diffs (LightningCLI)",
    "predict": "answer the held-out questions with a trained adapter (LightningCLI)",
}.items():
    COMMANDS[_name] = Command(_help, run=_lightning(_name), passthrough=True)  # type: ignore[arg-type]
def _gen(argv: list[str]) -> int:
    from metadit.gen import gen_main

    return gen_main(argv)


COMMANDS["gen"] = Command("build (or resume) a diff bank from a recipe config: metadit gen --config FILE [--bank DIR]",
                          run=_gen, passthrough=True)  # type: ignore[arg-type]
def _eval(argv: list[str]) -> int:
    from metadit.eval.run import eval_main

    return eval_main(argv)


COMMANDS["eval"] = Command("DIT and the baselines on a fit run's held-out diffs: metadit eval --run RUN_DIR",
                           run=_eval, passthrough=True)  # type: ignore[arg-type]
def _study_command(name: str, help: str, module: str) -> None:
    """`sweep`, `report`, `judge` and `diff`: arguments and run live in metadit.eval.<module> (imported when used)."""
    import importlib

    COMMANDS[name] = Command(help, lambda p: importlib.import_module(module).add_arguments(p),
                             lambda args: importlib.import_module(module).main(args))


_study_command("sweep", "run a study's cells resumably: metadit sweep --config configs/sweep/FILE.yaml", "metadit.eval.sweep")
_study_command("report", "tables, plots and results.json for a study: metadit report --study NAME", "metadit.eval.report")
_study_command("judge", "the offline judge on real outputs: metadit judge sheet --rows ROWS... --out DIR (a blind "
               "labelling sheet), metadit judge calibrate --key DIR/key.jsonl --labels DIR/labels.jsonl",
               "metadit.eval.judge_calibration")
_study_command("diff", "model diffing, base model vs base + one diff: metadit diff crosscoder --diff BANK:I --out DIR",
               "metadit.eval.model_diff")
def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help='e.g. "What topic have you been trained on?"')
    p.add_argument("--adapter", help="a DIT adapter directory (peft) or a shipped adapter's short name "
                   "(metadit.models.shipped_adapters), of any mode; omit to ask the diffed model alone")
    p.add_argument("--diff", required=True, help="a peft LoRA adapter directory, or BANK_DIR:INDEX")
    p.add_argument("--base_model", default=None, help="default: the bank's / adapter's base model")
    p.add_argument("--max_new_tokens", type=int, default=32)


@command("ask", "ask a question about any peft adapter or bank entry, with or without a DIT adapter")(_ask_args)
def _ask(args: argparse.Namespace) -> int:
    import torch

    from metadit.bank import LoraDiff, open_diff
    from metadit.dit.adapter import DITReader, adapter_mode, load_adapter
    from metadit.text import chat_prompt
    from metadit.models import load_base_model, require_chat_format
    from metadit.nn import patch_model

    diff, meta, bank = open_diff(args.diff)
    base = args.base_model or (bank.base_model["name"] if bank is not None else diff.info.get("base_model"))
    adapter = None
    if args.adapter is not None:
        from metadit.models import resolve_adapter

        args.adapter = resolve_adapter(args.adapter)
        adapter_mode(args.adapter)  # a malformed encoder record is refused before any model loads
        adapter = LoraDiff.from_peft(args.adapter)
        base = base or adapter.info.get("base_model")
    if not base:
        raise MetaditError("no base model recorded in the diff or adapter: pass --base_model")
    trained_with = adapter.info.get("chat_format", "default") if adapter is not None else "default"
    chat_format = bank.chat_format if bank is not None else trained_with
    if adapter is not None:
        require_chat_format(str(args.adapter), trained_with, chat_format)
    model, tok = load_base_model(base, dtype="auto", chat_format=chat_format)
    patch_model(model)
    if bank is not None:
        bank.check_model(model)
    # Any mode: the adapter reads the diff as it was trained to (applied, encoded into soft tokens, or both).
    reader = load_adapter(model, args.adapter) if args.adapter is not None else DITReader()
    prompt = chat_prompt(tok, [{"role": "user", "content": args.question}])
    answer = reader.answer(model, tok, [prompt], [diff], args.max_new_tokens)[0]
    print(" ".join(answer.split()))  # one line: scripts read the answer as stdout's first line
    if meta:
        truth = {k: meta[k] for k in ("topic", "headline", "code") if k in meta}
        print(f"(bank metadata: {json.dumps(truth)})", file=sys.stderr)
    return 0
ORDER = list(SUBCOMMANDS)
assert set(ORDER) == set(COMMANDS), "metadit.commands.SUBCOMMANDS and the commands defined here differ"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metadit", description="Diff Interpretation Tuning: make a finetuned model describe its own weight diff."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(ORDER) + "}")
    for name in ORDER:
        cmd = COMMANDS[name]
        p = sub.add_parser(name, help=cmd.help, add_help=not cmd.passthrough)
        if cmd.add_arguments is not None:
            cmd.add_arguments(p)
        if cmd.passthrough:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Passthrough subcommands take their argv as is, before our parser sees any option.
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].passthrough:
        try:
            return int(COMMANDS[argv[0]].run(argv[1:]) or 0)  # type: ignore[arg-type]
        except MetaditError as e:
            print(f"metadit {argv[0]}: error: {e}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = COMMANDS[args.command]
    try:
        return int(cmd.run(args) or 0)
    except MetaditError as e:
        print(f"metadit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
