"""Fuzz the bank and adapter readers with hypothesis (issue 6): random byte flips, overwrites, truncations,
insertions and deletions, plus structure-aware edits (a field of a JSON row or safetensors header set to a
random JSON value), applied to index .jsonl files, shard .safetensors files (header and payload), bank.json,
adapter_config.json and adapter_model.safetensors. Whatever the damage, `DiffBank.open`, `bank[i]`, `verify`,
`repair` and `LoraDiff.from_peft` either succeed or raise `MetaditError` — never another exception, never a
hang (each example runs under a time limit). Derandomized, so CI runs the same cases every time.

Set METADIT_FUZZ_STATS=path.json to write how many cases ran and what happened (reports/reliability.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metadit.bank import DiffBank, LoraDiff
from metadit.cli import main
from metadit.errors import MetaditError
from tests.conftest import random_diff
from tests.test_reliability import SHAPES, build_bank, time_limit

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
STATS: dict[str, Counter] = {}
HANG_LIMIT_S = 20


@pytest.fixture(scope="module", autouse=True)
def _write_stats():
    yield
    out = os.environ.get("METADIT_FUZZ_STATS")
    if out:
        Path(out).write_text(json.dumps({k: dict(sorted(v.items())) for k, v in sorted(STATS.items())}, indent=2))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Built once: a bank of 5 entries in 3 shards (ranks 1-2, a 2-row group first and last) and a peft adapter
    with per-module ranks and scales (so rank_pattern and alpha_pattern are present)."""
    root = tmp_path_factory.mktemp("fuzz-base")
    build_bank(root / "bank", groups=((0, 1), (2,), (3, 4)))
    diff = random_diff(SHAPES, 2, 9, scale=0.5)
    up = "model.layers.1.mlp.up_proj"
    diff.A[up], diff.B[up] = diff.A[up][:1], diff.B[up][:, :1]
    diff.scale["model.layers.0.self_attn.v_proj"] = 3.0
    diff.save_peft(root / "adapter", base_model_name_or_path="tiny-llama")
    return root


@pytest.fixture
def work():
    with tempfile.TemporaryDirectory(prefix="metadit-fuzz-") as d:
        yield Path(d)


def fresh(base: Path, work: Path, what: str) -> Path:
    target = work / what
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(base / what, target)
    return target


# ---------------------------------------------------------------------- mutations
POS = st.integers(0, 2**20)
TOKENS = st.sampled_from([b"\n", b"{", b"}", b"[", b"]", b'"', b",", b":", b"\x00", b"\xff", b"NaN", b"-1", b"1e999",
                          b"null", b'"shards/../bank.json"', b"[[[[[[[[", b"\xc3\x28"])
BYTE_OP = st.one_of(
    st.tuples(st.just("flip"), POS, st.integers(0, 7)),
    st.tuples(st.just("set"), POS, st.integers(0, 255)),
    st.tuples(st.just("truncate"), POS),
    st.tuples(st.just("insert"), POS, st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("insert"), POS, TOKENS),
    st.tuples(st.just("delete"), POS, st.integers(1, 24)),
)
BYTE_OPS = st.lists(BYTE_OP, min_size=1, max_size=4)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["shards/main-000001.safetensors", "/etc/passwd", "e0", "F32", "I64"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def mutate(data: bytes, ops, lo: int = 0, hi: int | None = None) -> bytes:
    """Apply byte operations at positions mapped into [lo, hi) (hi: the current end)."""
    buf = bytearray(data)
    for op in ops:
        end = len(buf) if hi is None else min(hi, len(buf))
        span = max(end - lo, 0)
        pos = lo + (op[1] % (span + 1) if span else 0)
        if op[0] in ("flip", "set") and pos >= len(buf):
            continue
        if op[0] == "flip":
            buf[pos] ^= 1 << op[2]
        elif op[0] == "set":
            buf[pos] = op[2]
        elif op[0] == "truncate":
            del buf[pos:]
        elif op[0] == "insert":
            buf[pos:pos] = op[2]
        elif op[0] == "delete":
            del buf[pos : pos + op[2]]
    return bytes(buf)


def set_field(obj, path: list, value, delete: bool):
    """Set (or delete) a field reached by `path` (indices into keys/items, mapped modulo); returns the object."""
    if not path or not isinstance(obj, (dict, list)) or not obj:
        return value
    keys = list(obj.keys()) if isinstance(obj, dict) else list(range(len(obj)))
    key = keys[path[0] % len(keys)]
    if len(path) == 1:
        if delete:
            del obj[key]
        else:
            obj[key] = value
        return obj
    obj[key] = set_field(obj[key], path[1:], value, delete)
    return obj


FIELD_EDIT = st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=3), JSON_VALUE, st.booleans())


# ---------------------------------------------------------------------- what must hold
def probe_bank(path: Path, stats: Counter, cli: bool = False) -> None:
    """Open, read every entry, verify, repair, reopen: each either works or raises MetaditError."""
    stats["cases"] += 1
    with time_limit(HANG_LIMIT_S):
        try:
            bank = DiffBank.open(path)
        except MetaditError:
            stats["open refused (MetaditError)"] += 1
            if cli:
                assert main(["bank", "info", str(path), "--json"]) == 1
            return
        stats["opened with problems reported" if bank.problems else "opened clean"] += 1
        bank.summary()
        for i in range(len(bank)):
            try:
                bank[i]
                stats["entries read"] += 1
            except MetaditError:
                stats["entries refused (MetaditError)"] += 1
        bad = bank.verify()
        stats["verify: entries named corrupt"] += len(bad)
        stats["verify: clean" if not bad and not bank.problems else "verify: not clean"] += 1
        if cli:
            assert main(["bank", "info", str(path), "--json"]) == 0
            assert main(["bank", "verify", str(path)]) == (1 if bad or bank.problems else 0)
        try:
            bank.repair()
            stats["repair done"] += 1
            repaired = True
        except MetaditError:
            stats["repair refused: damage it may not remove (MetaditError)"] += 1
            repaired = False
        after = DiffBank.open(path)
        if repaired:
            assert after.problems == [], after.problems
        for i in range(len(after)):
            try:
                after[i]
            except MetaditError:
                pass


def probe_adapter(path: Path, stats: Counter) -> None:
    stats["cases"] += 1
    with time_limit(HANG_LIMIT_S):
        try:
            LoraDiff.from_peft(path)
            stats["loaded"] += 1
        except MetaditError:
            stats["refused (MetaditError)"] += 1


def _stats(name: str) -> Counter:
    return STATS.setdefault(name, Counter())


# ---------------------------------------------------------------------- (i) index .jsonl
@settings(max_examples=150, **FUZZ)
@given(ops=BYTE_OPS)
def test_fuzz_index_bytes(base, work, ops):
    bank = fresh(base, work, "bank")
    index = bank / "index" / "main.jsonl"
    index.write_bytes(mutate(index.read_bytes(), ops))
    probe_bank(bank, _stats("index .jsonl: byte mutations"), cli=True)


@settings(max_examples=100, **FUZZ)
@given(edits=st.lists(FIELD_EDIT, min_size=1, max_size=3), line=st.integers(0, 4))
def test_fuzz_index_fields(base, work, edits, line):
    bank = fresh(base, work, "bank")
    index = bank / "index" / "main.jsonl"
    rows = [json.loads(x) for x in index.read_text().splitlines()]
    for path, value, delete in edits:
        rows[line] = set_field(rows[line], path, value, delete)
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probe_bank(bank, _stats("index .jsonl: field edits"))


# ---------------------------------------------------------------------- (ii) shard .safetensors
def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@settings(max_examples=100, **FUZZ)
@given(ops=BYTE_OPS, shard=st.integers(0, 2))
def test_fuzz_shard_header_bytes(base, work, ops, shard):
    bank = fresh(base, work, "bank")
    f = bank / "shards" / f"main-{shard:06d}.safetensors"
    data = f.read_bytes()
    f.write_bytes(mutate(data, ops, 0, _header_end(data)))
    probe_bank(bank, _stats("shard .safetensors: header byte mutations"))


@settings(max_examples=80, **FUZZ)
@given(edits=st.lists(FIELD_EDIT, min_size=1, max_size=2), shard=st.integers(0, 2), fix_length=st.booleans())
def test_fuzz_shard_header_fields(base, work, edits, shard, fix_length):
    bank = fresh(base, work, "bank")
    f = bank / "shards" / f"main-{shard:06d}.safetensors"
    data = f.read_bytes()
    end = _header_end(data)
    header = json.loads(data[8:end])
    for path, value, delete in edits:
        header = set_field(header, path, value, delete)
    blob = json.dumps(header).encode()
    length = len(blob) if fix_length else end - 8
    f.write_bytes(length.to_bytes(8, "little") + blob + data[end:])
    probe_bank(bank, _stats("shard .safetensors: header field edits"))


@settings(max_examples=60, **FUZZ)
@given(ops=BYTE_OPS, shard=st.integers(0, 2))
def test_fuzz_shard_payload_bytes(base, work, ops, shard):
    bank = fresh(base, work, "bank")
    f = bank / "shards" / f"main-{shard:06d}.safetensors"
    data = f.read_bytes()
    f.write_bytes(mutate(data, ops, _header_end(data)))
    probe_bank(bank, _stats("shard .safetensors: payload byte mutations"))


# ---------------------------------------------------------------------- (iii) bank.json
@settings(max_examples=50, **FUZZ)
@given(ops=BYTE_OPS)
def test_fuzz_bank_json_bytes(base, work, ops):
    bank = fresh(base, work, "bank")
    header = bank / "bank.json"
    header.write_bytes(mutate(header.read_bytes(), ops))
    probe_bank(bank, _stats("bank.json: byte mutations"), cli=True)


@settings(max_examples=50, **FUZZ)
@given(edits=st.lists(FIELD_EDIT, min_size=1, max_size=2))
def test_fuzz_bank_json_fields(base, work, edits):
    bank = fresh(base, work, "bank")
    header = bank / "bank.json"
    obj = json.loads(header.read_text())
    for path, value, delete in edits:
        obj = set_field(obj, path, value, delete)
    header.write_text(json.dumps(obj))
    probe_bank(bank, _stats("bank.json: field edits"))


# ---------------------------------------------------------------------- (iv) peft adapter directories
@settings(max_examples=60, **FUZZ)
@given(ops=BYTE_OPS)
def test_fuzz_adapter_config_bytes(base, work, ops):
    adapter = fresh(base, work, "adapter")
    config = adapter / "adapter_config.json"
    config.write_bytes(mutate(config.read_bytes(), ops))
    probe_adapter(adapter, _stats("adapter_config.json: byte mutations"))


@settings(max_examples=80, **FUZZ)
@given(edits=st.lists(FIELD_EDIT, min_size=1, max_size=3))
def test_fuzz_adapter_config_fields(base, work, edits):
    adapter = fresh(base, work, "adapter")
    config = adapter / "adapter_config.json"
    obj = json.loads(config.read_text())
    for path, value, delete in edits:
        obj = set_field(obj, path, value, delete)
    config.write_text(json.dumps(obj))
    probe_adapter(adapter, _stats("adapter_config.json: field edits"))


@settings(max_examples=80, **FUZZ)
@given(ops=BYTE_OPS, region=st.sampled_from(["header", "payload", "anywhere"]))
def test_fuzz_adapter_weights_bytes(base, work, ops, region):
    adapter = fresh(base, work, "adapter")
    f = adapter / "adapter_model.safetensors"
    data = f.read_bytes()
    end = _header_end(data)
    lo, hi = {"header": (0, end), "payload": (end, None), "anywhere": (0, None)}[region]
    f.write_bytes(mutate(data, ops, lo, hi))
    probe_adapter(adapter, _stats("adapter_model.safetensors: byte mutations"))


@settings(max_examples=40, **FUZZ)
@given(edits=st.lists(FIELD_EDIT, min_size=1, max_size=2))
def test_fuzz_adapter_weights_header_fields(base, work, edits):
    adapter = fresh(base, work, "adapter")
    f = adapter / "adapter_model.safetensors"
    data = f.read_bytes()
    end = _header_end(data)
    header = json.loads(data[8:end])
    for path, value, delete in edits:
        header = set_field(header, path, value, delete)
    blob = json.dumps(header).encode()
    f.write_bytes(len(blob).to_bytes(8, "little") + blob + data[end:])
    probe_adapter(adapter, _stats("adapter_model.safetensors: header field edits"))
