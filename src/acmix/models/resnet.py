"""ResNet-26/38/50 in the SAN/SASA layout, with a 3 x 3 convolution or ACmix as the bottleneck's spatial mixer.

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556); the ResNet variant
follows the released ``ResNet/ResNet_ImageNet.py`` of LeapLabTHU/ACmix (written anew): torchvision v1.5 bottleneck
(stride on the 3 x 3 position), 7 x 7/2 stem + 3 x 3/2 max-pool, widths 64/128/256/512, expansion 4, depths
[1, 2, 4, 1] / [2, 3, 5, 2] / [3, 4, 6, 3] (docs/official-code.md); ACmix replaces the bottleneck's 3 x 3 conv by
``ACmix(width, width, stride=s)``.

The class is timm's :class:`timm.models.resnet.ResNet` with a bottleneck whose spatial mixer is one argument
(``attn_layer="conv" | "acmix"``, the same switch as every acmix family), so baseline and ACmix differ in exactly
that, and every timm feature (features_only, forward_intermediates, grad checkpointing, drop_path_rate...) works.
``resnet50_san`` is architecturally timm's ``resnet50``: their state dicts are interchangeable. Official
``ACmix_ResNet`` state dicts load through :func:`checkpoint_filter_fn`.

Deviations (docs/deviations.md): ``zero_init_last`` is off (the official code does not zero-init residual BNs);
Kaiming init is applied per projection of the fused q/k/v conv, reproducing the official three separate convs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.resnet import Bottleneck as _TimmBottleneck
from timm.models.resnet import ResNet as _TimmResNet

from ..layers import ACmix
from ..layers.acmix import convert_official_state_dict
from ._loading import OfficialWeightsMixin, register_checkpoint_filter
from ._registry import acmix_cfg, acmix_entrypoint, build_acmix_model

__all__ = ["MIXERS", "MixerBottleneck", "ResNet", "checkpoint_filter_fn"]

#: spatial mixers the bottleneck accepts (the model's ``attn_layer``)
MIXERS = ("conv", "acmix")


class MixerBottleneck(_TimmBottleneck):
    """timm's (torchvision v1.5) bottleneck whose 3 x 3 position is a convolution or an ACmix layer.

    Args:
        inplanes, planes, stride, downsample: as in :class:`timm.models.resnet.Bottleneck`.
        mixer: ``"conv"`` (3 x 3 convolution, the plain bottleneck) or ``"acmix"`` (``ACmix(width, width, stride)``);
            the model's ``attn_layer`` (timm's bottleneck already has an ``attn_layer``: the attention after it).
        mixer_kwargs: keyword arguments for :class:`acmix.ACmix` (the model's ``acmix_kwargs``).
        **kwargs: the remaining :class:`timm.models.resnet.Bottleneck` arguments.

    Shape:
        input (B, inplanes, H, W) -> output (B, 4 * planes, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        mixer: str = "conv",
        mixer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, **kwargs)
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        self.mixer = mixer
        if mixer == "acmix":
            conv = self.conv2
            assert isinstance(conv, nn.Conv2d)
            if conv.groups != 1 or conv.dilation != (1, 1) or not isinstance(self.aa, nn.Identity):
                raise ValueError(
                    "mixer='acmix' needs cardinality 1, dilation 1 (output_stride 32) and no anti-aliasing, got "
                    f"groups={conv.groups}, dilation={conv.dilation}, aa={type(self.aa).__name__}"
                )
            layer = ACmix(conv.in_channels, conv.out_channels, stride=stride, **(mixer_kwargs or {}))
            self.conv2 = layer.to(device=conv.weight.device, dtype=conv.weight.dtype)  # type: ignore[assignment]


def _kaiming(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


class ResNet(OfficialWeightsMixin, _TimmResNet):
    """SAN/SASA-layout ResNet whose bottleneck mixer is a 3 x 3 convolution or ACmix.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        attn_layer: the bottleneck's spatial mixer, ``"conv"`` (baseline ResNet) or ``"acmix"`` (ACmix-ResNet).
        acmix_kwargs: forwarded to every :class:`acmix.ACmix` (e.g. ``{"mix": "attn"}`` for a pure local
            self-attention ResNet, ``{"shift_init": True}`` to keep the paper's shift initialisation).
        zero_init_last: zero-init the last BN of each block (timm's default; off here as in the official code).
        **kwargs: any other :class:`timm.models.resnet.ResNet` argument (``num_classes``, ``in_chans``,
            ``drop_path_rate``, ``global_pool``...).

    Initialisation follows the released code: ``kaiming_normal_(fan_out, relu)`` on every convolution weight,
    including inside ACmix (q, k and v each as its own C x C conv, the position conv, the FC and the group conv, whose
    shift initialisation is thereby overwritten). ``acmix_kwargs={"shift_init": True}`` keeps the shift kernels.

    Shape:
        input (B, in_chans, H, W) -> logits (B, num_classes); features (B, 2048, ceil(H / 32), ceil(W / 32)).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        attn_layer: str = "conv",
        acmix_kwargs: dict[str, Any] | None = None,
        *,
        zero_init_last: bool = False,
        block: type[nn.Module] = MixerBottleneck,
        block_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if attn_layer not in MIXERS:
            raise ValueError(f"attn_layer must be one of {MIXERS}, got {attn_layer!r}")
        acmix_kwargs = dict(acmix_kwargs or {})
        self.keep_shift_init = bool(acmix_kwargs.pop("shift_init", False))
        acmix_kwargs["shift_init"] = self.keep_shift_init
        block_args = dict(block_args or {}, mixer=attn_layer, mixer_kwargs=acmix_kwargs)
        self.attn_layer = attn_layer
        super().__init__(
            block=block,  # type: ignore[arg-type]
            layers=tuple(layers),
            zero_init_last=zero_init_last,
            block_args=block_args,
            **kwargs,
        )

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's ResNet init (Kaiming fan_out on every Conv2d), then the official init of each ACmix layer."""
        super().init_weights(zero_init_last=zero_init_last)
        with torch.no_grad():
            for m in self.modules():
                if not isinstance(m, ACmix):
                    continue
                for w in m.qkv.weight.chunk(3, dim=0):  # official: three separate C x C convs (fan_out = C)
                    _kaiming(w)
                if m.shift_weight is not None and m.shift_weight.requires_grad:
                    if getattr(self, "keep_shift_init", False):
                        from ..ops import shift_kernels

                        m.shift_weight.copy_(shift_kernels(m.conv_kernel_size).expand_as(m.shift_weight))
                    else:
                        _kaiming(m.shift_weight)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None: the released ResNet recipe decays every parameter, alpha and beta included (docs/recipes.md)."""
        return set()


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official ``ACmix_ResNet`` (or torchvision/timm/SAN ResNet) state dict onto :class:`ResNet`.

    Only the ACmix layers have other names in the official code (conv1/conv2/conv3/conv_p/fc/dep_conv/rate1/rate2);
    they are rewritten to this library's names. A ``'module.'`` prefix is removed.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    for name, module in model.named_modules():
        if isinstance(module, ACmix):
            convert_official_state_dict(state, f"{name}.", module)
    return state


register_checkpoint_filter(ResNet, checkpoint_filter_fn)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    model: ResNet = build_acmix_model(ResNet, variant, pretrained, **kwargs)
    return model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return acmix_cfg(first_conv="conv1", classifier="fc", interpolation="bilinear", **kwargs)


_SAN_NOTE = "ResNet baseline of SAN/ACmix (Zhao et al. CVPR 2020, SAN recipe); architecture of timm's resnet"

default_cfgs = generate_default_cfgs(
    {
        "acmix_resnet26": _cfg(),
        "acmix_resnet38": _cfg(),
        "acmix_resnet50": _cfg(),
        "resnet26_san": _cfg(description=_SAN_NOTE),
        "resnet38_san": _cfg(description=_SAN_NOTE),
        "resnet50_san": _cfg(description=_SAN_NOTE),
    }
)

_DEPTHS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}


_entry = partial(acmix_entrypoint, _create)

acmix_resnet26 = _entry("acmix_resnet26", "ACmix-ResNet-26 (depths 1, 2, 4, 1)", layers=_DEPTHS[26], attn_layer="acmix")
acmix_resnet38 = _entry("acmix_resnet38", "ACmix-ResNet-38 (depths 2, 3, 5, 2)", layers=_DEPTHS[38], attn_layer="acmix")
acmix_resnet50 = _entry("acmix_resnet50", "ACmix-ResNet-50 (depths 3, 4, 6, 3)", layers=_DEPTHS[50], attn_layer="acmix")
resnet26_san = _entry("resnet26_san", "ResNet-26 (depths 1, 2, 4, 1)", layers=_DEPTHS[26], attn_layer="conv")
resnet38_san = _entry("resnet38_san", "ResNet-38 (depths 2, 3, 5, 2)", layers=_DEPTHS[38], attn_layer="conv")
resnet50_san = _entry("resnet50_san", "ResNet-50 (timm's resnet50 architecture)", layers=_DEPTHS[50], attn_layer="conv")
