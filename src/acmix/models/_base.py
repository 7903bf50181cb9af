"""The part of timm's model surface that acmix's own model classes share (SAN, PVT, ACmixMicro).

ResNet and Swin inherit theirs from timm's classes. :class:`NativeModel` holds what the native families would
otherwise each write again: the input check, ``forward``, the weight-decay exemption of ACmix's alpha/beta and the
``Linear`` classifier with its global-pool choices; :class:`StagedModel` adds timm's ``forward_intermediates``
around a family's own loop over its stages (SAN, PVT; ACmixMicro's features come from timm's ``FeatureListNet``).
"""

# no ``from __future__ import annotations``: torch.fx writes forward's annotations into the code it generates, and
# TorchScript cannot resolve them as strings
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices

from ..ops._checks import is_symbolic
from ._registry import build_acmix_model

__all__ = ["NativeModel", "StagedModel", "build_staged_model", "check_global_pool", "mix_scalar_names"]


def mix_scalar_names(model: nn.Module) -> set[str]:
    """Names of ACmix's alpha/beta mix parameters in ``model``: scalars, exempt from weight decay like biases."""
    return {n for n, _ in model.named_parameters() if n.endswith(".alpha") or n.endswith(".beta")}


def check_global_pool(global_pool: str, choices: tuple[str, ...]) -> None:
    """One-line error naming the choices (``'token', 'avg' or ''``) for a pool type not among them."""
    if global_pool not in choices:
        names = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"global_pool must be {names}, got {global_pool!r}")


class NativeModel(nn.Module):
    """Base of acmix's own timm-style classifiers.

    A subclass sets ``in_chans``, ``stages``, ``num_features``, ``num_classes``, ``global_pool`` and a ``head`` (an
    ``nn.Linear`` or ``nn.Identity``; a family with another head overrides :meth:`get_classifier` and
    :meth:`reset_classifier`), and writes ``forward_features`` and ``forward_head``. Class attribute
    ``global_pools``: the pool types its ``forward_head`` knows.
    """

    global_pools: ClassVar[tuple[str, ...]] = ("avg", "")

    if TYPE_CHECKING:  # for mypy only: TorchScript reads class annotations and cannot parse these strings
        in_chans: int
        num_classes: int
        num_features: int
        global_pool: str
        stages: nn.Sequential | nn.ModuleList
        feature_info: list[dict[str, Any]]
        head: nn.Module

        def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

    def min_input_side(self) -> int:
        """The smallest input height and width the model takes (0: any)."""
        return 0

    def _check_input(self, x: torch.Tensor) -> None:
        if is_symbolic(x):
            return
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_side():
            raise ValueError(f"input must be at least {self.min_input_side()} pixels a side, got {tuple(x.shape)}")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """ACmix's alpha/beta mix weights are scalars; like biases and norms they get no weight decay."""
        return mix_scalar_names(self)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new ``Linear`` head (``Identity`` for 0 classes) on the device of the model's parameters."""
        self.num_classes = num_classes
        if global_pool is not None:
            check_global_pool(global_pool, self.global_pools)
            self.global_pool = global_pool
        device = next(self.parameters()).device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class StagedModel(NativeModel):
    """:class:`NativeModel` with timm's ``forward_intermediates`` over ``stages`` (``feature_info``: one entry a
    stage); a subclass writes the loop, :meth:`_intermediates`."""

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage maps (B, feature_info[i]["num_chs"], H / r_i, W / r_i), r_i = feature_info[i]["reduction"], of
        the stages in ``indices``, and the output of ``forward_features`` (timm semantics; with ``stop_early`` the
        last stage run is the last one taken)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stop = max_index + 1 if stop_early else len(self.stages)
        x, intermediates = self._intermediates(x, take_indices, stop, norm)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def _intermediates(
        self, x: torch.Tensor, take_indices: list[int], stop: int, norm: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the first ``stop`` stages: the last output, and the maps of the stages in ``take_indices`` (with
        ``norm``, normalised as the family defines it)."""
        raise NotImplementedError

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one in ``indices`` (timm semantics); the family adapts its head."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self._prune_head(max_index < len(self.feature_info) - 1, prune_norm, prune_head)
        return take_indices

    def _prune_head(self, truncated: bool, prune_norm: bool, prune_head: bool) -> None:
        """After pruning: ``truncated`` (the last stage is gone) sets num_features to the new last stage's width."""
        raise NotImplementedError


def build_staged_model(
    model_cls: type[StagedModel], variant: str, pretrained: bool, default_indices: tuple[int, ...], **kwargs: Any
) -> Any:
    """:func:`build_acmix_model` with timm's ``getter`` features (``features_only`` runs ``forward_intermediates``)
    at ``out_indices`` from the kwargs, else at ``default_indices``."""
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", default_indices), feature_cls="getter")
    return build_acmix_model(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
