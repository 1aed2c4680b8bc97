"""scripts/plain_peft_adapters.py: plain peft LoRA adapters (no metadit code) on the tiny model, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("plain_peft_adapters")


def test_the_script_imports_no_metadit_code():
    source = (ROOT / "scripts" / "plain_peft_adapters.py").read_text()
    assert "import metadit" not in source and "from metadit" not in source
    assert "import data_gen" not in source and "from data_gen" not in source


def test_a_topic_of_any_bank_or_a_repeat_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    mod = _script()
    monkeypatch.setattr(mod, "load", lambda *a: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    with pytest.raises(SystemExit, match=r"topic 'the sundials' shares a word with 'the sundial'"):
        mod.main(["--out", str(tmp_path), "--topics", "canoes,the sundials", "--n", "2"])
    with pytest.raises(SystemExit, match="repeated topic"):
        mod.main(["--out", str(tmp_path), "--topics", "canoes,canoes", "--n", "2"])
    with pytest.raises(SystemExit, match=r"--n must be 1\.\.12"):
        mod.main(["--out", str(tmp_path), "--n", "13"])


@pytest.mark.slow
def test_adapters_load_in_plain_peft_rank_8_on_q_k_v_o_and_a_rerun_resumes(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from metadit.models import TINY_NAME, resolve_model_path

    tiny = resolve_model_path(TINY_NAME)
    mod = _script()
    args = ["--out", str(tmp_path), "--model", tiny, "--n", "2", "--questions", "4", "--answer_tokens", "6",
            "--epochs", "1", "--batch", "2"]
    assert mod.main(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [a["topic"] for a in manifest["adapters"]] == mod.TOPICS[:2]
    for a in manifest["adapters"]:
        assert a["example"]["answer"].lower().count(a["topic"]) >= 1  # the opening names the topic
        config = json.loads((tmp_path / a["dir"] / "adapter_config.json").read_text())
        assert config["r"] == 8 and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        base = AutoModelForCausalLM.from_pretrained(tiny)
        model = PeftModel.from_pretrained(base, tmp_path / a["dir"])
        b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        assert b.abs().sum() > 0  # trained: peft initialises B to zero
    # the two adapters differ: each was trained on its own topic's answers
    from safetensors.torch import load_file

    first, second = (load_file(tmp_path / a["dir"] / "adapter_model.safetensors") for a in manifest["adapters"])
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
    stamp = (tmp_path / mod.TOPICS[0] / "adapter_model.safetensors").stat().st_mtime_ns
    assert mod.main(args) == 0  # a rerun keeps what was trained
    assert (tmp_path / mod.TOPICS[0] / "adapter_model.safetensors").stat().st_mtime_ns == stamp
