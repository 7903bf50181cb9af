"""The prepared GPU run (benchmarks/gpu_all.sh, gpu_check.py, gpu_models.py) dry-run on the CPU: arguments, the
correctness machinery, its fail-fast exit, and the issue-12 target table. Nothing is timed or asserted on speed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from acmix.bench.model import Ratio

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load("gpu_check")
gpu_models = _load("gpu_models")


def test_gpu_check_correctness_dry_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--correctness-only", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["correctness"]
    ran = {(r["op"], r["backend"]) for r in rows if r["status"] == "ok"}
    assert {("attention", "tiled"), ("attention", "offset"), ("aggregate", "offset")} <= ran
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows)
    assert "correctness:" in capsys.readouterr().out


def test_gpu_check_fails_fast_on_a_wrong_backend(monkeypatch, tmp_path, capsys):
    """A backend that disagrees with the reference stops the run with CORRECTNESS FAILED and exit 1."""
    real = gpu_check.local_attention_reference
    monkeypatch.setattr(gpu_check, "local_attention_reference", lambda *a: real(*a) + 0.5)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "CORRECTNESS FAILED" in text and "nothing timed" in text
    report = json.loads(out.read_text())
    assert "bench" not in report and any(r["status"] == "FAIL" for r in report["correctness"])


def test_gpu_scripts_without_cuda_say_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert gpu_check.main([]) == 2
    assert gpu_models.main([]) == 0
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


def test_model_targets_are_evaluated_from_the_ratios():
    ratios = [
        Ratio("acmix_resnet50", "resnet50_san", "train", 1.4, 1.35, None, None),
        Ratio("acmix_resnet26", "resnet26_san", "infer", 1.2, 1.0, None, None),
    ]
    rows = [
        SimpleNamespace(model="san10", mode="train", variant="baseline", latency_ms=90.0, batch=64),
        SimpleNamespace(model="resnet50_san", mode="train", variant="baseline", latency_ms=30.0, batch=64),
    ]
    got = {t["target"]: (round(t["value"], 3), t["met"]) for t in gpu_models.evaluate_targets(rows, ratios)}
    assert got == {
        "acmix_resnet50 train time / baseline": (1.4, True),
        "acmix_resnet50 train memory / baseline": (1.35, False),
        "acmix_resnet26 infer time / baseline": (1.2, True),
        "san10 train / resnet50 train": (3.0, False),
    }
    assert "MISSED" in gpu_models.format_targets(gpu_models.evaluate_targets(rows, ratios))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_all_sh_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_all.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (BENCH / "gpu_all.sh").read_text()
    assert "CORRECTNESS FAILED" in text and "--backend triton" in text


def test_compare_models_extra_backend_variant():
    """``extra_backends`` adds an interleaved ``acmix-<name>`` row with that backend forced (same weights)."""
    from acmix.bench.config import BenchConfig
    from acmix.bench.model import compare_models

    cfg = BenchConfig(batch=2, resolution=16, warmup=1, repeats=1, num_classes=10, threads=1)
    rows = compare_models(
        ["acmix_micro"], cfg, modes=("infer",), baseline=False, reference=False, memory="off", extra_backends=["offset"]
    )
    assert [(r.variant, r.backend) for r in rows] == [("acmix", rows[0].backend), ("acmix-offset", "offset")]
    assert rows[0].backend.startswith("attn:") and rows[1].params_m == rows[0].params_m
