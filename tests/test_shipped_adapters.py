"""Shipped DIT adapters by short name (`--adapter NAME`): resolution, errors, and `metadit ask` through a name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metadit import models
from metadit.cli import main
from metadit.errors import MetaditError


@pytest.fixture
def shipped_root(tmp_path, tiny_topic_bank, monkeypatch):
    """A package-data folder holding one adapter, `tiny-topic` (bank entry 0 exported as a peft directory)."""
    root = tmp_path / "adapters"
    assert main(["bank", "export-peft", str(tiny_topic_bank), "0", str(root / "tiny-topic")]) == 0
    (root / "not-an-adapter").mkdir()  # a stray folder is not listed
    monkeypatch.setattr(models, "SHIPPED_ADAPTERS_DIR", root)
    return root


def test_shipped_adapters_lists_only_peft_directories(shipped_root):
    assert models.shipped_adapters() == {"tiny-topic": shipped_root / "tiny-topic"}
    assert models.resolve_adapter("tiny-topic") == shipped_root / "tiny-topic"


def test_a_path_wins_over_a_name_and_must_be_an_adapter(shipped_root, tmp_path):
    assert models.resolve_adapter(shipped_root / "tiny-topic") == shipped_root / "tiny-topic"
    with pytest.raises(MetaditError, match="not a peft adapter directory"):
        models.resolve_adapter(shipped_root / "not-an-adapter")


def test_unknown_name_lists_the_shipped_ones(shipped_root):
    with pytest.raises(MetaditError, match=r"no shipped adapter of that name \(shipped: tiny-topic\)"):
        models.resolve_adapter("smollm2-nope")


def test_no_shipped_folder_means_none(tmp_path):
    assert models.shipped_adapters(tmp_path / "missing") == {}
    with pytest.raises(MetaditError, match="none installed"):
        models.resolve_adapter("x", root=tmp_path / "missing")


def test_ask_takes_the_short_name_and_prints_the_answer_first(shipped_root, tiny_topic_bank, capsys):
    argv = ["ask", "What topic have you been trained on?", "--diff", f"{tiny_topic_bank}:1", "--max_new_tokens", "6"]
    assert main([*argv, "--adapter", str(shipped_root / "tiny-topic")]) == 0
    by_path = capsys.readouterr()
    assert main([*argv, "--adapter", "tiny-topic"]) == 0
    by_name = capsys.readouterr()
    assert by_name.out == by_path.out
    assert len(by_name.out.splitlines()) == 1  # the answer alone on stdout; the bank's metadata goes to stderr
    assert json.loads(by_name.err.split("bank metadata: ", 1)[1].rstrip(")\n"))["topic"]
