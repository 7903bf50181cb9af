"""acmix.bench (config, runner, switch, memory, profiling, model) and ``acmix bench model`` on tiny models (no timing
assertions)."""

from __future__ import annotations

import csv
import json
import logging
import math

import pytest
import torch
import torch.nn as nn

from acmix.bench import model as bench_model
from acmix.bench.config import RESULT_FIELDS, BenchConfig, BenchResult
from acmix.bench.memory import measure_memory_subprocess
from acmix.bench.runner import BenchCase, is_oom_error, time_inference, time_interleaved, time_train_step
from acmix.bench.switch import acmix_layers, set_host_attention
from acmix.layers import ACmix
from acmix.ops import current_backend

TINY = BenchConfig(batch=4, resolution=12, warmup=1, repeats=2, num_classes=10, threads=1)


class Tiny(nn.Module):
    """Stem conv, one ACmix layer (or a 3 x 3 conv for the baseline), pooled linear head."""

    def __init__(self, use_acmix: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = ACmix(8, num_heads=2, attn_kernel_size=3) if use_acmix else nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.stem(x).relu()).mean((2, 3)))


class OOMAbove(nn.Module):
    """Wraps a model; batches larger than ``limit`` raise like an exhausted allocator."""

    def __init__(self, inner: nn.Module, limit: int, cpu_style: bool = False) -> None:
        super().__init__()
        self.inner, self.limit, self.cpu_style = inner, limit, cpu_style
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            if self.cpu_style:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def _factory(name: str) -> nn.Module:
    return {"tiny_acmix": lambda: Tiny(True), "tiny_base": lambda: Tiny(False)}[name]()


def _check_row(row: BenchResult, mode: str, batch: int) -> None:
    assert tuple(row.to_dict()) == RESULT_FIELDS
    assert row.mode == mode and row.batch == batch and row.requested_batch >= batch
    assert row.device == "cpu" and row.device_name and row.torch_version == torch.__version__
    assert row.acmix_version and row.threads == 1 and row.dtype == "float32" and row.resolution == TINY.resolution
    assert row.memory_format == "contiguous" and row.compiled is False
    assert row.repeats == TINY.repeats and row.warmup == TINY.warmup and row.steps_per_repeat == 1
    assert row.latency_min_ms <= row.latency_ms <= row.latency_max_ms and row.latency_min_ms > 0
    assert math.isclose(row.images_per_s, row.batch / (row.latency_ms / 1e3), rel_tol=1e-9)
    assert row.params_m > 0
    if row.mem_method == "none":
        assert row.peak_mem_mib is None
    else:
        assert row.mem_method == "rss_hwm" and row.peak_mem_mib is not None and row.peak_mem_mib >= 0


def test_rows_are_well_formed_for_train_and_inference():
    train = time_train_step(Tiny(), TINY, name="tiny")
    infer = time_inference(Tiny(False), TINY)
    _check_row(train, "train", 4)
    _check_row(infer, "infer", 4)
    assert train.model == "tiny" and infer.model == "Tiny"
    assert train.backend.startswith("attn:") and train.backend.endswith("+conv:fused") and infer.backend == "none"
    assert train.oom_halvings == 0 and train.note == ""
    assert torch.get_num_threads() >= 1  # restored after the measurement


def test_training_step_updates_the_weights_and_frees_the_gradients():
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    time_train_step(model, TINY)
    after = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(p.grad is None for p in after)


def test_forced_backend_reaches_every_acmix_layer_and_selects_the_official_conv_path(monkeypatch):
    model = Tiny()
    (layer,) = acmix_layers(model)
    seen = []
    forward = layer.forward

    def spy(x):
        seen.append((current_backend("attention"), layer.resolved_conv_impl()))
        return forward(x)

    monkeypatch.setattr(layer, "forward", spy)
    row = time_train_step(model, BenchConfig(**{**TINY.__dict__, "backend": "reference"}))
    assert row.backend == "reference"
    assert seen and set(seen) == {("reference", "reference")}
    assert layer.backend is None and layer.conv_impl is None  # a context, not module state
    assert set_host_attention(Tiny(False), "reference") == 0
    with pytest.raises(ValueError, match="valid backends"):
        time_inference(Tiny(), BenchConfig(**{**TINY.__dict__, "backend": "no-such-backend"}))


@pytest.mark.parametrize("cpu_style", [False, True])
def test_out_of_memory_halves_the_batch_and_says_so(caplog, cpu_style):
    model = OOMAbove(Tiny(), limit=3, cpu_style=cpu_style)
    with caplog.at_level(logging.WARNING, logger="acmix.bench.runner"):
        row = time_train_step(model, BenchConfig(**{**TINY.__dict__, "batch": 16}))
    assert row.batch == 2 and row.requested_batch == 16 and row.oom_halvings == 3
    assert "halved 3x" in row.note and "requested 16" in row.note
    assert model.seen[:4] == [16, 8, 4, 2] and set(model.seen[3:]) == {2}
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 3


def test_out_of_memory_at_batch_one_and_other_errors_propagate():
    with pytest.raises(torch.OutOfMemoryError):
        time_inference(OOMAbove(Tiny(), limit=0), TINY)
    seen = OOMAbove(Tiny(), limit=100)
    seen.inner = None  # type: ignore[assignment]  # calling None: a TypeError, not an out-of-memory error
    with pytest.raises(TypeError):
        time_inference(seen, TINY)
    assert seen.seen == [4]  # no retry with a smaller batch
    assert is_oom_error(torch.OutOfMemoryError("x")) and not is_oom_error(RuntimeError("shape mismatch"))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="int8")
    with pytest.raises(ValueError, match="memory_format"):
        BenchConfig(memory_format="nhwc")
    with pytest.raises(ValueError, match="batch"):
        BenchConfig(batch=0)
    assert BenchConfig(dtype="bf16").dtype == "bfloat16"


def test_bfloat16_autocast_and_channels_last_run():
    cfg = BenchConfig(**{**TINY.__dict__, "dtype": "bf16", "memory_format": "channels_last"})
    row = time_train_step(Tiny(), cfg)
    assert row.dtype == "bfloat16" and row.memory_format == "channels_last" and row.latency_ms > 0


def test_interleaved_rows_keep_order_labels_and_repeats():
    cases = [
        BenchCase("tiny_base", Tiny(False), TINY, "baseline", "tiny_acmix"),
        BenchCase("tiny_acmix", Tiny(), TINY, "acmix", "tiny_acmix"),
    ]
    rows = time_interleaved(cases, "infer")
    assert [(r.model, r.variant, r.group) for r in rows] == [
        ("tiny_base", "baseline", "tiny_acmix"),
        ("tiny_acmix", "acmix", "tiny_acmix"),
    ]
    for r in rows:
        _check_row(r, "infer", 4)
    odd = BenchCase("x", Tiny(), BenchConfig(**{**TINY.__dict__, "repeats": 3}))
    with pytest.raises(ValueError, match="share repeats"):
        time_interleaved([cases[0], odd], "train")


def test_comparison_rows_ratios_and_outputs(tmp_path):
    seen: list[list[BenchResult]] = []
    rows = bench_model.compare_models(
        ["tiny_acmix"],
        TINY,
        modes=("train", "infer"),
        factory=_factory,
        baselines={"tiny_acmix": "tiny_base"},
        memory="inprocess",
        on_rows=seen.append,
    )
    assert [len(x) for x in seen] == [3, 3] and [r for x in seen for r in x] == rows
    assert [(r.mode, r.variant, r.model) for r in rows] == [
        (m, v, n)
        for m in ("train", "infer")
        for v, n in (("baseline", "tiny_base"), ("acmix", "tiny_acmix"), ("acmix-reference", "tiny_acmix"))
    ]
    assert {r.group for r in rows} == {"tiny_acmix"}
    assert [r.backend for r in rows[:3]] == ["none", rows[1].backend, "reference"] and rows[1].backend != "reference"
    ratios = bench_model.compute_ratios(rows)
    assert [(q.model, q.baseline, q.mode) for q in ratios] == [
        ("tiny_acmix", "tiny_base", "train"),
        ("tiny_acmix", "tiny_base", "infer"),
    ]
    base, mine, ref = rows[:3]
    expect = (mine.latency_ms / mine.batch) / (base.latency_ms / base.batch)
    assert ratios[0].time_vs_baseline == pytest.approx(expect)
    assert ratios[0].reference_time_vs_acmix == pytest.approx(ref.latency_ms / mine.latency_ms)

    table = bench_model.format_table(rows)
    assert table.count("tiny_acmix") == 4 and "acmix-reference" in table
    assert "x" in bench_model.format_ratios(ratios) and "threads" in bench_model.format_environment(rows)

    with open(bench_model.write_csv(rows, tmp_path / "out" / "rows.csv")) as fh:
        back = list(csv.DictReader(fh))
    assert len(back) == 6 and tuple(back[0]) == RESULT_FIELDS and back[2]["backend"] == "reference"
    doc = json.loads(bench_model.write_json(rows, tmp_path / "rows.json", ratios).read_text())
    assert len(doc["rows"]) == 6 and doc["ratios"][1]["mode"] == "infer"
    png = bench_model.plot_bars(rows, tmp_path / "bars.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files


def test_comparison_without_baseline_or_acmix_layers_measures_the_model_alone():
    rows = bench_model.compare_models(["tiny_base"], TINY, factory=_factory, baselines={}, memory="off")
    assert [(r.variant, r.group, r.peak_mem_mib) for r in rows] == [("", "tiny_base", None)]
    q = bench_model.compute_ratios(rows)[0]
    assert q.baseline is None and q.time_vs_baseline is None and q.reference_time_vs_acmix is None
    with pytest.raises(ValueError, match="memory"):
        bench_model.compare_models(["tiny_base"], TINY, factory=_factory, memory="subprocess")
    with pytest.raises(ValueError, match="mode"):
        bench_model.compare_models(["tiny_base"], TINY, modes=("eval",), factory=_factory)


def test_subprocess_memory_of_a_registered_model(monkeypatch):
    cfg = BenchConfig(batch=2, resolution=32, warmup=1, repeats=1, num_classes=10, threads=1)
    peak, method = measure_memory_subprocess("resnet10t", "train", cfg, timeout=300)
    assert method == "rss_hwm_subprocess" and peak is not None and peak > 0
    monkeypatch.setattr("sys.executable", "false")  # a child that dies: no number, the reason instead
    peak, why = measure_memory_subprocess("resnet10t", "train", cfg, timeout=300)
    assert peak is None and why.startswith("subprocess failed (exit 1)")


def test_cli_bench_model_in_process(tmp_path, capsys):
    from acmix.cli.main import main

    argv = ["bench", "model", "resnet10t", "--resolution", "32", "--batch", "2", "--warmup", "1", "--repeats", "1"]
    argv += ["--threads", "1", "--num-classes", "10", "--memory", "off", "--mode", "infer", "train"]
    argv += ["--csv", str(tmp_path / "r.csv"), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "resnet10t" in out and "infer" in out and "train" in out and out.count("wrote") == 3
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [(r["model"], r["mode"]) for r in doc["rows"]] == [("resnet10t", "infer"), ("resnet10t", "train")]
    assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r.csv").read_text().startswith("model,mode")


def test_cli_bench_model_errors_are_one_line(capsys):
    from acmix.cli.main import main

    assert main(["bench", "model", "no_such_model_xyz", "--memory", "off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model" in err[0]
    assert main(["bench", "model", "resnet10t", "--dtype", "int8"]) == 2
    assert "dtype" in capsys.readouterr().err


def test_profile_step_lists_the_ops_of_a_training_step():
    from acmix.bench.profiling import profile_step

    table = profile_step(Tiny(), "train", TINY, row_limit=50)
    assert "aten::convolution_backward" in table and "Self CPU" in table


class ContextSpy(Tiny):
    """Records the aggregation backend the ops context asks for while it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = current_backend("aggregate")
        return super().forward(x)


def test_reference_variant_forces_the_reference_ops_only_during_its_steps(monkeypatch):
    import os

    monkeypatch.delenv("ACMIX_AGGREGATE_BACKEND", raising=False)
    before = dict(os.environ)
    model = ContextSpy()
    time_inference(model, BenchConfig(**{**TINY.__dict__, "backend": "reference"}))
    assert model.seen == "reference" and current_backend("aggregate") is None
    assert dict(os.environ) == before  # no environment mutation
    time_inference(model, TINY)
    assert model.seen is None


def test_timm_peers_are_measured_beside_their_convolutional_twin():
    import timm

    from acmix.bench.model import PEER_BASELINES, baseline_of
    from acmix.models import PAPER_TABLE

    assert baseline_of("halonet26t") == "resnet26t"
    assert baseline_of("acmix_resnet26") == next(r.baseline for r in PAPER_TABLE if r.name == "acmix_resnet26")
    assert baseline_of("resnet26") is None
    for peer, twin in PEER_BASELINES.items():
        assert timm.is_model(peer) and timm.is_model(twin), (peer, twin)
