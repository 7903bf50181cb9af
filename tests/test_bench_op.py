"""acmix.bench.op and ``acmix bench op`` on tiny shapes: rows are well-formed (no timing assertions)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from acmix.bench import op as bench_op
from acmix.bench.env import PeakMemory, environment
from acmix.cli.main import main


def _groups(**kw):
    args = dict(batch=1, heads=2, kernel=3, subjects=bench_op.SUBJECTS)
    args.update(kw)
    return bench_op.specs_for([(8, 5)], [1, 2], **args)


def test_specs_cover_every_subject_and_runnable_backend():
    groups = _groups()
    assert len(groups) == 2  # one per stride
    group = groups[0]
    attention = [s.backend for s in group if s.subject == "attention"]
    assert attention == bench_op.runnable_backends("cpu", "float32", 8, 2)
    assert "reference" in attention and "flex" not in attention  # flex cannot run on a CPU
    by_subject = {s.subject: s.backend for s in group if s.subject != "attention"}
    assert by_subject == {
        "conv3x3": "-",
        "proj1x1": "-",
        "acmix": bench_op.default_backend("cpu", "float32", 8, 2),
        "acmix-official": "reference",
        "acmix-recompute": bench_op.default_backend("cpu", "float32", 8, 2),
    }


def test_rows_are_well_formed_and_written(tmp_path):
    rows = bench_op.run(_groups(), warmup=1, repeats=2, memory="inprocess", threads=1)
    assert len(rows) == sum(len(g) for g in _groups())
    env = environment("cpu")
    for r in rows:
        assert r.device == "cpu" and r.torch == torch.__version__ and r.dtype == "float32" and r.threads == 1
        assert r.device_name == env["device_name"]
        assert (r.batch, r.channels, r.height, r.width, r.kernel) == (1, 8, 5, 5, 3)
        assert math.isfinite(r.median_ms) and r.median_ms >= r.min_ms > 0 and r.repeats == 2
        assert r.mem_method in ("rss_hwm", "none")
        assert r.peak_mib is None or r.peak_mib >= 0
    assert torch.get_num_threads() != 1 or env["threads"] == 1  # the thread count is restored after the run
    summary = bench_op.summarize(rows)
    assert [s.shape for s in summary] == ["1x8x5x5/s1", "1x8x5x5/s2"]
    assert all(s.speedup_vs_reference is not None and s.layer_vs_proj is not None for s in summary)
    table = bench_op.format_table(rows)
    assert "attention" in table and "acmix-official" in table and "conv3x3" in table
    assert "ref / default time" in bench_op.format_summary(summary)

    with open(bench_op.write_csv(rows, tmp_path / "rows.csv")) as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == len(rows) and set(read[0]) == set(bench_op.ROW_FIELDS)
    doc = json.loads(bench_op.write_json(rows, tmp_path / "rows.json").read_text())
    assert len(doc["rows"]) == len(rows) and len(doc["summary"]) == 2
    png = bench_op.plot(rows, tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    nested = bench_op.write_csv(rows, tmp_path / "missing" / "rows.csv")  # one writer: directories are created
    assert nested.exists() and [f.name for f in nested.parent.iterdir()] == ["rows.csv"]


def test_plot_without_memory_measurements(tmp_path):
    rows = bench_op.run(_groups(subjects=["conv3x3", "proj1x1"]), warmup=0, repeats=1, memory="off", threads=1)
    assert rows and all(r.peak_mib is None and r.mem_method == "off" for r in rows)
    assert bench_op.plot(rows, tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_in_a_fresh_subprocess_reports_a_peak():
    spec = bench_op.OpSpec("attention", "reference", 2, 16, 12, 1, heads=2, kernel=7)
    peak, method = bench_op.measure_memory(spec, "subprocess")
    if method == "none":
        pytest.skip("no /proc/self/clear_refs here")
    assert method == "rss_hwm_subprocess" and peak is not None and peak > 0


def test_peak_memory_probe_sees_an_allocation():
    probe = PeakMemory(torch.device("cpu"))
    probe.start()
    if probe.method == "none":
        pytest.skip("no peak-RSS support here")
    x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    assert probe.peak_mib() >= 48
    del x


def test_bad_arguments():
    with pytest.raises(ValueError, match="shapes must be CxH"):
        bench_op.parse_shapes("64x")
    assert bench_op.parse_shapes("64x56, 128x28") == [(64, 56), (128, 28)]
    with pytest.raises(ValueError, match="unknown subject 'nope'"):
        _groups(subjects=["nope"])
    with pytest.raises(ValueError, match="valid backends"):
        _groups(backends=["nope"])
    with pytest.raises(ValueError, match="divisible by heads"):
        bench_op.specs_for([(6, 5)], [1], heads=4)
    with pytest.raises(ValueError, match="unknown memory mode"):
        bench_op.measure_group(_groups()[0], memory="x")


def test_cli_bench_op(tmp_path, capsys):
    rc = main(
        [
            "bench", "op", "--shapes", "8x4", "--strides", "1", "--batch", "1", "--heads", "2", "--kernel", "3",
            "--repeats", "1", "--warmup", "0", "--memory", "off", "--threads", "1",
            "--subjects", "attention", "proj1x1", "acmix", "--backends", "tiled", "reference",
            "--json", str(tmp_path / "o.json"),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "threads 1" in out and "tiled" in out
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [(r["subject"], r["backend"]) for r in rows] == [
        ("attention", "tiled"),
        ("attention", "reference"),
        ("proj1x1", "-"),
        ("acmix", bench_op.default_backend("cpu", "float32", 4, 2)),
    ]
    assert main(["bench", "op", "--shapes", "8x4", "--backends", "nope"]) == 2
    assert "valid backends" in capsys.readouterr().err
