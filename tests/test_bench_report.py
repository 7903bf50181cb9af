"""acmix.bench.report: the one table formatter and the one atomic writer that the op and model benchmarks share."""

from __future__ import annotations

import pytest

from acmix.bench import report


def test_columns_align_and_fmt_marks_missing_values():
    table = report.columns(("name", "ms"), [("a", report.fmt(1.234, ".1f")), ("long name", report.fmt(None, ".1f"))])
    head, rule, first, second = table.splitlines()
    assert head.startswith("name       ms") and rule == "---------  ---"
    assert first == "a          1.2" and second == "long name  -"
    assert report.fmt(2.0, ".2f", "x") == "2.00x" and report.fmt(None, ".2f", "x") == "-"


def test_ratio_is_none_when_a_side_is_missing_or_not_positive():
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(None, 2.0) is None and report.ratio(3.0, None) is None and report.ratio(3.0, 0.0) is None


def test_atomic_write_keeps_the_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "deep" / "out.txt"
    report.atomic_write(target, lambda tmp: tmp.write_text("first"))
    assert target.read_text() == "first"

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        report.atomic_write(target, broken)
    assert target.read_text() == "first"
    assert [f.name for f in target.parent.iterdir()] == ["out.txt"]
