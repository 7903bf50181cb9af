from __future__ import annotations

import json
import subprocess
import sys

from acmix.cli.main import main


def test_info_text_and_json(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "reference" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["default_backend_cpu"] in [b["name"] for b in info["backends"]]


def test_demo_runs(capsys):
    assert main(["demo", "--size", "9", "--stride", "2"]) == 0
    out = capsys.readouterr().out
    assert "output (2, 64, 5, 5)" in out


def test_bad_arguments_exit_2_with_one_line(capsys):
    assert main(["demo", "--channels", "30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "divisible by num_heads" in err[0]
    assert main(["no-such-command"]) == 2
    assert main([]) == 2


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "acmix", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("acmix ")
