"""Registering acmix models in timm's registry without touching what timm already has.

timm's ``register_model`` warns and *overwrites* on a duplicate name. :func:`register_acmix_model` refuses instead,
so importing ``acmix`` can never replace a timm model, and it files the entry under ``acmix.<module>`` so that
``timm.list_models(module="resnet")`` still lists only timm's ResNets.

Use in a family module (``default_cfgs`` must be defined above the entrypoints, as in timm)::

    default_cfgs = generate_default_cfgs({"acmix_foo": acmix_cfg(first_conv="stem.conv", classifier="fc")})

    @register_acmix_model
    def acmix_foo(pretrained: bool = False, **kwargs) -> Foo:
        return build_acmix_model(Foo, "acmix_foo", pretrained, **dict(dict(depth=3), **kwargs))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import _registry
from timm.models import register_model as _timm_register_model

__all__ = ["ACMIX_ENTRYPOINTS", "PAPER", "acmix_cfg", "register_acmix_model"]

F = TypeVar("F", bound=Callable[..., Any])

#: names registered by acmix (in registration order)
ACMIX_ENTRYPOINTS: list[str] = []

#: paper metadata shared by every acmix pretrained cfg
PAPER = {
    "paper_ids": "arXiv:2111.14556",
    "paper_name": "On the Integration of Self-Attention and Convolution",
    "origin_url": "https://github.com/LeapLabTHU/ACmix",
}


def acmix_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg for an acmix model: ImageNet eval defaults, paper metadata, no weight URL.

    ``first_conv`` and ``classifier`` must be given; any other :class:`timm.models.PretrainedCfg` field may be.
    The official recipes evaluate at Resize 256 -> CenterCrop 224 (crop_pct 0.875).
    """
    if "first_conv" not in kwargs or "classifier" not in kwargs:
        raise ValueError("acmix_cfg needs first_conv and classifier")
    cfg: dict[str, Any] = {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "apache-2.0",
        **PAPER,
    }
    cfg.update(kwargs)
    return cfg


def register_acmix_model(fn: F) -> F:
    """timm's ``register_model``, refusing names timm already has and filing the entry under ``acmix.<module>``."""
    name = fn.__name__
    if name in _registry._model_entrypoints and name not in ACMIX_ENTRYPOINTS:
        existing = _registry._model_entrypoints[name]
        raise RuntimeError(
            f"acmix would overwrite timm model {name!r} ({existing.__module__}); acmix models need unique names"
        )
    _timm_register_model(fn)
    short = fn.__module__.split(".")[-1]
    label = f"acmix.{short}"
    if _registry._model_to_module.get(name) == short and short != label:
        _registry._model_to_module[name] = label
        _registry._module_to_models[short].discard(name)
        if not _registry._module_to_models[short]:
            del _registry._module_to_models[short]
        _registry._module_to_models[label].add(name)
    if name not in ACMIX_ENTRYPOINTS:
        ACMIX_ENTRYPOINTS.append(name)
    return fn
