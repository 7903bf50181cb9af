"""The user surface: ``acmix.create_model`` / ``acmix.list_models`` over timm, and the top-level exports."""

from __future__ import annotations

import pytest
import timm
import torch

import acmix
from acmix.models import PAPER_TABLE, ACmixMicro
from acmix.models._registry import ACMIX_ENTRYPOINTS


def test_every_exported_name_exists_and_every_acmix_layer_is_exported():
    for name in acmix.__all__:
        assert hasattr(acmix, name), name
    for layer in ("ACmix", "ACmixSanAttention", "ACmixSpatialReductionAttention", "ACmixWindowAttention"):
        assert issubclass(getattr(acmix, layer), acmix.ConvPathMixin), layer
    assert issubclass(acmix.ACmixSwinBlock, timm.models.swin_transformer.SwinTransformerBlock)
    with acmix.use_backend(attention="reference"):
        assert acmix.ops.current_backend("attention") == "reference"


def test_list_models_is_the_zoo_by_default():
    zoo = acmix.list_models()
    paper = {r.name for r in PAPER_TABLE} | {r.baseline for r in PAPER_TABLE}
    assert paper <= set(zoo) and "acmix_micro" in zoo
    assert set(zoo) == set(ACMIX_ENTRYPOINTS) | paper  # and nothing else of timm's
    assert "resnet50" not in zoo and "resnet50" in acmix.list_models("resnet50", all_timm=True)
    assert zoo == sorted(zoo, key=zoo.index) and zoo == timm.list_models(zoo)  # timm's order
    assert acmix.list_models("acmix_swin*") == [
        "acmix_swin_small_patch4_window7_224",
        "acmix_swin_tiny_patch4_window7_224",
    ]
    assert acmix.list_models("acmix_*", exclude_filters="*swin*") == [
        n for n in acmix.list_models("acmix_*") if "swin" not in n
    ]


def test_acmix_micro_is_registered_like_every_family():
    assert "acmix_micro" in ACMIX_ENTRYPOINTS
    assert "acmix_micro" in timm.list_models(module="acmix.micro")
    assert "acmix_micro" not in timm.list_models(module="micro")


def test_create_model_passes_arguments_to_timm_and_names_an_unknown_model():
    model = acmix.create_model("acmix_micro", num_classes=3, in_chans=1).eval()
    assert isinstance(model, ACmixMicro)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"unknown model 'acmix_mirco'; see acmix.list_models\(\)"):
        acmix.create_model("acmix_mirco")
