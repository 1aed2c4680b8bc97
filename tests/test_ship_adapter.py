"""scripts/ship_adapter.py: the run with the lowest validation loss becomes a shipped adapter, in bf16, with its split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metadit.models import TINY_NAME, load_base_model, resolve_adapter
from tests import load_script

ship_adapter = load_script("ship_adapter")


SPLIT = {"train": ["a"], "val": ["b"], "test": ["c"]}


def _run(root: Path, name: str, val_loss: float | None, seed: int, split: str | None = "adapter",
         test: list[str] | None = None) -> Path:
    """A fit run as `metadit fit` leaves it, as far as shipping reads it: a peft LoRA of the tiny model (random
    nonzero factors) in RUN/adapter/ with metadit.json, metadit_best.json and split.json; RUN/config.yaml."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_base_model(TINY_NAME, dtype="float32")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.data.normal_()
    run = root / name
    peft_model.save_pretrained(run / "adapter")
    (run / "adapter" / "metadit.json").write_text(json.dumps({"chat_format": "no_system"}))
    (run / "adapter" / "metadit_best.json").write_text(json.dumps({"checkpoint": None, "best_val_loss": val_loss}))
    if split is not None:  # the adapter's copy, or only the run's own (runs exported before the copy)
        where = run / "adapter" if split == "adapter" else run
        where.joinpath("split.json").write_text(json.dumps({**SPLIT, "test": test or SPLIT["test"]}))
    (run / "config.yaml").write_text(f"seed_everything: {seed}\nckpt_path: {run}/checkpoints/last.ckpt\n")
    return run


def test_the_lowest_validation_loss_ships_in_bf16_with_its_split_and_loads_everywhere(tmp_path):
    from peft import PeftModel

    a, b, c = (_run(tmp_path / "runs", n, loss, seed) for n, loss, seed in (("a", 2.0, 0), ("b", 1.5, 1), ("c", 1.7, 2)))
    dest = tmp_path / "adapters"
    out = ship_adapter.ship([a, b, c], "mine", dest=dest, evaluation="reports/data-scaling")
    assert out == dest / "mine" and resolve_adapter("mine", root=dest) == out
    assert not list(dest.glob(".*"))  # no temporary directory left
    for f in ("adapter_config.json", "metadit.json", "metadit_best.json", "split.json"):
        assert (out / f).read_bytes() == (b / "adapter" / f).read_bytes(), f
    fit_config = yaml.safe_load((out / "fit_config.yaml").read_text())
    assert fit_config == {"seed_everything": 1}  # the training machine's checkpoint path dropped
    original = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    shipped = load_file(str(out / "adapter_model.safetensors"))
    assert shipped.keys() == original.keys()
    assert all(shipped[k].dtype == torch.bfloat16 and torch.equal(shipped[k], original[k].to(torch.bfloat16))
               for k in original)
    trained = (out / "TRAINED.md").read_text()
    assert f"| {b} (shipped) | 1.5000 |" in trained and f"| {a} | 2.0000 |" in trained
    assert "Evaluation: reports/data-scaling" in trained

    model, _ = load_base_model(TINY_NAME, dtype="float32")
    loaded = PeftModel.from_pretrained(model, str(out))  # plain peft reads it
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(state) == len(original)
    for k, v in original.items():  # peft's saved names lack the adapter name its modules carry
        (match,) = [w for n, w in state.items() if n.replace(".default", "") == k]
        assert torch.equal(match, v.to(torch.bfloat16).float())


def test_shipping_refuses_what_could_not_be_evaluated_or_would_overwrite(tmp_path, capsys):
    good = _run(tmp_path / "runs", "good", 1.0, 0)
    no_split = _run(tmp_path / "runs", "nosplit", 0.5, 1, split=None)
    no_val = _run(tmp_path / "runs", "noval", None, 2)
    other_split = _run(tmp_path / "runs", "other", 0.5, 3, test=["d"])
    dest = tmp_path / "adapters"
    with pytest.raises(ship_adapter.ShipError, match="no split.json"):
        ship_adapter.ship([good, no_split], "x", dest=dest)
    with pytest.raises(ship_adapter.ShipError, match="different splits"):
        ship_adapter.ship([good, other_split], "x", dest=dest)
    with pytest.raises(ship_adapter.ShipError, match="no validation loss"):
        ship_adapter.ship([no_val], "x", dest=dest)
    with pytest.raises(ship_adapter.ShipError, match="not a finished"):
        ship_adapter.ship([tmp_path / "nowhere"], "x", dest=dest)
    assert not dest.exists() or not any(dest.iterdir())
    ship_adapter.ship([good], "x", dest=dest)
    assert ship_adapter.main(["--runs", str(good), "--name", "x", "--dest", str(dest)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {dest / 'x'} exists (--force replaces it)"
    assert ship_adapter.main(["--runs", str(good), "--name", "x", "--dest", str(dest), "--force"]) == 0
    assert "shipped" in capsys.readouterr().out


def test_metadit_reads_a_shipped_bf16_adapter_into_a_model_of_either_dtype(tmp_path):
    from metadit.dit.adapter import load_adapter
    from metadit.nn import patch_model

    out = ship_adapter.ship([_run(tmp_path / "runs", "a", 1.0, 0)], "m", dest=tmp_path / "adapters")
    for dtype in ("float32", "bfloat16"):
        model, _ = load_base_model(TINY_NAME, dtype=dtype)
        patch_model(model)
        assert load_adapter(model, out, chat_format="no_system").mode == "dit"
        with pytest.raises(Exception, match="chat format"):
            load_adapter(model, out, chat_format="default")


def test_a_run_exported_before_the_adapter_carried_its_split_ships_with_the_runs_own(tmp_path):
    old = _run(tmp_path / "runs", "old", 1.0, 0, split="run")
    out = ship_adapter.ship([old], "m", dest=tmp_path / "adapters")
    assert (out / "split.json").read_bytes() == (old / "split.json").read_bytes()
