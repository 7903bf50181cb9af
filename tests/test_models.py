"""Every model of the paper's table (``acmix.models.PAPER_TABLE``) and its baseline, as timm models.

Parametrised over the table's names that are registered (ACmix variants and baselines of every family). Default
tests use small inputs; full-size (224 x 224) multiply-add counts are behind the ``slow`` marker.

Golden outputs (tests/expect/<name>.json) catch silent numerical drift of a seeded model on a seeded input;
regenerate them only on purpose with ``ACMIX_ACCEPT=1 pytest tests/test_models.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import acmix  # noqa: F401  (registers the models)
from acmix.models import PAPER_TABLE, paper_row

EXPECT = Path(__file__).parent / "expect"
ACCEPT = os.environ.get("ACMIX_ACCEPT") == "1"

#: small input side per family for the default tests
SMALL = {"resnet": 32, "swin": 32, "san": 64, "pvt": 64}

ACMIX_NAMES = [row.name for row in PAPER_TABLE if timm.is_model(row.name)]
BASELINES = [row.baseline for row in PAPER_TABLE if timm.is_model(row.baseline)]
ALL_NAMES = ACMIX_NAMES + BASELINES
#: the smallest variant of each family (and its baseline) runs by default, the larger ones behind ``slow``
FAST = {
    name
    for family in {r.family for r in PAPER_TABLE}
    for row in [next(r for r in PAPER_TABLE if r.family == family)]
    for name in (row.name, row.baseline)
}


def _params(names: list[str]) -> list:
    return [pytest.param(n, id=n, marks=() if n in FAST else pytest.mark.slow) for n in names]


def _family(name: str) -> str:
    return paper_row(name).family


def _kwargs(name: str) -> dict:
    # timm's own Swin baselines fix the input size by default; the acmix variants accept any size already
    return {"strict_img_size": False} if name.startswith("swin_") else {}


_CACHE: dict[str, nn.Module] = {}


def built(name: str) -> nn.Module:
    """A fresh copy of the default model (1000 classes), initialised from seed 0; built once per session and worker.

    A copy, so that a test that trains (BatchNorm statistics) or edits the model cannot change another's result.
    """
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = timm.create_model(name, **_kwargs(name))
    return copy.deepcopy(_CACHE[name])


def small_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    side = SMALL[_family(name)]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- registry
def test_paper_models_are_registered():
    families = {row.family for row in PAPER_TABLE}
    for family in families:
        module = "acmix.models." + family
        if importlib.util.find_spec(module) is None:
            continue  # that family's module is not part of this checkout
        for row in (r for r in PAPER_TABLE if r.family == family):
            assert timm.is_model(row.name), row.name
            assert timm.is_model(row.baseline), row.baseline
            assert row.name in timm.list_models("acmix*")


def test_importing_acmix_changes_no_timm_model():
    """A fresh interpreter: timm's registry before and after ``import acmix`` (entrypoints and pretrained cfgs)."""
    code = (
        "import json, timm\n"
        "from timm.models import _registry as r\n"
        "def snap():\n"
        "    return {n: [f.__module__, f.__qualname__, r._model_to_module.get(n),"
        " repr(r._model_pretrained_cfgs.get(n))] for n, f in r._model_entrypoints.items()}\n"
        "mods = {m: sorted(v) for m, v in r._module_to_models.items()}\n"
        "before = snap()\n"
        "import acmix\n"
        "after = snap()\n"
        "changed = [n for n in before if after.get(n) != before[n]]\n"
        "mods_after = {m: sorted(v) for m, v in r._module_to_models.items() if m in mods}\n"
        "new = sorted(set(after) - set(before))\n"
        "print(json.dumps({'changed': changed, 'modules_changed': mods_after != mods, 'new': new}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["changed"] == [] and not result["modules_changed"]
    assert set(ACMIX_NAMES) <= set(result["new"])


def test_registry_refuses_to_overwrite_a_timm_model():
    from acmix.models import register_acmix_model

    def resnet50(pretrained: bool = False, **kwargs):  # same name as timm's
        raise AssertionError("never built")

    with pytest.raises(RuntimeError, match="would overwrite timm model 'resnet50'"):
        register_acmix_model(resnet50)
    assert timm.models._registry._model_entrypoints["resnet50"].__module__ == "timm.models.resnet"


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("name", _params(ALL_NAMES))
def test_forward_backward(name):
    model = built(name)
    model.train()
    x = small_input(name)
    out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    model.zero_grad(set_to_none=True)
    out.logsumexp(1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == [], f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", _params(ALL_NAMES))
def test_eval_determinism_and_golden(name):
    model = built(name).eval()
    x = small_input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        out, again = model.forward_head(feats), model(x)
        pre = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(out, again, atol=0, rtol=0)
    assert pre.shape == (2, model.num_features)
    summary = {
        "input": list(x.shape),
        "logits_head": [[round(v, 6) for v in row] for row in out[:, :8].tolist()],
        "logits_mean": out.mean(1).tolist(),
        "logits_std": out.std(1).tolist(),
        "pre_logits_mean": pre.mean(1).tolist(),
    }
    path = EXPECT / f"{name}.json"
    if ACCEPT or not path.exists():
        if not ACCEPT:
            pytest.fail(f"no golden output {path.name}; create it with ACMIX_ACCEPT=1")
        EXPECT.mkdir(exist_ok=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")
        assert path.stat().st_size <= 50_000
        return
    expected = json.loads(path.read_text())
    assert expected["input"] == summary["input"]
    for key in ("logits_head", "logits_mean", "logits_std", "pre_logits_mean"):
        ref, got = torch.tensor(expected[key]), torch.tensor(summary[key])
        torch.testing.assert_close(got, ref, atol=1e-4 + 1e-4 * float(ref.abs().max()), rtol=1e-3, msg=key)


@pytest.mark.parametrize("name", _params(ALL_NAMES))
def test_features_only(name):
    side = SMALL[_family(name)]
    torch.manual_seed(0)
    feats_model = timm.create_model(name, features_only=True, **_kwargs(name)).eval()
    info = feats_model.feature_info
    with torch.no_grad():
        feats = feats_model(torch.randn(1, 3, side, side))
    assert len(feats) == len(info.channels())
    nhwc = getattr(built(name), "output_fmt", "NCHW") == "NHWC"
    for f, chs, red in zip(feats, info.channels(), info.reduction()):
        c, h = (f.shape[-1], f.shape[1]) if nhwc else (f.shape[1], f.shape[2])
        assert c == chs and h == -(-side // red), (tuple(f.shape), chs, red)
    assert info.reduction()[-1] == 32


@pytest.mark.parametrize("name", _params(ACMIX_NAMES))
def test_timm_api(name):
    model = copy.deepcopy(built(name)).eval()
    x = small_input(name)
    # grad checkpointing gives the same output
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    model.set_grad_checkpointing(False)
    # no_weight_decay names real parameters
    params = dict(model.named_parameters())
    assert all(n in params for n in model.no_weight_decay())
    # reset_classifier, get_classifier
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    # group_matcher covers every parameter (timm's layer-decay optimiser needs it)
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in grouped.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("name", _params(ACMIX_NAMES))
def test_constructor_overrides(name):
    side = SMALL[_family(name)]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, in_chans=1, drop_path_rate=0.2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, side, side)).shape == (1, 5)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2, rel=1e-6)
    assert model.pretrained_cfg["architecture"] == name
    for key in ("input_size", "crop_pct", "mean", "std", "first_conv", "classifier", "paper_ids", "license"):
        assert key in model.pretrained_cfg, key


# ---------------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("row", [r for r in PAPER_TABLE if timm.is_model(r.name)], ids=lambda r: r.name)
def test_parameter_counts_against_the_paper(row):
    got = n_params(built(row.name)) / 1e6
    if row.released_params_m is not None:  # the released code's count, to its two decimals
        assert got == pytest.approx(row.released_params_m, abs=0.006)
    # within 3% of the paper, plus half its rounding step (README counts of PVT and Swin are whole millions)
    assert abs(got - row.params_m) <= row.params_tolerance_m()
    if timm.is_model(row.baseline):
        base = n_params(built(row.baseline)) / 1e6
        if row.baseline_released_params_m is not None:
            assert base == pytest.approx(row.baseline_released_params_m, abs=0.006)
        assert abs(base - row.baseline_params_m) <= 0.03 * row.baseline_params_m + 0.05


def count_macs(model: nn.Module, side: int = 224) -> float:
    """Multiply-adds (G) of one image: FlopCounterMode / 2, plus the ACmix local-attention aggregation
    (2 k^2 C per output pixel: logits and weighted sum, Table 1), which runs as elementwise ops."""
    from torch.utils.flop_counter import FlopCounterMode

    from acmix import ACmix
    from acmix.ops import use_backend

    extra = []

    def hook(mod, inputs, out):
        if mod.mix != "conv":
            extra.append(2 * mod.attn_kernel_size**2 * out.shape[1] * out.shape[2] * out.shape[3])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ACmix)]
    counter = FlopCounterMode(display=False)
    try:  # the reference attention runs as elementwise ops (not counted); fast backends add tiling overheads
        with use_backend(attention="reference"), torch.no_grad(), counter:
            model.eval()(torch.randn(1, 3, side, side))
    finally:
        for h in handles:
            h.remove()
    return (counter.get_total_flops() / 2 + sum(extra)) / 1e9


@pytest.mark.slow
@pytest.mark.parametrize("row", [r for r in PAPER_TABLE if timm.is_model(r.name)], ids=lambda r: r.name)
def test_macs_against_the_paper(row):
    """acmix.analysis.walk's count (SAN rows in SAN's own counter convention, docs/paper-numbers.md) against the
    paper, and for ResNet/Swin against the released code (conv paths priced as FC + group conv, as it runs them) and
    against an independent FlopCounterMode count."""
    from acmix.analysis import walk

    san = row.family == "san"
    got = walk(built(row.name), 224, elementwise=san).macs / 1e9
    assert abs(got - row.gmacs) <= 0.03 * row.gmacs + 0.05, got  # the paper gives one decimal
    if row.released_gmacs is not None:
        released = walk(built(row.name), 224, conv_impl="reference").macs / 1e9
        assert released == pytest.approx(row.released_gmacs, rel=0.01)
    if row.family in ("resnet", "swin"):
        assert count_macs(built(row.name)) == pytest.approx(walk(built(row.name), 224).macs / 1e9, rel=0.02)
    if timm.is_model(row.baseline):
        base = walk(built(row.baseline), 224, elementwise=san).macs / 1e9
        assert abs(base - row.baseline_gmacs) <= 0.03 * row.baseline_gmacs + 0.05, base
