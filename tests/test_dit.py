"""DIT training through the CLI on the tiny random model: every mode and task, configs, saved adapters, encoder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from metadit.bank import DiffBank, LoraDiff
from metadit.cli import main
from metadit.lightning_cli import DITCLI, lightning_main
from metadit.dit.data import DiffQADataModule
from metadit.dit import DITModule
from metadit.models import TINY_NAME, load_base_model, resolve_dtype
from metadit.nn import DiffEncoder
from tests.conftest import random_diff, target_shapes

ROOT = Path(__file__).resolve().parents[1]
FIT = ROOT / "configs" / "fit" / "tiny_topic.yaml"


@pytest.fixture(scope="module")
def banks(tmp_path_factory, tiny_topic_bank):
    d = tmp_path_factory.mktemp("banks")
    (d / "topic").symlink_to(tiny_topic_bank, target_is_directory=True)  # the session's bank, read only
    assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_news.yaml"), "--bank", str(d / "news"),
                 "--n_diffs", "6", "--progress", "false"]) == 0
    return d


def _fit(banks_list, tmp_path, *extra):
    return lightning_main("fit", ["--config", str(FIT), "--data.banks", str(banks_list).replace("'", '"'),
                                  "--trainer.default_root_dir", str(tmp_path), *extra])


@pytest.mark.parametrize("mode", ["dit", "encoder", "dit+encoder"])
@pytest.mark.parametrize("task", ["topic", "trigger", "headline"])
def test_fit_fast_dev_run_every_mode_and_task(banks, tmp_path, mode, task):
    bank = banks / ("news" if task == "headline" else "topic")
    val = "1" if task == "headline" else "2"
    cli = _fit([str(bank)], tmp_path, "--trainer.fast_dev_run", "1", "--model.mode", mode,
               "--data.tasks", f"[{task}]", "--data.val_labels", val, "--data.test_labels", "0")
    module = cli.model
    assert cli.trainer.state.finished
    assert torch.isfinite(torch.tensor(cli.trainer.callback_metrics["train/loss"].item()))
    # one optimizer step moved the trainable parts (the adapter's B starts at zero)
    adapter_moved = any(l.adapter_B.abs().max() > 0 for l in module.model.modules() if hasattr(l, "adapter_B")
                        and l.adapter_B is not None)
    assert adapter_moved
    if "encoder" in mode:  # the encoder trained too: its output projection left its zero-mean init
        assert module.encoder is not None and module.encoder.out.bias.abs().max() > 0
    else:
        assert module.encoder is None


def test_every_shipped_fit_config_parses():
    class ParseOnly(DITCLI):
        def instantiate_classes(self) -> None:  # parse and type-check only: the smol banks need not exist here
            pass

    configs = sorted((ROOT / "configs" / "fit").glob("*.yaml"))
    assert {"tiny_topic", "smol_topic", "smol_news", "smol_multitask"} <= {c.stem for c in configs}
    for c in configs:
        cli = ParseOnly(DITModule, DiffQADataModule, args=["--config", str(c)], run=False)
        assert cli.config["data"]["banks"] and cli.config["model"]["base_model"] == cli.config["data"]["base_model"]


def test_missing_bank_is_reported_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import metadit.models as models

    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("model loaded before the bank check"))
    with pytest.raises(Exception) as e:
        _fit([str(tmp_path / "nope")], tmp_path, "--trainer.fast_dev_run", "1")
    assert "no diff bank here" in str(e.value) or "no diff bank here" in capsys.readouterr().err


def test_saved_adapter_with_peft_matches_the_module(banks, tmp_path):
    cli = _fit([str(banks / "topic")], tmp_path, "--trainer.max_epochs", "2", "--model.lr", "0.02")
    adapter_dir = Path(cli.trainer.log_dir) / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file() and (Path(cli.trainer.log_dir) / "split.json").is_file()
    module = cli.model
    module.model.float()
    # the module holds the base weights as loaded in its dtype: the reference starts from the same weights
    loaded = resolve_dtype(module.hparams.dtype)
    base, tok = load_base_model(TINY_NAME, dtype=loaded)
    base.float()
    diff, _ = DiffBank.open(banks / "topic")[0]
    # reference: the diff merged into the weights, then the saved adapter loaded by peft on top
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for n in diff.modules:
            merged.get_submodule(n).weight += diff.delta(n)
    peft_model = PeftModel.from_pretrained(merged, adapter_dir).eval()
    assert any(LoraDiff.from_peft(adapter_dir).B[n].abs().max() > 0 for n in diff.modules)
    prompt = module.tok.apply_chat_template([{"role": "user", "content": "What topic have you been trained on?"}],
                                            add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), module._diff_context([diff]):
        got = module.model(ids).logits
    with torch.no_grad():
        want = peft_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and greedy answers with no diff: the module's `answer` equals peft's generate token for token
    plain = PeftModel.from_pretrained(load_base_model(TINY_NAME, dtype=loaded)[0].float(), adapter_dir).eval()
    out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    assert module.answer([prompt], [None]) == [tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()]


def test_diff_encoder_is_invariant_to_factor_symmetry():
    torch.manual_seed(0)
    shapes = {f"model.layers.{i}.self_attn.{m}": (32, 24 if m == "k_proj" else 32) for i in range(2) for m in ("q_proj", "k_proj")}
    diff = random_diff(shapes, 3, 1, scale=0.7)
    enc = DiffEncoder(width=32, proj_dim=8, max_rank=4, soft_tokens=2)
    enc.configure(hidden_size=16)
    enc.eval()
    G = torch.randn(3, 3) + 3 * torch.eye(3)
    moved = LoraDiff({n: torch.linalg.solve(G, diff.A[n]) for n in diff.modules},
                     {n: diff.B[n] @ G for n in diff.modules}, dict(diff.scale))
    for n in diff.modules:  # same ΔW, different factors
        torch.testing.assert_close(moved.delta(n), diff.delta(n), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(moved.A[n], diff.A[n])
    with torch.no_grad():
        a, b = enc([diff]), enc([moved])
        other = enc([random_diff(shapes, 3, 2)])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (a - other).abs().max() > 1e-3
    assert a.shape == (1, 2, 16)


def _csv_losses(run_dir: Path) -> list[float]:
    import csv

    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(banks, tmp_path):
    import subprocess
    import sys

    common = ["--config", str(FIT), "--data.banks", f'["{banks / "topic"}"]', "--data.val_labels", "1",
              "--data.test_labels", "0", "--data.shuffle", "false", "--data.questions_per_diff", "4",
              "--model.dtype", "float32", "--model.lr", "0.02", "--trainer.precision", "32",
              "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
              "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
              "--trainer.enable_progress_bar", "false"]
    runs = {"one": ["--data.batch_size", "8", "--trainer.devices", "1"],
            "two": ["--data.batch_size", "4", "--trainer.devices", "2", "--trainer.strategy", "ddp"]}
    losses = {}
    for name, extra in runs.items():
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "metadit.cli", "fit", *common, *extra,
                               "--trainer.default_root_dir", str(out)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = _csv_losses(out)
    assert len(losses["one"]) == 4 and len(losses["two"]) == 4
    assert losses["one"][0] != losses["one"][-1]  # the loss moved: the curves are not two flat lines
    for a, b in zip(losses["one"], losses["two"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (losses["one"], losses["two"])


@pytest.mark.slow
def test_killed_fit_resumes_to_the_same_final_metrics(banks, tmp_path):
    """SIGKILL a training run after its first checkpoint, resume with --ckpt_path last: same final losses."""
    import signal
    import subprocess
    import sys
    import time

    def cmd(root: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "metadit.cli", "fit", "--config", str(FIT), "--data.banks",
                f'["{banks / "topic"}"]', "--trainer.max_epochs", "5", "--model.lr", "0.01", "--model.generate_in_validation", "false",
                "--data.batch_size", "2", "--data.questions_per_diff", "5",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), *extra]

    whole = subprocess.run(cmd(tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = subprocess.Popen(cmd(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    last = None
    while time.time() < deadline and killed.poll() is None:
        found = list((tmp_path / "killed").rglob("last*.ckpt"))
        if found and "epoch=" not in found[0].name:
            import torch as _t

            try:
                if _t.load(found[0], map_location="cpu", weights_only=True)["epoch"] >= 1:
                    last = found[0]
                    break
            except Exception:  # noqa: BLE001 — caught mid-write; look again
                pass
        time.sleep(0.2)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert last is not None
    resumed = subprocess.run(cmd(tmp_path / "killed", "--ckpt_path", str(last)), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def final(root: Path) -> dict[str, float]:
        import csv

        rows = []
        for f in sorted(root.rglob("metrics.csv")):
            rows += list(csv.DictReader(open(f)))
        val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
        return {"val": val[-1], "epochs": len(val)}

    a, b = final(tmp_path / "whole"), final(tmp_path / "killed")
    assert abs(a["val"] - b["val"]) <= 1e-3 * max(1.0, abs(a["val"])), (a, b)


def test_bank_for_another_model_is_reported_before_any_model_loads(banks, tmp_path, monkeypatch):
    from tests.conftest import tiny_llama
    import metadit.models as models
    from metadit.errors import MetaditError

    other = tmp_path / "other-model"
    tiny_llama().save_pretrained(other)
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("model loaded before the bank check"))
    with pytest.raises(MetaditError, match="bank was made for base model 'tiny-random-smollm2'"):
        DiffQADataModule([str(banks / "topic")], base_model=str(other))


@pytest.mark.parametrize("bad", [["--model.adapter_rnak", "4"], ["--model.adapter_rank", "four"],
                                 ["--data.tasks", "[nosuchtask]"]])
def test_config_errors_are_rejected(banks, tmp_path, bad):
    from metadit.errors import MetaditError

    with pytest.raises((SystemExit, MetaditError)) as e:
        _fit([str(banks / "topic")], tmp_path, "--trainer.fast_dev_run", "1", *bad)
    assert not isinstance(e.value, SystemExit) or e.value.code != 0


def test_fit_from_a_command_line_does_not_warn_about_its_own_argv(banks, tmp_path, monkeypatch, recwarn):
    """`metadit fit ...` passes its argv on as LightningCLI's `args` while sys.argv is set too: no warning for that."""
    monkeypatch.setattr("sys.argv", ["metadit", "fit", "--config", str(FIT)])
    _fit([str(banks / "topic")], tmp_path, "--trainer.fast_dev_run", "1", "--data.test_labels", "0")
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_optimizer_and_scheduler_come_from_the_config(banks, tmp_path):
    cli = _fit([str(banks / "topic")], tmp_path, "--trainer.fast_dev_run", "1",
               "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.05",
               "--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.step_size", "3")
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    (sched,) = cli.trainer.lr_scheduler_configs
    assert isinstance(sched.scheduler, torch.optim.lr_scheduler.StepLR) and sched.scheduler.step_size == 3
    # the chat format the banks were made with reaches the module without being set
    assert cli.model.hparams.chat_format == "default"


def test_a_bank_in_another_chat_format_sets_the_modules(tmp_path, tiny_topic_bank):
    from metadit.lightning_cli import data_chat_format

    assert data_chat_format([str(tiny_topic_bank)]) == "default"
    assert data_chat_format([str(tmp_path / "missing")]) == "default"
