"""Make a fit run's DIT adapter a shipped one, `metadit/adapters/NAME/` (issue "Gated diffs at 3x the rate", item 6).

Of the fit runs given (the data-scaling replicates at its largest size, say), the one whose best validation loss
(`RUN/adapter/metadit_best.json`, written by `AdapterExport`) is lowest is shipped: validation chooses, never the
held-out test. Its adapter directory is copied with every floating tensor of its safetensors files cast to bf16
(~10 MB for SmolLM2 at rank 16), beside:

- `split.json`: the split it trained on (`metadit eval` refuses an adapter without it: the adapter could have
  trained on the diffs it is asked about), `metadit.json` (chat format), `metadit_best.json`;
- `fit_config.yaml`: the run's resolved config (LightningCLI's `config.yaml`): `metadit fit --config` it to train
  it again;
- `TRAINED.md`: where it came from — every candidate run with its validation loss, the one chosen, the command,
  the weights' sha256 and the evaluation given with `--evaluation` (a committed report).

`metadit ask --adapter NAME` and `metadit eval --adapter NAME` then find it (`metadit.models.shipped_adapters`), and
it is package data (pyproject's `adapters/*/*`). Written to a temporary directory and renamed: a failure leaves no
half-shipped adapter.

    .venv/bin/python scripts/ship_adapter.py --runs RUN [RUN ...] --name smollm2-topic \\
        --evaluation reports/data-scaling [--dest metadit/adapters] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "metadit" / "adapters"
COPIED = ("adapter_config.json", "metadit.json", "metadit_best.json", "diff_encoder.json")  # and the split


class ShipError(Exception):
    """A bad input, said in one line."""


def validation_loss(run: Path) -> float:
    """The run's best validation loss, from its exported adapter."""
    record = run / "adapter" / "metadit_best.json"
    if not record.is_file():
        raise ShipError(f"{run}: no adapter/metadit_best.json (not a finished `metadit fit` run)")
    loss = json.loads(record.read_text()).get("best_val_loss")
    if loss is None:
        raise ShipError(f"{run}: no validation loss recorded (a fit without a validation split cannot be chosen)")
    return float(loss)


def split_file(run: Path) -> Path:
    """The split the run trained on: its adapter's copy, else (runs exported before the copy) the run's own."""
    for path in (run / "adapter" / "split.json", run / "split.json"):
        if path.is_file():
            return path
    raise ShipError(f"{run}: no split.json (metadit eval refuses a shipped adapter without its split)")


def held_out(run: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    split = json.loads(split_file(run).read_text())
    return tuple(sorted(split.get("val", []))), tuple(sorted(split.get("test", [])))


def to_bf16(src: Path, dst: Path) -> None:
    """A safetensors file again with its floating tensors in bf16 (metadata kept)."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              str(dst), metadata=metadata)


def ship(runs: list[Path], name: str, dest: Path = DEST, evaluation: str | None = None, force: bool = False) -> Path:
    """Ship the adapter of the run with the lowest validation loss as `dest/name`; returns that directory."""
    if not runs:
        raise ShipError("give at least one run (--runs)")
    if not name or "/" in name or name.startswith("."):
        raise ShipError(f"--name {name!r}: a short name such as smollm2-topic")
    losses = {run: validation_loss(run) for run in runs}
    splits = {run: held_out(run) for run in runs}
    if len(set(splits.values())) > 1:  # validation losses on other diffs do not compare
        raise ShipError("the runs were validated on different splits (val/test labels differ): give runs of one split")
    chosen = min(runs, key=lambda r: losses[r])
    out = dest / name
    if out.exists() and not force:
        raise ShipError(f"{out} exists (--force replaces it)")
    adapter = chosen / "adapter"
    weights = sorted(adapter.glob("*.safetensors"))
    if not weights:
        raise ShipError(f"{adapter}: no safetensors weights")
    tmp = dest / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, name, runs, losses, chosen, weights, evaluation)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(tmp: Path, name: str, runs: list[Path], losses: dict[Path, float], chosen: Path, weights: list[Path],
           evaluation: str | None) -> None:
    adapter = chosen / "adapter"
    for f in COPIED:
        if (adapter / f).is_file():
            shutil.copyfile(adapter / f, tmp / f)
    shutil.copyfile(split_file(chosen), tmp / "split.json")
    for w in weights:
        to_bf16(w, tmp / w.name)
    config = chosen / "config.yaml"
    if config.is_file():
        resolved = yaml.safe_load(config.read_text()) or {}
        resolved.pop("ckpt_path", None)  # a resumed run's checkpoint on the machine that trained it
        (tmp / "fit_config.yaml").write_text("# The fit run's resolved config (LightningCLI's config.yaml), ckpt_path "
                                             "dropped; its paths are the training machine's.\n"
                                             + yaml.safe_dump(resolved, sort_keys=False))
    lines = [f"# {name}", "", f"A DIT adapter shipped by `scripts/ship_adapter.py` from the fit run `{chosen}`: of "
             f"the {len(runs)} run(s) below (one split), the one with the lowest validation loss (validation chose; the "
             "held-out test never did). Weights cast to bf16. Paths are the training machine's.", "",
             "| run | best validation loss |", "|---|---:|",
             *(f"| {r}{' (shipped)' if r == chosen else ''} | {losses[r]:.4f} |" for r in runs), "",
             "Trained by `metadit fit --config fit_config.yaml` (the run's resolved config, beside this file; the banks "
             "it names must be there)." if config.is_file()
             else "The run had no config.yaml: its training command is not recorded here.", "",
             "Weights (sha256): " + ", ".join(f"`{w.name}` {hashlib.sha256((tmp / w.name).read_bytes()).hexdigest()}"
                                              for w in weights), ""]
    if evaluation:
        lines += [f"Evaluation: {evaluation} (of the run's own weights; these are the same weights rounded to bf16).", ""]
    (tmp / "TRAINED.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="fit run directories (RUN/adapter/ inside)")
    p.add_argument("--name", required=True, help="the short name (`--adapter NAME`), e.g. smollm2-topic")
    p.add_argument("--dest", type=Path, default=DEST, help="where shipped adapters live (default metadit/adapters)")
    p.add_argument("--evaluation", help="where its evaluation is (a committed report), written into TRAINED.md")
    p.add_argument("--force", action="store_true", help="replace an adapter of that name")
    args = p.parse_args(argv)
    try:
        out = ship(args.runs, args.name, args.dest, args.evaluation, args.force)
    except ShipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"shipped {out} ({size / 1e6:.1f} MB): metadit ask --adapter {args.name} --diff BANK:INDEX \"...\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
