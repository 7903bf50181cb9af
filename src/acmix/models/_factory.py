"""``create_model``: timm's factory for the acmix zoo, with a one-line error for an unknown name."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

__all__ = ["create_model"]


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered model by name: :func:`timm.create_model` once acmix's zoo is registered.

    Args:
        model_name: any name timm knows (``acmix.list_models()`` lists the acmix zoo), with an optional
            ``.tag``.
        pretrained: load weights; acmix ships no weight URLs, so pass a file as timm does:
            ``pretrained_cfg_overlay=dict(file=PATH)`` (an official checkpoint or a safetensors file).
        **kwargs: the model's own arguments (``num_classes``, ``in_chans``, ``drop_path_rate``, ``acmix_kwargs``...)
            and timm's (``features_only``, ``pretrained_cfg_overlay``...).

    Raises:
        ValueError: ``model_name`` is not registered.
    """
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model {model_name!r}; see acmix.list_models() or `acmix models`")
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
