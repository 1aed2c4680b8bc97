"""scripts/suite_timing.py: the like-for-like ratio counts only tests both suites have and both passed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import load_script


def _load():
    return load_script("suite_timing")


def _xml(path: Path, cases: list[tuple[str, float, str | None]]) -> Path:
    body = "".join(f'<testcase classname="tests.test_a" name="{n}" time="{t}">{f"<{s}/>" if s else ""}</testcase>'
                   for n, t, s in cases)
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_common_ratio_and_whole_totals(tmp_path):
    st = _load()
    old = _xml(tmp_path / "old.xml", [("a", 10.0, None), ("b", 4.0, None), ("gone", 3.0, None), ("bad", 1.0, "failure")])
    new = _xml(tmp_path / "new.xml", [("a", 11.0, None), ("b", 2.0, None), ("added", 7.0, None), ("bad", 9.0, None)])
    r = st.compare(old, new)
    # common and passed in both: a, b ("bad" failed in the old run)
    assert r["common"] == {"tests": 2, "old_s": 14.0, "new_s": 13.0, "ratio": round(13 / 14, 3)}
    assert r["whole"] == {"old_s": 18.0, "old_tests": 4, "new_s": 29.0, "new_tests": 4, "ratio": round(29 / 18, 3)}
    assert (r["only_old"], r["only_new"]) == (1, 1)
    assert r["most_slower_common"][0] == {"test": "tests.test_a::a", "old_s": 10.0, "new_s": 11.0}


def test_unreadable_or_empty_file_is_one_clear_error(tmp_path):
    st = _load()
    empty = _xml(tmp_path / "empty.xml", [])
    with pytest.raises(SystemExit, match="holds no test cases"):
        st.compare(empty, empty)
    with pytest.raises(SystemExit, match="cannot read JUnit XML"):
        st.compare(tmp_path / "missing.xml", empty)
