"""Registering and building acmix models in timm's registry without touching what timm already has.

timm's ``register_model`` warns and *overwrites* on a duplicate name. :func:`register_acmix_model` refuses instead,
so importing ``acmix`` can never replace a timm model, and it files the entry under ``acmix.<module>`` so that
``timm.list_models(module="resnet")`` still lists only timm's ResNets.

Use in a family module (``default_cfgs`` must be defined above the entrypoints, as in timm)::

    default_cfgs = generate_default_cfgs({"acmix_foo": acmix_cfg(first_conv="stem.conv", classifier="fc")})

    def _create_foo(variant: str, pretrained: bool = False, **kwargs) -> Foo:
        return build_acmix_model(Foo, variant, pretrained, **kwargs)

    acmix_foo = acmix_entrypoint(_create_foo, "acmix_foo", "ACmix-Foo: Foo with depth 3.", depth=3)

:func:`acmix_entrypoint` writes the usual three-line timm entrypoint (``def acmix_foo(pretrained=False, **kwargs)``
merging the caller's kwargs over the variant's architecture arguments) and registers it with
:func:`register_acmix_model`, so a family lists its variants as a table, one line each.
:func:`build_acmix_model` is timm's ``build_model_with_cfg`` with acmix's safe loading of user-supplied weight
files; :func:`list_models` lists the zoo (every name registered here, and the timm baselines it is compared with).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import timm
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import _registry as _timm_registry
from timm.models import register_model as _timm_register_model

from ._loading import get_checkpoint_filter

__all__ = [
    "ACMIX_ENTRYPOINTS",
    "PAPER",
    "acmix_cfg",
    "acmix_entrypoint",
    "build_acmix_model",
    "list_models",
    "register_acmix_model",
]

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=nn.Module)

#: names registered by acmix (in registration order)
ACMIX_ENTRYPOINTS: list[str] = []

#: paper metadata shared by every acmix pretrained cfg
PAPER = {
    "paper_ids": "arXiv:2111.14556",
    "paper_name": "On the Integration of Self-Attention and Convolution",
    "origin_url": "https://github.com/LeapLabTHU/ACmix",
}


def acmix_cfg(*, paper: bool = True, **kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg for an acmix model: ImageNet eval defaults, paper metadata, no weight URL.

    ``first_conv`` and ``classifier`` must be given; any other :class:`timm.models.PretrainedCfg` field may be.
    The official recipes evaluate at Resize 256 -> CenterCrop 224 (crop_pct 0.875). ``paper=False``: a model of
    this project's own (``acmix_micro``), without the paper's metadata.
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
        **(PAPER if paper else {}),
    }
    cfg.update(kwargs)
    return cfg


def register_acmix_model(fn: F) -> F:
    """timm's ``register_model``, refusing names timm already has and filing the entry under ``acmix.<module>``."""
    name = fn.__name__
    if name in _timm_registry._model_entrypoints and name not in ACMIX_ENTRYPOINTS:
        existing = _timm_registry._model_entrypoints[name]
        raise RuntimeError(
            f"acmix would overwrite timm model {name!r} ({existing.__module__}); acmix models need unique names"
        )
    _timm_register_model(fn)
    short = fn.__module__.split(".")[-1]
    label = f"acmix.{short}"
    if _timm_registry._model_to_module.get(name) == short and short != label:
        _timm_registry._model_to_module[name] = label
        _timm_registry._module_to_models[short].discard(name)
        if not _timm_registry._module_to_models[short]:
            del _timm_registry._module_to_models[short]
        _timm_registry._module_to_models[label].add(name)
    if name not in ACMIX_ENTRYPOINTS:
        ACMIX_ENTRYPOINTS.append(name)
    return fn


def acmix_entrypoint(create: Callable[..., M], name: str, summary: str, **model_args: Any) -> Callable[..., M]:
    """Register the timm entrypoint ``name(pretrained=False, **kwargs)`` of one variant and return it.

    Args:
        create: the family's builder, ``create(variant, pretrained=..., **kwargs)``; the entrypoint is filed under
            its module (which must define ``default_cfgs`` first, as for ``register_model``).
        name: the registered model name.
        summary: what the variant is; the docstring adds the paper table's numbers where it has a row for ``name``
            (:data:`acmix.models.PAPER_TABLE`, ACmix variants and their baselines).
        **model_args: the architecture arguments that define the variant; the caller's kwargs override them.
    """

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> M:
        return create(name, pretrained=pretrained, **dict(model_args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = create.__module__
    entrypoint.__doc__ = f"{summary}{_paper_numbers(name)}."
    if "return" in create.__annotations__:  # the family's model class, as a hand-written entrypoint would declare
        entrypoint.__annotations__["return"] = create.__annotations__["return"]
    return register_acmix_model(entrypoint)


def _paper_numbers(name: str) -> str:
    from ._meta import PAPER_TABLE

    for row in PAPER_TABLE:
        if name == row.name:
            return f"; paper: {row.params_m} M params, {row.gmacs} GMACs, {row.top1} % top-1"
        if name == row.baseline:
            b = (row.baseline_params_m, row.baseline_gmacs, row.baseline_top1)
            return "; the paper's baseline: {} M params, {} GMACs, {} % top-1".format(*b)
    return ""


def list_models(
    filter: str | Iterable[str] = "*",
    *,
    exclude_filters: str | Iterable[str] = "",
    all_timm: bool = False,
) -> list[str]:
    """Registered model names matching ``filter`` (shell wildcards, as :func:`timm.list_models`), sorted as timm does.

    Args:
        filter: a wildcard pattern or several; ``"*"`` (default) matches every name.
        exclude_filters: patterns whose matches are left out.
        all_timm: search every model timm knows instead of acmix's zoo.

    Returns:
        By default the acmix zoo: every model acmix registers (the ACmix variants, ``acmix_micro`` and the baselines
        acmix re-implements: ``resnet26_san``, ``san10``, ``pvt_tiny``...) and the timm models the paper compares with
        (``swin_tiny_patch4_window7_224``, ``swin_small_patch4_window7_224``, from :data:`acmix.models.PAPER_TABLE`).
    """
    names = timm.list_models(filter, exclude_filters=exclude_filters)
    if all_timm:
        return names
    from ._meta import PAPER_TABLE

    zoo = set(ACMIX_ENTRYPOINTS) | {row.baseline for row in PAPER_TABLE}
    return [n for n in names if n in zoo]


_SOURCE_KEYS = ("file", "url")


def build_acmix_model(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    **kwargs: Any,
) -> Any:
    """``timm.models.build_model_with_cfg`` with acmix's safe loading of ``file``/``url`` weight sources.

    Args:
        model_cls: the model class (should inherit :class:`OfficialWeightsMixin`; its filter is looked up with
            :func:`get_checkpoint_filter`).
        variant: registered model name (its ``default_cfgs`` entry supplies the pretrained cfg).
        pretrained: load weights (from ``pretrained_cfg_overlay=dict(file=...)``; acmix ships no URLs).
        **kwargs: everything ``build_model_with_cfg`` takes (``feature_cfg``, ``pretrained_cfg_overlay``...) and
            the model's own arguments.
    """
    from timm.models import build_model_with_cfg

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if hasattr(model_cls, "load_pretrained") and any(overlay.get(k) for k in _SOURCE_KEYS):
        overlay.setdefault("custom_load", True)
    pcfg = kwargs.get("pretrained_cfg")
    if isinstance(pcfg, Mapping) and any(pcfg.get(k) for k in _SOURCE_KEYS) and hasattr(model_cls, "load_pretrained"):
        kwargs["pretrained_cfg"] = {**pcfg, "custom_load": pcfg.get("custom_load", True)}
    filter_fn = kwargs.pop("pretrained_filter_fn", None) or (
        get_checkpoint_filter(model_cls) if isinstance(model_cls, type) else None
    )
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_cfg_overlay=overlay or None,
        pretrained_filter_fn=filter_fn,
        **kwargs,
    )
