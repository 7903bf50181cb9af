"""``acmix cost`` in-process: text, --json, --csv, --plot, --resolution, errors."""

from __future__ import annotations

import csv
import io
import json
import re

import timm

import acmix.models  # noqa: F401 - registers the model families
from acmix.cli.main import main


def _params(name: str) -> int:
    return sum(p.numel() for p in timm.create_model(name).parameters())


def test_cost_text_table1_and_stage_split(capsys):
    assert main(["cost", "--no-models"]) == 0
    out = capsys.readouterr().out
    assert "multiply-adds" in out and "Table 1" in out
    for formula in ("k^2 C^2 HW", "3 C^2 HW", "2 k_att^2 C HW"):
        assert formula in out
    assert "C=64: 1.96x" in out and "C=512: 15.67x" in out
    # the conv row: the Stage I share of ResNet-50's 3x3 convs, within 1 point of the paper's 99%
    conv = re.search(r"^conv\s+resnet50\s+(?:[\d.]+%\s+){4}([\d.]+)%", out, re.M)
    assert conv is not None and abs(float(conv.group(1)) - 99.0) <= 1.0
    sa = re.search(r"^self_attention_output_res\s+\S+\s+(?:[\d.]+%\s+){4}([\d.]+)%", out, re.M)
    assert sa is not None and abs(float(sa.group(1)) - 83.0) <= 1.5


def test_cost_json_keys_and_rows(capsys):
    assert main(["cost", "--json", "--no-split", "--models", "acmix_resnet26", "resnet26_san"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"table1", "stage_split", "models"} <= set(report)
    assert "multiply-adds" in report["convention"]
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {"acmix_resnet26", "resnet26_san"}
    for name, r in rows.items():
        assert {"name", "params", "macs", "paper_params", "paper_macs"} <= set(r)
        assert r["params"] == _params(name)
        assert r["counter_mismatches"] == 0
        assert abs(r["macs_diff_pct"]) < 5.0  # within 5% of the paper's 2.3 G / 2.4 G
    assert rows["acmix_resnet26"]["role"] == "acmix" and rows["resnet26_san"]["role"] == "baseline"
    assert rows["acmix_resnet26"]["macs"] < rows["resnet26_san"]["macs"]  # the paper: 2.3 G vs 2.4 G


def test_cost_csv_at_another_resolution(capsys):
    assert (
        main(["cost", "--csv", "--no-split", "--no-cross-check", "--models", "resnet26_san", "--resolution", "160"])
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1
    r = rows[0]
    assert r["name"] == "resnet26_san" and r["resolution"] == "160x160"
    assert int(r["params"]) == _params("resnet26_san")
    assert r["macs_diff_pct"] == ""  # the paper's MACs are at 224 x 224: no difference at 160
    assert 0.4 < int(r["macs"]) / int(r["paper_macs"]) < 0.6  # ~ (160 / 224)^2 = 0.51


def test_cost_plot_writes_png(tmp_path, capsys):
    path = tmp_path / "fig4" / "cost.png"
    assert main(["cost", "--no-split", "--no-cross-check", "--models", "resnet26_san", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000  # four panels with points, not an empty canvas
    assert str(path) in capsys.readouterr().err


def test_cost_bad_arguments(capsys):
    assert main(["cost", "--resolution", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resolution" in err[0]
    assert main(["cost", "--json", "--csv"]) == 2  # mutually exclusive
    capsys.readouterr()
    assert main(["cost", "--no-split", "--models", "no_such_model*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model matches no_such_model*" in err[0] and "acmix_resnet50" in err[0]
