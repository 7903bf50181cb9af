"""``--compile`` of ``acmix train`` and ``acmix bench model``: the whole model goes through torch.compile.

Inductor on this CPU takes minutes (acmix_micro: ~160 s to compile two training steps on 2 cores), so the default
tests swap torch.compile for its ``aot_eager`` backend (the same Dynamo + AOTAutograd tracing, no code generation)
and record the call; the real Inductor run is a ``slow`` test.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from acmix.bench import BenchConfig, time_train_step
from acmix.cli.main import main
from acmix.train import checkpoint as ckpt

FAST = ["--no-progress", "--threads", "1"]


@pytest.fixture
def compile_calls(monkeypatch):
    """torch.compile with backend="aot_eager" and fullgraph=True (a graph break fails the test); records calls."""
    calls: list[str] = []
    real = torch.compile

    def fake(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real(model, backend="aot_eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", fake)
    return calls


def test_train_compile_flag_compiles_the_model_and_saves_bare_weights(tmp_path, compile_calls, capsys):
    run = tmp_path / "run"
    assert main(["train", "--compile", "--max-steps", "2", "--output", str(run), *FAST]) == 0
    assert compile_calls and "2 updates" in capsys.readouterr().out
    state = ckpt.load_state(run / "last.state.pt")
    assert state["config"]["compile"] is True
    keys = load_file(str(run / "last.safetensors"))
    assert keys and not any("_orig_mod" in k for k in keys)  # checkpoints hold the bare model


def test_train_without_compile_does_not_compile(tmp_path, compile_calls):
    assert main(["train", "--max-steps", "1", "--output", str(tmp_path / "run"), *FAST]) == 0
    assert compile_calls == []


def test_bench_compile_compiles_every_model(compile_calls):
    cfg = BenchConfig(batch=2, resolution=16, warmup=1, repeats=1, num_classes=10, threads=1, compile=True)
    row = time_train_step("acmix_micro", cfg, measure_memory=False)
    assert row.compiled is True and compile_calls


@pytest.mark.slow
def test_train_compile_with_inductor(tmp_path, capsys):
    assert main(["train", "--compile", "--max-steps", "2", "--output", str(tmp_path / "run"), *FAST]) == 0
    assert "2 updates" in capsys.readouterr().out
