"""Issue 6: crash-safe banks (a crash at every point of an append, then `metadit bank repair`) and hostile
inputs (pickles, misfit shapes, NaN, wrong base model, truncated or bit-flipped files): one clear line, exit
non-zero, nothing written. `tests/test_fuzz.py` fuzzes the same readers with hypothesis."""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import metadit.bank.diff_bank as diff_bank_module
from metadit.bank import DiffBank, LoraDiff, model_identity
from metadit.cli import main
from metadit.errors import BaseModelMismatchError, MetaditError
from metadit.nn import patch_model, use_diffs
from tests.conftest import random_diff, target_shapes, tiny_llama, tiny_qwen3

SHAPES = target_shapes(tiny_llama())  # {name: (in, out)}: q 32->32, k/v 32->16, gate/up 32->48, down 48->32
IDENTITY = model_identity(tiny_llama())
K_PROJ = "model.layers.0.self_attn.k_proj"


# ---------------------------------------------------------------------- helpers (also used by test_fuzz.py)
class SimulatedCrash(BaseException):
    """The process dies here. A BaseException, so no `except Exception` in metadit can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging the test run) if the block takes longer than `seconds`."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"hang: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and directory (None) under root: 'nothing written' means an equal snapshot."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def build_bank(path: Path, groups=((0, 1), (2,)), ranks=(1, 2, 1, 2, 1), writer: str = "main") -> dict[int, LoraDiff]:
    """A bank with one shard per group; entry k is `random_diff(rank ranks[k], seed k)` with meta {"k": k}."""
    diffs = {k: random_diff(SHAPES, ranks[k % len(ranks)], k) for g in groups for k in g}
    bank = DiffBank.create(path, base_model=IDENTITY, info={"recipe": "reliability"}, exist_ok=True, writer=writer)
    for g in groups:
        bank.append_many([diffs[k] for k in g], [{"k": k} for k in g])
    return diffs


def assert_same_diff(a: LoraDiff, b: LoraDiff) -> None:
    assert a.modules == b.modules
    for n in a.modules:
        assert torch.equal(a.A[n], b.A[n]) and torch.equal(a.B[n], b.B[n]) and a.scale[n] == pytest.approx(b.scale[n])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one error line, got:\n{err}"
    return lines[0]


def safetensors_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def tensor_span(path: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of one tensor's data in a safetensors file."""
    n, header = safetensors_header(path)
    start, end = header[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def xor_byte(path: Path, pos: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at 80 columns otherwise, splitting paths in the output


# ====================================================================== 1. crash-safe bank
def _crash_in_save_file(monkeypatch):
    real = diff_bank_module.save_file

    def save_half_then_die(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        os.truncate(filename, size // 2)
        raise SimulatedCrash("killed while writing the shard")

    monkeypatch.setattr(diff_bank_module, "save_file", save_half_then_die)


def _crash_before_rename(monkeypatch):
    real = os.replace

    def die(src, dst, *a, **k):
        if ".tmp-" in str(src):
            raise SimulatedCrash("killed after the temp shard was written and fsynced, before the rename")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", die)


class _TornWriter:
    """Stands in for the index file handle: writes the first `keep` bytes of the payload, then the process dies."""

    def __init__(self, real, keep):
        self.real, self.keep = real, keep

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()
        return False

    def write(self, data: bytes) -> int:
        n = self.keep(data)
        self.real.write(data[:n])
        self.real.flush()
        raise SimulatedCrash(f"killed after writing {n} of {len(data)} index bytes")


def _crash_in_index_write(monkeypatch, keep=None):
    """keep=None: die before the index file is even opened; else keep(payload) -> bytes that reach the disk."""

    def fake_open(file, mode="r", *a, **k):
        if str(file).endswith(".jsonl") and "a" in mode:
            if keep is None:
                raise SimulatedCrash("killed after the shard rename, before the index write")
            return _TornWriter(builtins.open(file, mode, *a, **k), keep)
        return builtins.open(file, mode, *a, **k)

    monkeypatch.setattr(diff_bank_module, "open", fake_open, raising=False)


def _first_lines(k):
    return lambda data: sum(len(line) for line in data.splitlines(keepends=True)[:k])


def _crash_before_index_fsync(monkeypatch):
    real = os.fsync

    def die(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            raise SimulatedCrash("killed after the index write, before its fsync")
        return real(fd)

    monkeypatch.setattr(os, "fsync", die)


NEW_SHARD = "shards/main-000002.safetensors"
TMP_SHARD = r"shards/\.tmp-main-000002\.safetensors"
ORPHAN = (rf"{NEW_SHARD}: shard with no index rows", rf"{NEW_SHARD}: removed \(shard with no index rows\)")
CRASH_POINTS = {
    # point: (how to crash, problems open() must report, lines `bank repair` must print)
    "during-shard-write": (_crash_in_save_file, [rf"{TMP_SHARD}: temporary file of an interrupted write"],
                           [rf"{TMP_SHARD}: removed \(temporary file of an interrupted write\)"]),
    "before-rename": (_crash_before_rename, [rf"{TMP_SHARD}: temporary file of an interrupted write"],
                      [rf"{TMP_SHARD}: removed \(temporary file of an interrupted write\)"]),
    "after-rename-before-index": (lambda mp: _crash_in_index_write(mp), [ORPHAN[0]], [ORPHAN[1]]),
    "mid-index-line": (
        lambda mp: _crash_in_index_write(mp, keep=lambda data: len(data.splitlines()[0]) // 2),
        [r"index/main\.jsonl: unterminated last line \(\d+ bytes\)", ORPHAN[0]],
        [r"index/main\.jsonl: truncated \d+ bytes of torn index tail \(unterminated last line", ORPHAN[1]],
    ),
    "after-1-of-3-rows": (
        lambda mp: _crash_in_index_write(mp, keep=_first_lines(1)),
        [rf"index/main\.jsonl: incomplete row group for {NEW_SHARD} \(1 of 3 rows\)", ORPHAN[0]],
        [r"index/main\.jsonl: truncated \d+ bytes of torn index tail \(incomplete row group", ORPHAN[1]],
    ),
    "after-2-of-3-rows-mid-third": (
        lambda mp: _crash_in_index_write(mp, keep=lambda d: _first_lines(2)(d) + 7),
        [r"index/main\.jsonl: unterminated last line", rf"incomplete row group for {NEW_SHARD} \(2 of 3 rows\)",
         ORPHAN[0]],
        [r"index/main\.jsonl: truncated \d+ bytes of torn index tail", ORPHAN[1]],
    ),
}


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_crash_at_each_point_of_append_is_detected_and_repaired(point, tmp_path, monkeypatch, capsys):
    path = tmp_path / "bank"
    diffs = build_bank(path)
    crash, problems, repaired = CRASH_POINTS[point]
    new = [random_diff(SHAPES, r, 10 + j) for j, r in enumerate((1, 2, 1))]
    bank = DiffBank.open(path)
    with monkeypatch.context() as mp:
        crash(mp)
        with pytest.raises(SimulatedCrash):
            bank.append_many(new, [{"k": 10}, {"k": 11}, {"k": 12}])
    # the object that saw the failure refuses to append past the torn tail (it would be hidden behind it)
    with pytest.raises(MetaditError, match="bank repair"):
        bank.append(new[0], {"k": 99})

    torn = DiffBank.open(path)  # "the next process"
    found = [str(p) for p in torn.problems]
    assert len(found) == len(problems), found
    for want in problems:
        assert any(re.search(want, f) for f in found), (want, found)
    assert len(torn) == 3  # readers see only complete entries, and those exactly
    for i in range(3):
        diff, meta = torn[i]
        assert meta == {"k": i}
        assert_same_diff(diff, diffs[i])
    with pytest.raises(MetaditError, match="torn tail.*bank repair"):
        torn.append(new[0], {"k": 99})

    rc, out, _ = run_cli(capsys, "bank", "verify", path)
    assert rc == 1 and "3/3 entries verified" in out and f"{len(problems)} torn-tail problems" in out
    rc, out, _ = run_cli(capsys, "bank", "repair", path)
    assert rc == 0, out
    removed = [line for line in out.splitlines() if line.startswith("removed: ")]
    assert len(removed) == len(repaired), out
    for want in repaired:
        assert any(re.search(want, line) for line in removed), (want, out)
    assert f"{len(repaired)} item(s) removed; 3 complete entries kept" in out
    assert run_cli(capsys, "bank", "verify", path)[0] == 0

    again = DiffBank.open(path)
    again.append_many(new, [{"k": 10}, {"k": 11}, {"k": 12}])
    final = DiffBank.open(path)
    assert final.problems == [] and final.verify() == []
    assert [m["k"] for _, m in final] == [0, 1, 2, 10, 11, 12]
    assert_same_diff(final[4][0], new[1])
    assert run_cli(capsys, "bank", "verify", path)[0] == 0


def test_crash_after_index_write_before_fsync_leaves_a_complete_append(tmp_path, monkeypatch, capsys):
    """A process killed after write() but before fsync() loses nothing (the page cache survives the process):
    the append is complete, and the index row is the commit point."""
    path = tmp_path / "bank"
    build_bank(path)
    bank = DiffBank.open(path)
    new = [random_diff(SHAPES, 1, 20 + j) for j in range(2)]
    with monkeypatch.context() as mp:
        _crash_before_index_fsync(mp)
        with pytest.raises(SimulatedCrash):
            bank.append_many(new, [{"k": 20}, {"k": 21}])
    assert len(bank) == 5 and bank.problems == []  # the failed call re-read the bank
    reopened = DiffBank.open(path)
    assert reopened.problems == [] and [m["k"] for _, m in reopened] == [0, 1, 2, 20, 21]
    assert run_cli(capsys, "bank", "verify", path)[0] == 0


def test_rows_whose_shard_is_missing_are_a_torn_tail(tmp_path, capsys):
    """Rows without a shard (e.g. a copy that lost the last shard): hidden from readers, removed by repair."""
    path = tmp_path / "bank"
    build_bank(path, groups=((0, 1), (2,), (3, 4)))
    (path / "shards" / "main-000002.safetensors").unlink()
    torn = DiffBank.open(path)
    assert [str(p) for p in torn.problems] == [
        f"{path}/index/main.jsonl: rows point to missing shard shards/main-000002.safetensors"]
    assert len(torn) == 3
    rc, out, _ = run_cli(capsys, "bank", "repair", path)
    assert rc == 0 and "truncated" in out and "rows point to missing shard" in out
    assert run_cli(capsys, "bank", "verify", path)[0] == 0
    DiffBank.open(path).append(random_diff(SHAPES, 1, 5), {"k": 5})
    assert [m["k"] for _, m in DiffBank.open(path)] == [0, 1, 2, 5]


def test_crash_during_repair_then_repair_again(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bank"
    build_bank(path)
    with monkeypatch.context() as mp:
        _crash_in_index_write(mp, keep=_first_lines(1))
        with pytest.raises(SimulatedCrash):
            DiffBank.open(path).append_many([random_diff(SHAPES, 1, s) for s in (7, 8)], [{}, {}])
    with monkeypatch.context() as mp:
        def die(self, *a, **k):
            raise SimulatedCrash("killed during repair, after the index truncation, before the shard removal")
        mp.setattr(Path, "unlink", die)
        with pytest.raises(SimulatedCrash):
            DiffBank.open(path).repair()
    half = DiffBank.open(path)
    assert len(half) == 3 and [p.what for p in half.problems] == ["shard with no index rows (interrupted append)"]
    rc, out, _ = run_cli(capsys, "bank", "repair", path)
    assert rc == 0 and "1 item(s) removed" in out
    assert run_cli(capsys, "bank", "verify", path)[0] == 0


def test_crash_during_create_does_not_block_a_resumed_build(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bank"
    with monkeypatch.context() as mp:
        real = os.replace
        mp.setattr(os, "replace", lambda s, d, *a, **k: (_ for _ in ()).throw(SimulatedCrash())
                   if str(d).endswith("bank.json") else real(s, d, *a, **k))
        with pytest.raises(SimulatedCrash):
            DiffBank.create(path, base_model=IDENTITY)
    rc, _, err = run_cli(capsys, "bank", "info", path)
    assert rc == 1 and "not a diff bank (no bank.json)" in one_error_line(err)
    bank = DiffBank.create(path, base_model=IDENTITY, exist_ok=True)  # what `metadit gen` does on a rerun
    bank.append(random_diff(SHAPES, 1, 0), {"k": 0})
    assert len(DiffBank.open(path)) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MetaditError, match="not empty"):  # a directory with anything else in it is still refused
        DiffBank.create(tmp_path / "other", base_model=IDENTITY)


def test_failed_write_in_a_live_process_does_not_hide_later_appends(tmp_path, monkeypatch):
    """Regression: a disk-full error mid index write used to leave the live object appending after the torn
    line, so the later entries were unreadable and `repair` deleted them. Now the object refuses to append."""
    path = tmp_path / "bank"
    build_bank(path)
    bank = DiffBank.open(path)

    class DiskFull:
        def __init__(self, real):
            self.real = real

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

        def write(self, data):
            self.real.write(data[:10])
            self.real.flush()
            raise OSError(28, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(diff_bank_module, "open", lambda f, m="r", *a, **k: DiskFull(builtins.open(f, m, *a, **k))
                   if str(f).endswith(".jsonl") else builtins.open(f, m, *a, **k), raising=False)
        with pytest.raises(OSError, match="No space"):
            bank.append(random_diff(SHAPES, 1, 30), {"k": 30})
    with pytest.raises(MetaditError, match="bank repair"):
        bank.append(random_diff(SHAPES, 1, 31), {"k": 31})
    assert bank.repair()
    bank.append(random_diff(SHAPES, 1, 31), {"k": 31})
    assert [m["k"] for _, m in DiffBank.open(path)] == [0, 1, 2, 31]


def test_another_writers_torn_tail_blocks_only_that_writer(tmp_path):
    path = tmp_path / "bank"
    build_bank(path, groups=((0,),), writer="rank0")
    build_bank(path, groups=((1,),), writer="rank1")
    index1 = path / "index" / "rank1.jsonl"
    index1.write_bytes(index1.read_bytes()[:-9])  # rank1 died mid-line
    rank0 = DiffBank.open(path, writer="rank0")
    assert len(rank0) == 1 and {p.writer for p in rank0.problems} == {"rank1"}
    rank0.append(random_diff(SHAPES, 1, 2), {"k": 2})  # rank0 goes on
    with pytest.raises(MetaditError, match="bank repair"):
        DiffBank.open(path, writer="rank1").append(random_diff(SHAPES, 1, 3), {})
    rank0.repair(writers=["rank0"])  # nothing of rank1's is touched
    assert index1.stat().st_size > 0 and (path / "shards" / "rank1-000000.safetensors").exists()
    removed = DiffBank.open(path, writer="rank1").repair(writers=["rank1"])
    assert len(removed) == 2 and DiffBank.open(path).problems == []
    assert sorted(m["k"] for _, m in DiffBank.open(path)) == [0, 2]


def test_damage_before_complete_entries_is_not_treated_as_a_torn_tail(tmp_path, capsys):
    """A bit flip in the first index line is not a crash: later entries stay readable, and repair refuses to
    truncate them away (it used to delete every entry after the damaged line, shards included)."""
    path = tmp_path / "bank"
    build_bank(path, groups=((0,), (1,), (2,)))
    index = path / "index" / "main.jsonl"
    xor_byte(index, 1, 0x40)  # '{"' -> '{b': the first row is unreadable
    bank = DiffBank.open(path)
    assert [m["k"] for _, m in bank] == [1, 2] and bank.verify() == []
    assert any("not a torn tail" in str(p) for p in bank.problems)
    before = snapshot(path)
    rc, _, err = run_cli(capsys, "bank", "repair", path)
    line = one_error_line(err)
    assert rc == 1 and "cannot repair safely" in line and "main.jsonl" in line and "unreadable index line" in line
    assert snapshot(path) == before  # nothing removed: main-000000 may still be restored
    rc, out, _ = run_cli(capsys, "bank", "verify", path)
    assert rc == 1 and "2/2 entries verified" in out and "unreadable index line at byte 0" in out


def test_verify_names_each_corrupt_entry(tmp_path, capsys):
    path = tmp_path / "bank"
    build_bank(path, groups=((0, 1), (2,), (3, 4)))
    shard0, shard2 = path / "shards" / "main-000000.safetensors", path / "shards" / "main-000002.safetensors"
    start, _ = tensor_span(shard0, f"e1/{K_PROJ}/B")
    xor_byte(shard0, start + 2, 0x04)  # a payload bit of entry 1
    shard2.write_bytes(shard2.read_bytes()[:-100])  # entries 3 and 4: their shard is truncated
    before = snapshot(path)
    rc, out, _ = run_cli(capsys, "bank", "verify", path)
    assert rc == 1 and snapshot(path) == before
    corrupt = [line for line in out.splitlines() if line.startswith("corrupt ")]
    assert len(corrupt) == 3, out
    assert "main-000000-1 (shards/main-000000.safetensors): checksum mismatch" in corrupt[0]
    for line, entry in zip(corrupt[1:], ["main-000002-0", "main-000002-1"]):
        assert entry in line and "main-000002.safetensors: not a readable safetensors file" in line
    assert "2/5 entries verified" in out
    assert "main-000000-0" not in out and "main-000001-0" not in out


# ====================================================================== 3. hostile inputs
class _Boom:
    """Unpickling this creates `marker` (as any pickle can run code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _pickled(kind: str, marker: Path) -> bytes:
    if kind == "pt":
        buf = Path(str(marker) + ".buf")
        torch.save({"base_model.model.x.lora_A.weight": _Boom(marker)}, buf)
        data = buf.read_bytes()
        buf.unlink()
        return data
    return pickle.dumps({"base_model.model.x.lora_A.weight": _Boom(marker)})


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pkl"])
def test_pickled_adapters_are_refused_and_never_unpickled(suffix, tmp_path, capsys):
    marker, control = tmp_path / "PWNED", tmp_path / "control"
    # control: these payloads really do run code when unpickled
    kind = "pt" if suffix == ".pt" else "pickle"
    ctl = tmp_path / f"control{suffix}"
    ctl.write_bytes(_pickled(kind, control))
    torch.load(ctl, weights_only=False) if kind == "pt" else pickle.loads(ctl.read_bytes())
    assert control.exists()

    bank = tmp_path / "bank"
    build_bank(bank)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    (adapter / f"adapter_model{suffix}").write_bytes(_pickled(kind, marker))
    before = snapshot(bank)
    with _tripwire():
        with pytest.raises(MetaditError, match="never unpickles"):
            LoraDiff.from_peft(adapter)
        rc, _, err = run_cli(capsys, "bank", "import-peft", bank, adapter)
    line = one_error_line(err)
    assert rc == 1 and str(adapter) in line and f"adapter_model{suffix}" in line and "safetensors only" in line
    assert snapshot(bank) == before and not marker.exists()
    # a pickle disguised as safetensors is not a readable safetensors file (safetensors never unpickles)
    (adapter / "adapter_model.safetensors").write_bytes(_pickled(kind, marker))
    with _tripwire():
        rc, _, err = run_cli(capsys, "bank", "import-peft", bank, adapter)
    line = one_error_line(err)
    assert rc == 1 and "adapter_model.safetensors: not a readable safetensors file" in line
    assert snapshot(bank) == before and not marker.exists()


@contextlib.contextmanager
def _tripwire():
    calls = []
    saved = {(m, n): getattr(m, n) for m, n in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                                                 (torch, "load")]}

    def trip(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called on hostile input")
        return f

    for (m, n) in saved:
        setattr(m, n, trip(f"{m.__name__}.{n}"))
    try:
        yield calls
    finally:
        for (m, n), v in saved.items():
            setattr(m, n, v)
    assert calls == [], calls


def test_pickles_inside_a_bank_are_never_read(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "bank"
    build_bank(path)
    for name in ["evil.bin", "evil.pt", "evil.pkl"]:
        (path / "shards" / name).write_bytes(_pickled("pickle", marker))
    # an index row that points at a pickle, and a .safetensors shard that holds one
    row = {"id": "evil-0", "shard": "shards/evil.bin", "prefix": "e0", "group_size": 1, "rank": 1, "sha256": "0" * 64,
           "meta": {}}
    with open(path / "index" / "evil.jsonl", "w") as f:
        f.write(json.dumps(row) + "\n")
    (path / "shards" / "main-000001.safetensors").write_bytes(_pickled("pickle", marker))
    with _tripwire():
        bank = DiffBank.open(path)
        problems = "\n".join(map(str, bank.problems))
        assert problems.count("pickle-format file in a bank; it is never read") == 3
        assert "evil.jsonl: unreadable index line at byte 0" in problems
        assert len(bank) == 3
        bank[0]
        with pytest.raises(MetaditError, match="main-000001.safetensors: not a readable safetensors file"):
            bank[2]
        rc, out, _ = run_cli(capsys, "bank", "verify", path)
        assert rc == 1 and "main-000001-0 (shards/main-000001.safetensors)" in out and "evil.pkl" in out
        assert run_cli(capsys, "bank", "info", path)[0] == 0
        rc, out, _ = run_cli(capsys, "bank", "repair", path)
        assert rc == 0 and out.count("pickle-format file; never read") == 3
    assert not marker.exists()


def _adapter(tmp_path, name, diff: LoraDiff) -> Path:
    return diff.save_peft(tmp_path / name, base_model_name_or_path="tiny-llama")


def _misfit_adapters(tmp_path) -> dict[str, tuple[Path, str]]:
    """Adapters that do not fit tiny-llama, with the text each error must contain."""
    wide = random_diff({n: (s[0] * 2, s[1]) for n, s in SHAPES.items()}, 1, 0)
    ghost_shapes = dict(SHAPES)
    ghost_shapes["model.layers.7.self_attn.q_proj"] = (32, 32)  # a layer the 2-layer model lacks
    ghost = random_diff(ghost_shapes, 1, 0)
    fat = random_diff(SHAPES, 1, 0)
    fat.A[K_PROJ], fat.B[K_PROJ] = torch.randn(20, 32), torch.randn(16, 20)  # k_proj is 32 -> 16: rank 20 > 16
    return {
        "shapes": (_adapter(tmp_path, "wide", wide), "A(1, 96) B(32, 1) do not fit Linear(48 -> 32)"),
        "missing-module": (_adapter(tmp_path, "ghost", ghost),
                           "targets module model.layers.7.self_attn.q_proj, which base model 'tiny-llama' does not have"),
        "rank-too-large": (_adapter(tmp_path, "fat", fat), f"diff module {K_PROJ}: rank 20 exceeds the layer size"),
    }


@pytest.mark.parametrize("case", ["shapes", "missing-module", "rank-too-large"])
def test_adapters_that_do_not_fit_the_model(case, tmp_path, capsys):
    bank = tmp_path / "bank"
    build_bank(bank)
    adapter, message = _misfit_adapters(tmp_path)[case]
    before = snapshot(bank)
    rc, _, err = run_cli(capsys, "bank", "import-peft", bank, adapter)
    assert rc == 1 and message in one_error_line(err)
    assert snapshot(bank) == before
    # the library: use_diffs names the module and where the diff came from
    model = tiny_llama()
    patch_model(model)
    with pytest.raises(MetaditError) as e:
        with use_diffs(model, [LoraDiff.from_peft(adapter)]):
            pass
    want = {"shapes": "do not fit", "missing-module": "lacks", "rank-too-large": "exceeds the layer's size"}[case]
    assert want in str(e.value) and f"(from {adapter})" in str(e.value)


@pytest.mark.parametrize("case", ["shapes", "missing-module", "rank-too-large"])
def test_bank_entries_that_do_not_fit_the_model(case, tmp_path):
    """A bank entry (a bank's shapes are not checked at append) is refused by use_diffs, naming bank and entry."""
    diff = LoraDiff.from_peft(_misfit_adapters(tmp_path)[case][0])
    bank = DiffBank.create(tmp_path / "bank", base_model=IDENTITY)
    bank.append(diff, {})
    model = tiny_llama()
    patch_model(model)
    entry, _ = DiffBank.open(tmp_path / "bank")[0]
    with pytest.raises(MetaditError, match=rf"bank {re.escape(str(tmp_path / 'bank'))} entry main-000000-0"):
        with use_diffs(model, [None, entry]):
            pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_factors_are_refused(bad, tmp_path, capsys):
    bank = tmp_path / "bank"
    build_bank(bank)
    diff = random_diff(SHAPES, 1, 0)
    diff.B[K_PROJ][3, 0] = bad
    adapter = _adapter(tmp_path, "adapter", diff)
    before = snapshot(bank)
    rc, _, err = run_cli(capsys, "bank", "import-peft", bank, adapter)
    line = one_error_line(err)
    assert rc == 1 and f"{adapter}/adapter_model.safetensors: module {K_PROJ} factor B holds NaN or Inf" in line
    assert snapshot(bank) == before
    model = tiny_llama()
    patch_model(model)
    with pytest.raises(MetaditError, match=f"row 0's diff: module {K_PROJ} factor B holds NaN or Inf"):
        with use_diffs(model, [diff]):
            pass
    with pytest.raises(MetaditError, match="NaN or Inf"):  # nor can one be appended
        DiffBank.open(bank).append(diff, {})


def test_a_forged_bank_entry_with_nan_and_a_matching_checksum(tmp_path, capsys, monkeypatch):
    """A hostile bank can carry NaN with a correct checksum: reading, verify and export still refuse it."""
    path = tmp_path / "bank"
    build_bank(path)
    diff = random_diff(SHAPES, 1, 0)
    diff.A[K_PROJ][0, 5] = float("nan")
    with monkeypatch.context() as mp:
        mp.setattr(LoraDiff, "check_finite", lambda self, source="": None)
        DiffBank.open(path).append(diff, {"k": 3})
    bank = DiffBank.open(path)
    with pytest.raises(MetaditError, match=rf"main-000002.safetensors: entry main-000002-0: module {K_PROJ} factor A"):
        bank[3]
    before = snapshot(path)
    rc, out, _ = run_cli(capsys, "bank", "verify", path)
    assert rc == 1 and "main-000002-0" in out and "NaN or Inf" in out and "3/4 entries verified" in out
    rc, _, err = run_cli(capsys, "bank", "export-peft", path, 3, tmp_path / "out")
    assert rc == 1 and "NaN or Inf" in one_error_line(err) and not (tmp_path / "out").exists()
    assert snapshot(path) == before


def test_a_bank_for_another_base_model(tmp_path, capsys):
    # the library: a bank refuses a model with another architecture, naming the bank
    bank = DiffBank.create(tmp_path / "llama", base_model=IDENTITY)
    with pytest.raises(BaseModelMismatchError, match=rf"{re.escape(str(tmp_path / 'llama'))}: bank was made for"):
        bank.check_model(LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4)))
    with pytest.raises(BaseModelMismatchError, match="'tiny-llama'.*not 'tiny-qwen3'"):
        DiffBank.create(tmp_path / "llama", base_model=tiny_qwen3(), exist_ok=True)
    # the CLI: a bank whose base model (a local config) is not the one it records
    cfg_dir = tmp_path / "qwen3-config"
    tiny_qwen3().config.save_pretrained(cfg_dir)
    other = DiffBank.create(tmp_path / "other", base_model={"name": str(cfg_dir), "fingerprint": IDENTITY["fingerprint"]})
    other.append(random_diff(SHAPES, 1, 0), {})
    adapter = _adapter(tmp_path, "adapter", random_diff(SHAPES, 1, 1))
    before = snapshot(tmp_path / "other")
    rc, _, err = run_cli(capsys, "bank", "import-peft", tmp_path / "other", adapter)
    line = one_error_line(err)
    assert rc == 1 and str(tmp_path / "other") in line and "no longer matches the bank's fingerprint" in line
    assert snapshot(tmp_path / "other") == before


def _peft_file_damage(weights: Path) -> dict[str, tuple[bytes, str]]:
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    start, _ = tensor_span(weights, f"base_model.model.{K_PROJ}.lora_B.weight")
    nan = bytearray(data)
    nan[start + 3] = 0x7F  # exponent bits of the first float all ones: Inf or NaN
    nan[start + 2] |= 0x80
    length = bytearray(data)
    length[1] ^= 0x01  # header length prefix off by 256
    brace = bytearray(data)
    brace[8] ^= 0x01  # '{' -> 'z'
    key = bytearray(data)
    i = data.index(b'"F32"', 8, 8 + n)
    key[i + 2] ^= 0x01  # dtype F32 -> F22
    return {
        "truncated": (data[: len(data) // 2], "not a readable safetensors file"),
        "empty": (b"", "not a readable safetensors file"),
        "header-length-flipped": (bytes(length), "not a readable safetensors file"),
        "header-json-flipped": (bytes(brace), "not a readable safetensors file"),
        "header-dtype-flipped": (bytes(key), "not a readable safetensors file"),
        "payload-exponent-flipped": (bytes(nan), "holds NaN or Inf"),
    }


@pytest.mark.parametrize("case", ["truncated", "empty", "header-length-flipped", "header-json-flipped",
                                  "header-dtype-flipped", "payload-exponent-flipped"])
def test_damaged_adapter_files(case, tmp_path, capsys):
    bank = tmp_path / "bank"
    build_bank(bank)
    adapter = _adapter(tmp_path, "adapter", random_diff(SHAPES, 1, 3))
    weights = adapter / "adapter_model.safetensors"
    data, message = _peft_file_damage(weights)[case]
    weights.write_bytes(data)
    before = snapshot(bank)
    rc, _, err = run_cli(capsys, "bank", "import-peft", bank, adapter)
    line = one_error_line(err)
    assert rc == 1 and f"{weights}: " in line and message in line
    assert snapshot(bank) == before


def test_a_payload_bit_flip_in_a_peft_adapter_is_undetectable_but_a_bank_entry_is_not(tmp_path, capsys):
    """peft files carry no checksum, so a mantissa flip in an adapter imports as a (slightly) different diff;
    from then on the bank's sha256 covers it."""
    bank = tmp_path / "bank"
    build_bank(bank)
    adapter = _adapter(tmp_path, "adapter", random_diff(SHAPES, 1, 3))
    weights = adapter / "adapter_model.safetensors"
    start, _ = tensor_span(weights, f"base_model.model.{K_PROJ}.lora_B.weight")
    xor_byte(weights, start, 0x01)  # lowest mantissa bit
    assert run_cli(capsys, "bank", "import-peft", bank, adapter)[0] == 0
    shard = bank / "shards" / "main-000002.safetensors"
    start, _ = tensor_span(shard, f"e0/{K_PROJ}/B")
    xor_byte(shard, start, 0x01)
    rc, out, _ = run_cli(capsys, "bank", "verify", bank)
    assert rc == 1 and "main-000002-0 (shards/main-000002.safetensors): checksum mismatch" in out


@pytest.mark.parametrize("case", ["truncated", "header-length-flipped", "header-json-flipped", "payload-flipped"])
def test_damaged_bank_shards(case, tmp_path, capsys):
    path = tmp_path / "bank"
    build_bank(path)
    shard = path / "shards" / "main-000001.safetensors"
    data = bytearray(shard.read_bytes())
    if case == "truncated":
        data = data[: len(data) - 40]
    elif case == "header-length-flipped":
        data[0] ^= 0x02
    elif case == "header-json-flipped":
        data[8] ^= 0x01
    else:
        start, _ = tensor_span(shard, f"e0/{K_PROJ}/A")
        data[start + 1] ^= 0x10
    shard.write_bytes(bytes(data))
    before = snapshot(path)
    rc, out, _ = run_cli(capsys, "bank", "verify", path)
    corrupt = [line for line in out.splitlines() if line.startswith("corrupt")]
    assert rc == 1 and len(corrupt) == 1 and "main-000001-0 (shards/main-000001.safetensors)" in corrupt[0]
    assert ("checksum mismatch" if case == "payload-flipped" else "not a readable safetensors file") in corrupt[0]
    rc, _, err = run_cli(capsys, "bank", "export-peft", path, 2, tmp_path / "out")
    if case == "payload-flipped":  # reading does not hash (verify does): the entry exports as stored
        assert rc == 0
        shutil.rmtree(tmp_path / "out")
    else:
        line = one_error_line(err)
        assert rc == 1 and f"{shard}: not a readable safetensors file" in line and not (tmp_path / "out").exists()
    assert snapshot(path) == before
    assert len(DiffBank.open(path)) == 3 and DiffBank.open(path)[0][1] == {"k": 0}


@pytest.mark.parametrize("case", ["truncated", "bit-flipped", "empty", "not-an-object", "no-base-model", "version"])
def test_damaged_bank_header(case, tmp_path, capsys):
    path = tmp_path / "bank"
    build_bank(path)
    header = path / "bank.json"
    data = header.read_bytes()
    text = json.loads(data)
    damaged = {
        "truncated": data[: len(data) // 2],
        "bit-flipped": data[:0] + bytes([data[0] ^ 0x80]) + data[1:],
        "empty": b"",
        "not-an-object": b"[1, 2]",
        "no-base-model": json.dumps({**text, "base_model": "tiny-llama"}).encode(),
        "version": json.dumps({**text, "version": 99}).encode(),
    }[case]
    header.write_bytes(damaged)
    before = snapshot(path)
    for cmd in (["info"], ["verify"], ["repair"], ["export-peft", 0, tmp_path / "out"]):
        rc, _, err = run_cli(capsys, "bank", cmd[0], path, *cmd[1:])
        line = one_error_line(err)
        assert rc == 1 and f"{header}: " in line, line
    assert snapshot(path) == before and not (tmp_path / "out").exists()


def test_damaged_index_is_reported_by_info_and_verify(tmp_path, capsys):
    path = tmp_path / "bank"
    build_bank(path)
    index = path / "index" / "main.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(lines[0] + lines[1] + b'{"id": 5, "shard": "../../etc/passwd"}\n')
    before = snapshot(path)
    rc, out, _ = run_cli(capsys, "bank", "info", path, "--json")
    assert rc == 0 and json.loads(out)["problems"] == [
        f"{index}: unreadable index line at byte {len(lines[0]) + len(lines[1])}",
        f"{path}/shards/main-000001.safetensors: shard with no index rows (interrupted append)"]
    rc, out, _ = run_cli(capsys, "bank", "verify", path)
    assert rc == 1 and "unreadable index line" in out and "2/2 entries verified" in out
    assert snapshot(path) == before


def test_hostile_adapter_configs_fail_fast_with_one_line(tmp_path, capsys):
    adapter = _adapter(tmp_path, "adapter", random_diff(SHAPES, 1, 3))
    config_file = adapter / "adapter_config.json"
    good = json.loads(config_file.read_text())
    cases = {
        "not-json": (b"{", "not valid JSON"),
        "deep": (b"[" * 100000, "not valid JSON"),
        "a-list": (b"[]", "not a peft adapter config"),
        "r-string": (json.dumps({**good, "r": "one"}).encode(), "r must be a positive integer"),
        "r-zero": (json.dumps({**good, "r": 0}).encode(), "r must be a positive integer"),
        "r-huge": (b'{"peft_type": "LORA", "r": 1e999}', "r must be a positive integer"),
        "alpha-nan": (json.dumps({**good, "lora_alpha": float("nan")}).encode(), "lora_alpha must be a finite"),
        "bad-regex": (json.dumps({**good, "rank_pattern": {"(": 2}}).encode(), "not a valid regular expression"),
        "pattern-not-dict": (json.dumps({**good, "rank_pattern": [1]}).encode(), "rank_pattern must be a JSON object"),
        # `(.*)*x` backtracks for hours in Python's `re` (peft's own matcher); metadit must answer at once
        "redos": (json.dumps({**good, "rank_pattern": {"(.*)*x": 2}}).encode(), None),
    }
    bank = tmp_path / "bank"
    build_bank(bank)
    before = snapshot(bank)
    for name, (data, message) in cases.items():
        config_file.write_bytes(data)
        with time_limit(10):
            rc, _, err = run_cli(capsys, "bank", "import-peft", bank, adapter)
        if message is None:
            assert rc == 0, err  # a pattern that matches nothing: the adapter is fine
            shutil.rmtree(bank)
            build_bank(bank)
            continue
        line = one_error_line(err)
        assert rc == 1 and str(config_file) in line and message in line, (name, line)
        assert snapshot(bank) == before, name


def test_special_files_in_a_bank_do_not_hang_it(tmp_path, capsys):
    """A bank from a stranger may hold a FIFO where a file belongs: reading it would block forever."""
    path = tmp_path / "bank"
    build_bank(path)
    os.mkfifo(path / "index" / "evil.jsonl")
    os.mkfifo(path / "shards" / "evil-000000.safetensors")
    (path / "index" / "dir.jsonl").mkdir()
    with time_limit(10):
        bank = DiffBank.open(path)
        assert len(bank) == 3 and bank.verify() == []
        assert "evil.jsonl: cannot read index (not a regular file)" in "\n".join(map(str, bank.problems))
        rc, out, _ = run_cli(capsys, "bank", "verify", path)
        assert rc == 1 and "3/3 entries verified" in out
        rc, _, err = run_cli(capsys, "bank", "repair", path)
        assert rc == 1 and "cannot repair safely" in one_error_line(err)


def test_bank_text_is_printed_literally_not_as_rich_markup(tmp_path, capsys):
    DiffBank.create(tmp_path / "bank", base_model=IDENTITY, info={"note": "[/red] not markup"})
    rc, out, _ = run_cli(capsys, "bank", "info", tmp_path / "bank")
    assert rc == 0 and "[/red] not markup" in out
