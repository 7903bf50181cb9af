"""Safe checkpoint reading and official-checkpoint loading (acmix.models._loading).

Official files are built here from their documented layout (docs/official-code.md, checkpoints): training states
with a yacs ``CfgNode`` (emulated: yacs is not installed), an ``argparse.Namespace``, numpy scalars and ``module.``
prefixes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from _official_models import save_with_fake_yacs, swin_training_state
from acmix.models import (
    LoadReport,
    extract_state_dict,
    load_official_checkpoint,
    read_checkpoint,
    register_checkpoint_filter,
)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_reads_official_swin_training_state_without_yacs(tmp_path):
    assert "yacs" not in sys.modules
    weights = {"layers.0.blocks.0.attn.rate1": torch.tensor([0.5]), "head.weight": torch.randn(3, 4)}
    save_with_fake_yacs(
        lambda cfg: swin_training_state(weights, cfg, {"DATA": cfg({"IMG": 224})}), tmp_path / "swin.pth"
    )
    obj = read_checkpoint(tmp_path / "swin.pth")
    assert "yacs" not in sys.modules  # nothing imported yacs
    assert obj["config"]["MODEL"]["TYPE"] == "swin_acmix"
    assert obj["max_accuracy"] == pytest.approx(81.9)
    state = extract_state_dict(obj)
    assert set(state) == set(weights) and torch.equal(state["head.weight"], weights["head.weight"])


def test_reads_pvt_namespace_and_san_module_prefix(tmp_path):
    torch.save({"model": {"head.weight": torch.ones(2)}, "args": argparse.Namespace(lr=5e-4)}, tmp_path / "pvt.pth")
    obj = read_checkpoint(tmp_path / "pvt.pth")
    assert obj["args"].lr == 5e-4
    san = {"epoch": 100, "state_dict": {"module.conv_in.weight": torch.ones(1), "module.fc.bias": torch.zeros(2)}}
    torch.save(san, tmp_path / "san.pth")
    assert set(extract_state_dict(read_checkpoint(tmp_path / "san.pth"))) == {"conv_in.weight", "fc.bias"}


def test_refuses_code_execution_and_does_not_run_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"a": torch.ones(1)}, "x": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refusing to read .*evil\.pth.*system"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_refuses_code_hidden_inside_a_config_node(tmp_path):
    marker = tmp_path / "pwned"
    save_with_fake_yacs(
        lambda cfg: {"model": {"a": torch.ones(1)}, "config": cfg({"X": _Evil(marker)})}, tmp_path / "e.pth"
    )
    with pytest.raises(ValueError, match="refusing"):
        read_checkpoint(tmp_path / "e.pth")
    assert not marker.exists()


def test_truncated_corrupt_empty_and_missing_files(tmp_path):
    torch.save({"model": {"a": torch.randn(1000)}}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all" * 10)
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("trunc.pth", "junk.pth", "empty.pth"):
        with pytest.raises(ValueError, match=name):
            read_checkpoint(tmp_path / name)
    safetensors.torch.save_file({"a": torch.randn(100)}, str(tmp_path / "w.safetensors"))
    blob = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(blob[:-50])
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.pth")


def test_safetensors_detected_by_content(tmp_path):
    safetensors.torch.save_file({"a": torch.arange(3.0)}, str(tmp_path / "w.bin"))
    assert torch.equal(read_checkpoint(tmp_path / "w.bin")["a"], torch.arange(3.0))


def test_extract_state_dict_errors():
    with pytest.raises(ValueError, match="top-level keys: epoch, optimizer"):
        extract_state_dict({"epoch": 1, "optimizer": {"state": {}}})
    with pytest.raises(ValueError, match="expected a state dict"):
        extract_state_dict([torch.ones(1)])


class _Tiny(nn.Module):
    def __init__(self, num_classes: int = 3, in_chans: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 4, 1)
        self.fc = nn.Linear(4, num_classes)
        self.pretrained_cfg = {"architecture": "tiny", "first_conv": "stem", "classifier": "fc"}


def _rename(state: dict, model: nn.Module) -> dict:
    return {k.replace("old_stem", "stem"): v for k, v in state.items()}


register_checkpoint_filter(_Tiny, _rename)


def test_load_official_checkpoint_maps_adapts_and_reports(tmp_path):
    src = _Tiny()
    official = {f"module.{k.replace('stem', 'old_stem')}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": official, "epoch": 3}, tmp_path / "o.pth")
    dst = _Tiny()
    report = load_official_checkpoint(dst, tmp_path / "o.pth")
    assert isinstance(report, LoadReport)
    assert (report.loaded, report.renamed, report.missing, report.unexpected) == (4, 2, [], [])
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # another number of classes: the classifier is dropped (timm's rule), the rest loads
    other = _Tiny(num_classes=7)
    report = load_official_checkpoint(other, tmp_path / "o.pth")
    assert sorted(report.missing) == ["fc.bias", "fc.weight"] and "classifier" in report.summary()
    assert torch.equal(other.stem.weight, src.stem.weight)
    # another number of input channels: the first conv is adapted (timm's adapt_input_conv)
    gray = _Tiny(in_chans=1)
    load_official_checkpoint(gray, tmp_path / "o.pth")
    assert torch.allclose(gray.stem.weight, src.stem.weight.sum(1, keepdim=True))


def test_load_official_checkpoint_refuses_wrong_architecture(tmp_path):
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)])

    torch.save(Other().state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"100 unexpected .*\(\+94 more\).*another architecture") as err:
        load_official_checkpoint(_Tiny(), tmp_path / "other.pth")
    assert len(str(err.value)) < 1000  # a summary, not thousands of lines
    wrong = {"stem.weight": torch.ones(4, 2, 3, 3), "stem.bias": torch.ones(4)}
    with pytest.raises(ValueError, match="other shapes"):
        load_official_checkpoint(_Tiny(), wrong)
    report = load_official_checkpoint(_Tiny(), {"stem.bias": torch.ones(4)}, strict=False)
    assert report.loaded == 1 and len(report.missing) == 3
