"""`DiffBank`: an append-only directory of diffs as safetensors shards plus a JSON-lines metadata index.

    BANK/bank.json                      format version, base model name + fingerprint, creation info
    BANK/shards/<writer>-<seq>.safetensors   one shard per `append`/`append_many` call
    BANK/index/<writer>.jsonl           one row per diff: id, shard, rank, sha256, user metadata

Each writer (a process, e.g. one rank of a distributed `metadit gen`) appends to its own index file and
its own shards, so writers never contend; readers see the union. Durability order: the shard is written to
a temporary name, fsynced and renamed; only then are its index rows appended (one write, fsynced). A crash
therefore leaves at most a *torn tail* — a temporary file, a shard no index row points to, or an incomplete
group of rows — which `open` reports and `repair` removes. Nothing is ever unpickled: only safetensors.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from metadit.bank.fingerprint import model_identity
from metadit.diff.lora_diff import UNSAFE_SUFFIXES, LoraDiff
from metadit.errors import BaseModelMismatchError, MetaditError

FORMAT = "metadit-diffbank"
VERSION = 1
_WRITER = re.compile(r"^[A-Za-z0-9_.-]+$")
_HEAD = re.compile(r"^(?P<path>.+)\[:(?P<n>\d+)\]$")
_SCALE_KEY = "__scale__"
_SHARD = re.compile(r"^shards/(?!\.tmp-)[A-Za-z0-9_.-]+\.safetensors$")
# Index-row fields and their types; anything else in a row line makes it unreadable (a hostile or damaged index
# must not reach `Path / row["shard"]` with a non-string, or point outside the bank's shards/ directory).
_ROW_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "shard": str, "prefix": str, "group_size": int, "sha256": str, "meta": dict, "rank": int,
}
# What reading a damaged safetensors file can raise (safetensors, torch and the OS each have their own).
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError, IndexError, OverflowError)


def split_bank_spec(spec: str | Path) -> tuple[Path, int | None]:
    """`PATH[:N]` -> (PATH, N): a read-only view of a bank's first N entries (in the order they were written).

    Why: a bank grows (a resumed build appends), and every split or sample drawn from it changes with its size;
    a study that names `banks/smol_topic[:704]` reads the same diffs after the bank has grown (and is refused, saying
    so, while the bank holds fewer). A plain path
    (or an existing directory whose name happens to end in `[:N]`) is the whole bank.
    """
    m = _HEAD.match(str(spec))
    if m is None or Path(spec).exists():
        return Path(spec), None
    return Path(m["path"]), int(m["n"])


def banks_chat_format(specs: list[str], skip_missing: bool = False) -> str:
    """The one chat format the banks (`DIR` or `DIR[:N]`: the header is the directory's) were made with; banks that
    differ are an error.
    `skip_missing`: leave out banks that are not (yet) there; none left gives `default`."""
    formats = set()
    for spec in specs:
        directory = split_bank_spec(spec)[0]
        if skip_missing and not (directory / "bank.json").is_file():
            continue
        formats.add(DiffBank.open(directory).chat_format)
    if len(formats) > 1:
        raise MetaditError(f"banks {list(specs)} were made with different chat formats {sorted(formats)}")
    return formats.pop() if formats else "default"


def _parse_row(line: bytes) -> dict[str, Any] | None:
    """One index line as a row dict, or None if it is not a well-formed row."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, over-long integers, deep nesting
        return None
    if not isinstance(row, dict):
        return None
    for key, kind in _ROW_TYPES.items():
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            return None
    if row["group_size"] < 1 or not _SHARD.match(row["shard"]):
        return None
    return row


@dataclass
class _IndexScan:
    """What one index file holds: complete row groups (`rows`), damage, and where the intact prefix ends."""

    rows: list[dict[str, Any]]
    good_end: int  # byte length of the prefix up to the last complete group
    problems: list["BankProblem"]
    named_shards: set[str]  # shards named by any well-formed row, complete group or not
    mid_damage: bool = False  # damage followed by complete groups: not a torn tail, so `repair` leaves it
    unreadable: bool = False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def entry_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, raw bytes) of an entry's tensors in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entry_tensors(diff: LoraDiff, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for name in diff.modules:
        out[f"{name}/A"] = diff.A[name].detach().to(dtype or diff.A[name].dtype).contiguous().cpu()
        out[f"{name}/B"] = diff.B[name].detach().to(dtype or diff.B[name].dtype).contiguous().cpu()
    out[_SCALE_KEY] = torch.tensor([diff.scale[n] for n in diff.modules], dtype=torch.float64)
    return out


def pickle_format(path: Path) -> str | None:
    """Why `path` is a pickle-format file (its name, a pickle stream's opening bytes, or a torch zip archive holding a
    pickle), or None. Reads at most the file's first bytes and a zip's directory; never unpickles anything."""
    if path.suffix.lower() in UNSAFE_SUFFIXES:
        return f"a {path.suffix} name"
    try:
        if path.is_symlink() or not path.is_file():
            return None
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle stream"
    if head == b"PK\x03\x04":
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    return "a torch.save archive (a zip holding a pickle)"
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
    return None


@dataclass
class ForeignFile:
    """A file in a bank directory that is not part of the bank; `pickle` says why it is pickle-format, if it is."""

    path: str
    pickle: str | None = None

    def __str__(self) -> str:
        return f"{self.path}" + (f" (pickle-format: {self.pickle}; never read)" if self.pickle else "")


@dataclass
class BankProblem:
    """One piece of a torn tail or damage found when opening a bank."""

    path: str
    what: str

    @property
    def writer(self) -> str:
        """The writer whose file this is (index `<writer>.jsonl`, shard `<writer>-<seq>.safetensors`)."""
        name = Path(self.path).name.removeprefix(".tmp-")
        return name[: -len(".jsonl")] if name.endswith(".jsonl") else name.rsplit("-", 1)[0]

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


class DiffBank:
    """Append-only store of `LoraDiff`s with metadata; `bank[i] -> (diff, meta)` reads only that diff."""

    def __init__(self, path: Path, header: dict[str, Any], writer: str, head: int | None = None) -> None:
        self.path = path
        self.header = header
        self.writer = writer
        self.head = head  # a read-only view of the first `head` entries (`PATH[:N]`), else None
        self.rows: list[dict[str, Any]] = []
        self.problems: list[BankProblem] = []
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._reload()

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        base_model: Any,
        info: dict[str, Any] | None = None,
        exist_ok: bool = False,
        writer: str = "main",
    ) -> "DiffBank":
        """Create an empty bank for `base_model` (a model, or an identity dict `{"name", "fingerprint"}`).

        With `exist_ok`, an existing bank for the same base model is opened instead (a resumed build).
        """
        path = Path(path)
        identity = base_model if isinstance(base_model, dict) else model_identity(base_model)
        if not {"name", "fingerprint"} <= set(identity):
            raise MetaditError("DiffBank.create: base_model must be a model or {'name': ..., 'fingerprint': ...}")
        if (path / "bank.json").exists():
            if not exist_ok:
                raise MetaditError(f"{path}: a bank already exists here (use DiffBank.open)")
            bank = cls.open(path, writer=writer)
            bank.check_identity(identity)
            return bank
        if path.exists() and any(path.iterdir()) and not cls._is_interrupted_create(path):
            raise MetaditError(f"{path}: directory exists and is not empty; refusing to create a bank in it")
        (path / "shards").mkdir(parents=True, exist_ok=True)
        (path / "index").mkdir(exist_ok=True)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "base_model": {"name": identity["name"], "fingerprint": identity["fingerprint"]},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "info": info or {},
        }
        tmp = path / ".bank.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(header, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / "bank.json")
        _fsync_dir(path)
        return cls(path, header, writer)

    @staticmethod
    def _is_interrupted_create(path: Path) -> bool:
        """A directory left by a `create` that died before bank.json was in place: empty shards/ and index/ and
        at most the temporary header. Creating over it is safe (there is nothing in it to lose)."""
        allowed = {"shards", "index", ".bank.json.tmp"}
        names = {p.name for p in path.iterdir()}
        if not names <= allowed or (path / "bank.json").exists():
            return False
        return all(not (path / d).exists() or ((path / d).is_dir() and not any((path / d).iterdir()))
                   for d in ("shards", "index"))

    @classmethod
    def open(cls, path: str | Path, writer: str = "main") -> "DiffBank":
        """Open the bank at `path`; `PATH[:N]` opens a read-only view of its first N entries."""
        path, head = split_bank_spec(path)
        header_file = path / "bank.json"
        if not header_file.is_file():
            raise MetaditError(f"{path}: not a diff bank (no bank.json)")
        try:
            header = json.loads(header_file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers
            raise MetaditError(f"{header_file}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
        except OSError as e:
            raise MetaditError(f"{header_file}: cannot read ({e.strerror or e})") from e
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise MetaditError(f"{header_file}: not a metadit diff bank header")
        if header.get("version") != VERSION or isinstance(header.get("version"), bool):
            raise MetaditError(
                f"{header_file}: bank format version {str(header.get('version'))[:40]} (this metadit reads {VERSION})"
            )
        base = header.get("base_model")
        if not (isinstance(base, dict) and isinstance(base.get("name"), str) and isinstance(base.get("fingerprint"), str)):
            raise MetaditError(f"{header_file}: base_model must be {{'name': str, 'fingerprint': str}}")
        if not isinstance(header.get("info", {}), dict):
            raise MetaditError(f"{header_file}: info must be a JSON object")
        if not _WRITER.match(writer):
            raise MetaditError(f"writer name {writer!r} may only hold letters, digits, '_', '.', '-'")
        bank = cls(path, header, writer, head)
        if head is not None and len(bank.rows) < head:
            raise MetaditError(f"{path}[:{head}]: the bank holds only {len(bank.rows)} diffs")
        return bank

    # ------------------------------------------------------------------ identity
    @property
    def base_model(self) -> dict[str, str]:
        return dict(self.header["base_model"])

    @property
    def spec(self) -> str:
        """The bank as it was opened: `DIR`, or `DIR[:N]` for a view of its first N entries."""
        return str(self.path) if self.head is None else f"{self.path}[:{self.head}]"

    @property
    def chat_format(self) -> str:
        """How its diffs' prompts were laid out (`metadit.models.CHAT_FORMATS`; banks before it: default)."""
        return str((self.header.get("info") or {}).get("chat_format", "default"))

    def check_identity(self, identity: dict[str, str]) -> None:
        mine = self.base_model
        if identity["fingerprint"] != mine["fingerprint"]:
            raise BaseModelMismatchError(
                f"{self.spec}: bank was made for base model {mine['name']!r} (fingerprint {mine['fingerprint']}), "
                f"not {identity['name']!r} (fingerprint {identity['fingerprint']})"
            )

    def check_model(self, model: Any) -> None:
        """Raise `BaseModelMismatchError` unless `model` has this bank's architecture and linear shapes."""
        self.check_identity(model_identity(model))

    # ------------------------------------------------------------------ index
    def _index_files(self) -> list[Path]:
        d = self.path / "index"
        return sorted(d.glob("*.jsonl")) if d.is_dir() else []

    def _scan_index(self, file: Path) -> _IndexScan:
        """Parse one writer's index: rows of complete groups whose shard exists, plus every problem found.

        Parsing continues past damage, so complete entries after a damaged line stay readable. Damage with
        nothing complete after it is a torn tail (what a crash leaves); damage followed by complete groups is
        not, and is reported as such (`repair` will not truncate it away).
        """
        try:
            if not file.is_file():  # a FIFO or device would block or never end; a directory cannot be read
                raise OSError(0, "not a regular file")
            data = file.read_bytes()
        except OSError as e:
            return _IndexScan([], 0, [BankProblem(str(file), f"cannot read index ({e.strerror or e})")], set(),
                              unreadable=True)
        problems: list[BankProblem] = []
        rows: list[dict[str, Any]] = []
        named: set[str] = set()
        accepted_shards: set[str] = set()
        good_end = pos = 0
        group: list[dict[str, Any]] = []
        mid_damage = False

        def drop_group() -> None:
            if group:
                problems.append(BankProblem(str(file), f"incomplete row group for {group[0]['shard']} "
                                                       f"({len(group)} of {group[0]['group_size']} rows)"))
                group.clear()

        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                drop_group()
                problems.append(BankProblem(str(file), f"unterminated last line ({len(data) - pos} bytes)"))
                break
            line_start, line = pos, data[pos:nl]
            pos = nl + 1
            row = _parse_row(line)
            if row is None:
                drop_group()
                problems.append(BankProblem(str(file), f"unreadable index line at byte {line_start}"))
                continue
            named.add(row["shard"])
            if group and (row["shard"] != group[0]["shard"] or row["group_size"] != group[0]["group_size"]):
                drop_group()
            group.append(row)
            if len(group) < group[0]["group_size"]:
                continue
            shard = group[0]["shard"]
            if not (self.path / shard).is_file():
                problems.append(BankProblem(str(file), f"rows point to missing shard {shard}"))
            elif shard in accepted_shards:
                problems.append(BankProblem(str(file), f"duplicate row group for {shard}"))
            else:
                mid_damage = mid_damage or bool(problems)
                rows += group
                accepted_shards.add(shard)
                good_end = pos
            group.clear()
        drop_group()
        if mid_damage:
            problems.append(BankProblem(str(file), "damaged lines before complete entries: not a torn tail "
                                                   "(repair leaves this file alone; restore it from a copy)"))
        return _IndexScan(rows, good_end, problems, named, mid_damage)

    def _reload(self) -> None:
        self.rows, self.problems = [], []
        referenced: set[str] = set()
        seen_ids: set[str] = set()
        for file in self._index_files():
            scan = self._scan_index(file)
            self.problems += scan.problems
            for r in scan.rows:
                if r["id"] in seen_ids:
                    self.problems.append(BankProblem(str(file), f"entry id {r['id']} appears twice; second one ignored"))
                    continue
                seen_ids.add(r["id"])
                self.rows.append(r)
            referenced |= {r["shard"] for r in scan.rows}
        shard_dir = self.path / "shards"
        if shard_dir.is_dir():
            for f in sorted(shard_dir.iterdir()):
                rel = f"shards/{f.name}"
                if f.name.startswith(".tmp-"):
                    self.problems.append(BankProblem(str(f), "temporary file of an interrupted write"))
                elif f.suffix in UNSAFE_SUFFIXES:
                    self.problems.append(BankProblem(str(f), "pickle-format file in a bank; it is never read"))
                elif rel not in referenced:
                    self.problems.append(BankProblem(str(f), "shard with no index rows (interrupted append)"))
        if self.head is not None:
            self.rows = self.rows[: self.head]
        self._by_id = {r["id"]: i for i, r in enumerate(self.rows)}
        self._referenced = referenced  # every shard a complete row group names (a `[:N]` view's too)

    def refresh(self) -> None:
        """Re-read the index (e.g. to see what other writers appended)."""
        self._handles.clear()
        self._reload()

    def repair(self, writers: Sequence[str] | None = None) -> list[str]:
        """Remove the torn tail: temp files, shards without rows, incomplete or dangling row groups at the end.

        `writers` limits the repair to those writers' files (a resuming rank repairs only its own).
        Returns a description of each thing removed. Never touches complete entries: an index damaged *before*
        complete entries (not a crash: a crash only tears the end) is left alone, with its writer's shards, and
        after removing everything else `repair` raises `MetaditError` naming what it left (as it does for any
        other problem of these writers that remains, e.g. a duplicated entry id).
        """
        if self.head is not None:
            raise MetaditError(f"{self.path}[:{self.head}] is a read-only view of the bank; repair {self.path}")
        removed: list[str] = []
        left: list[str] = []
        referenced: set[str] = set()  # shards that some index row (kept after this repair) names
        protected: set[str] = set()  # writers whose shards stay: their index is damaged beyond a torn tail
        mine = lambda p: writers is None or BankProblem(str(p), "").writer in writers  # noqa: E731
        for file in self._index_files():
            scan = self._scan_index(file)
            writer = BankProblem(str(file), "").writer
            if scan.unreadable or scan.mid_damage or not scan.problems or not mine(file):
                referenced |= scan.named_shards
                if scan.unreadable or scan.mid_damage:
                    protected.add(writer)
                    if mine(file):
                        left.append(f"{file}: {scan.problems[0].what}; left as is")
                continue
            referenced |= {r["shard"] for r in scan.rows}  # the torn rows are cut off below
            size = file.stat().st_size
            with open(file, "r+b") as f:
                f.truncate(scan.good_end)
                f.flush()
                os.fsync(f.fileno())
            removed.append(f"{file}: truncated {size - scan.good_end} bytes of torn index tail "
                           f"({'; '.join(p.what for p in scan.problems)})")
        shard_dir = self.path / "shards"
        for f in sorted(shard_dir.iterdir()) if shard_dir.is_dir() else []:
            if not mine(f):
                continue
            if f.name.startswith(".tmp-"):
                why = "temporary file of an interrupted write"
            elif f.suffix in UNSAFE_SUFFIXES:
                why = "pickle-format file; never read"
            elif f"shards/{f.name}" not in referenced and BankProblem(str(f), "").writer not in protected:
                why = "shard with no index rows"
            else:
                continue
            if f.is_dir():
                left.append(f"{f}: a directory among the shards; left as is")
                continue
            f.unlink()
            removed.append(f"{f}: removed ({why})")
        _fsync_dir(shard_dir)
        self.refresh()
        remaining = [str(p) for p in self.problems if mine(p.path)]
        if left or remaining:  # returning normally promises: these writers' files are clean now
            done = f"; removed {len(removed)} other item(s): {' | '.join(removed)}" if removed else ""
            raise MetaditError(f"{self.path}: cannot repair safely: {' | '.join(left or remaining)}{done}")
        return removed

    # ------------------------------------------------------------------ writing
    def _next_seq(self) -> int:
        seqs = [-1]
        for f in (self.path / "shards").glob(f"{self.writer}-*.safetensors"):
            m = re.fullmatch(rf"{re.escape(self.writer)}-(\d+)\.safetensors", f.name)
            if m:
                seqs.append(int(m.group(1)))
        return max(seqs) + 1

    def append(self, diff: LoraDiff, meta: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> str:
        """Append one diff; returns its id."""
        return self.append_many([diff], [meta or {}], dtype=dtype)[0]

    def append_many(
        self, diffs: Sequence[LoraDiff], metas: Sequence[dict[str, Any]], dtype: torch.dtype | None = None
    ) -> list[str]:
        """Append several diffs as one shard (one fsync for all); returns their ids.

        `dtype` stores the factors in another dtype (e.g. bf16 to halve the size); default: as given.
        """
        if self.head is not None:
            raise MetaditError(f"{self.path}[:{self.head}] is a read-only view of the bank; append to {self.path}")
        if len(diffs) != len(metas) or not diffs:
            raise MetaditError("append_many: need as many metadata dicts as diffs, and at least one diff")
        mine = [p for p in self.problems if p.writer == self.writer]
        if mine:
            raise MetaditError(f"{self.path}: torn tail from an interrupted write ({mine[0]}); run `metadit bank repair`")
        for m in metas:
            try:
                json.dumps(m)
            except TypeError as e:
                raise MetaditError(f"append: metadata must be JSON-serializable ({e})") from e
        seq = self._next_seq()
        shard_name = f"{self.writer}-{seq:06d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        rows = []
        for j, (diff, meta) in enumerate(zip(diffs, metas)):
            diff.check_finite(f"append: diff {j}")
            et = _entry_tensors(diff, dtype)
            prefix = f"e{j}"
            tensors.update({f"{prefix}/{k}": t for k, t in et.items()})
            rows.append({
                "id": f"{self.writer}-{seq:06d}-{j}",
                "shard": f"shards/{shard_name}",
                "prefix": prefix,
                "group_size": len(diffs),
                "rank": diff.rank,
                "n_modules": len(diff.modules),
                "dtype": str(et[f"{diff.modules[0]}/A"].dtype).removeprefix("torch."),
                "sha256": entry_checksum(et),
                "meta": meta,
            })
        shard_dir = self.path / "shards"
        tmp = shard_dir / f".tmp-{shard_name}"
        index_file = self.path / "index" / f"{self.writer}.jsonl"
        payload = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, shard_dir / shard_name)
            _fsync_dir(shard_dir)
            with open(index_file, "ab") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            # A failed write (disk full, interrupt) may have left a torn tail. Re-read the bank so that this
            # object sees it too and refuses further appends until `repair`: rows appended after a torn line
            # would otherwise be hidden behind it.
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - never mask the original error
                pass
            raise
        for r in rows:
            self._by_id[r["id"]] = len(self.rows)
            self.rows.append(r)
        return [r["id"] for r in rows]

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[LoraDiff, dict[str, Any]]:
        if not -len(self.rows) <= i < len(self.rows):
            raise IndexError(f"bank index {i} out of range for a bank of {len(self.rows)} diffs")
        row = self.rows[i]
        return self._read(row), dict(row["meta"])

    def __iter__(self) -> Iterator[tuple[LoraDiff, dict[str, Any]]]:
        for i in range(len(self)):
            yield self[i]

    def get(self, entry_id: str) -> tuple[LoraDiff, dict[str, Any]]:
        if entry_id not in self._by_id:
            raise MetaditError(f"{self.path}: no entry with id {entry_id!r}")
        return self[self._by_id[entry_id]]

    def meta(self, i: int) -> dict[str, Any]:
        return dict(self.rows[i]["meta"])

    def _handle(self, shard: str) -> tuple[Any, dict[str, list[str]]]:
        """An open safetensors handle (memory-mapped) plus its keys grouped by entry prefix; LRU-cached."""
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        path = self.path / shard
        try:
            handle = safe_open(str(path), framework="pt")
            keys = list(handle.keys())
        except _READ_ERRORS as e:
            raise MetaditError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from e
        by_prefix: dict[str, list[str]] = {}
        for k in keys:
            prefix, _, rest = k.partition("/")
            by_prefix.setdefault(prefix, []).append(rest)
        self._handles[shard] = (handle, by_prefix)
        if len(self._handles) > 64:
            self._handles.popitem(last=False)
        return handle, by_prefix

    def _read_tensors(self, row: dict[str, Any]) -> dict[str, torch.Tensor]:
        handle, by_prefix = self._handle(row["shard"])
        keys = by_prefix.get(row["prefix"])
        path = self.path / row["shard"]
        if not keys:
            raise MetaditError(f"{path}: entry {row['id']} has no tensors in its shard")
        try:
            return {k: handle.get_tensor(f"{row['prefix']}/{k}") for k in keys}
        except _READ_ERRORS as e:
            raise MetaditError(f"{path}: cannot read entry {row['id']} ({str(e)[:200]})") from e

    def _read(self, row: dict[str, Any]) -> LoraDiff:
        return self._build(row, self._read_tensors(row))

    def _build(self, row: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraDiff:
        """The entry's `LoraDiff`, checked: matching factors, one finite scale per module, finite factors."""
        path = self.path / row["shard"]
        where = f"{path}: entry {row['id']}"
        scale_t = tensors.get(_SCALE_KEY)
        if scale_t is None:
            raise MetaditError(f"{where} lacks its scales")
        if scale_t.dim() != 1 or not scale_t.is_floating_point():
            raise MetaditError(f"{where}: scales have shape {tuple(scale_t.shape)} and dtype {scale_t.dtype}")
        modules = sorted({k.rsplit("/", 1)[0] for k in tensors if k != _SCALE_KEY})
        scales = scale_t.tolist()
        if len(scales) != len(modules):
            raise MetaditError(f"{where} has {len(scales)} scales for {len(modules)} modules")
        try:
            diff = LoraDiff(
                {m: tensors[f"{m}/A"] for m in modules},
                {m: tensors[f"{m}/B"] for m in modules},
                dict(zip(modules, scales)),
                {"bank": str(self.path), "id": row["id"], "base_model": self.base_model["name"]},
            )
        except KeyError as e:
            raise MetaditError(f"{where} lacks tensor {e}") from e
        except MetaditError as e:
            raise MetaditError(f"{where}: {str(e).removeprefix('LoraDiff: ')}") from e
        diff.check_finite(where)
        return diff

    def foreign_files(self) -> list["ForeignFile"]:
        """Every file under the bank directory that is not part of the bank, each marked if it is pickle-format.

        Part of the bank: `bank.json`, the index files, and the shards index rows name. Files `open` already
        reports as a torn tail (in `problems`) are left to that report. Nothing found is read beyond its first
        bytes (to recognise a pickle), and symbolic links are not followed.
        """
        known = {self.path / "bank.json", *self._index_files(), *(self.path / s for s in self._referenced)}
        reported = {Path(p.path) for p in self.problems}
        found = []
        for root, dirs, files in os.walk(self.path, followlinks=False):
            dirs.sort()
            for name in sorted(files) + sorted(d for d in dirs if (Path(root) / d).is_symlink()):
                f = Path(root) / name
                if f in known or f in reported:
                    continue
                found.append(ForeignFile(str(f), pickle_format(f)))
        return found

    def verify(self) -> list[str]:
        """Recompute every entry's checksum; return one line per corrupt or unreadable entry (empty = all good)."""
        bad = []
        for row in self.rows:
            try:
                tensors = self._read_tensors(row)
                try:
                    checksum = entry_checksum(tensors)
                except _READ_ERRORS as e:
                    raise MetaditError(f"cannot checksum its tensors ({str(e)[:200]})") from e
                if checksum != row["sha256"]:
                    bad.append(f"{row['id']} ({row['shard']}): checksum mismatch")
                    continue
                self._build(row, tensors)  # a well-formed entry with finite factors (a checksum can be forged)
            except MetaditError as e:
                bad.append(f"{row['id']} ({row['shard']}): {e}")
        return bad

    def to_dataset(self) -> "datasets.Dataset":  # noqa: F821
        """The metadata index as a `datasets.Dataset`: bank columns plus one column per metadata key."""
        import datasets

        records = []
        for i, r in enumerate(self.rows):
            rec = {"index": i, "id": r["id"], "shard": r["shard"], "rank": r["rank"], "sha256": r["sha256"]}
            rec.update({k: v for k, v in r["meta"].items() if k not in rec})
            records.append(rec)
        try:
            return datasets.Dataset.from_list(records)
        except Exception:  # metadata whose types differ across rows: keep it as JSON text
            return datasets.Dataset.from_list(
                [{**{k: rec[k] for k in ("index", "id", "shard", "rank", "sha256")}, "meta": json.dumps(r["meta"])}
                 for rec, r in zip(records, self.rows)]
            )

    def summary(self) -> dict[str, Any]:
        ranks: dict[int, int] = {}
        for r in self.rows:
            ranks[r["rank"]] = ranks.get(r["rank"], 0) + 1
        size = sum(f.stat().st_size for f in (self.path / "shards").glob("*.safetensors"))
        checked = [r for r in self.rows if "flagged" in r["meta"]]
        passed = sum(not r["meta"]["flagged"] for r in checked)
        return {
            "path": str(self.path),
            "base_model": self.base_model,
            "created": self.header.get("created"),
            "diffs": len(self.rows),
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "writers": [f.stem for f in self._index_files()],
            "shards": len({r["shard"] for r in self.rows}),
            "bytes": size,
            "behaviour_check": (f"{passed}/{len(checked)} passed ({passed / len(checked):.0%}), "
                                f"{len(checked) - passed} flagged") if checked else "not recorded",
            "problems": [str(p) for p in self.problems],
            "info": self.header.get("info", {}),
        }


def open_diff(spec: str | Path) -> tuple[LoraDiff, dict[str, Any], DiffBank | None]:
    """A diff named on a command line: `BANK_DIR:INDEX` (a bank entry: the diff, its metadata and the bank) or
    a peft LoRA adapter directory (the diff, no metadata, no bank). Anything else is one clear error."""
    text = str(spec)
    if ":" in text and not Path(text).exists():
        bank_dir, _, index = text.rpartition(":")
        try:
            i = int(index)
        except ValueError as e:
            raise MetaditError(f"{text}: expected BANK_DIR:INDEX with an integer index, or a peft adapter directory") from e
        bank = DiffBank.open(bank_dir)
        if not 0 <= i < len(bank):
            raise MetaditError(f"{text}: the bank holds {len(bank)} diffs (indices 0..{len(bank) - 1})")
        diff, meta = bank[i]
        return diff, meta, bank
    if not Path(text).is_dir():
        raise MetaditError(f"{text}: no such peft adapter directory (or give BANK_DIR:INDEX)")
    return LoraDiff.from_peft(text), {}, None
