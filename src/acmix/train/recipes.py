"""Named training recipes from docs/recipes.md, selectable with ``--recipe NAME``.

Each recipe is a mapping of :class:`~acmix.train.config.TrainConfig` fields; flags and ``--config`` YAML override
it field by field. ``lr`` is the base lr for ``lr_base_size`` images per step; the trainer scales it linearly by
the global batch (batch_size x grad_accum_steps x world_size), as the official scripts do.

Sources (docs/recipes.md): the paper's own recipe text was not found; these are the released/base-repo recipes.

- ``resnet``: ResNet-ACmix released script (LeapLabTHU/ACmix ``ResNet/main.py``): SGD momentum 0.9, wd 1e-4 on
  all parameters, lr 0.1 at batch 256 (the script's defaults), 90 epochs, cosine per iteration, 5-epoch linear
  warmup from lr/4, label smoothing 0.1, RandomResizedCrop 224 + flip, eval Resize 256 -> CenterCrop 224.
- ``san``: SAN baselines (hszhao/SAN): SGD momentum 0.9, wd 1e-4, lr 0.1 at batch 256, 100 epochs, cosine without
  warmup, label smoothing 0.1, no mixup.
- ``pvt``: PVT (whai362/PVT ``classification``): AdamW eps 1e-8, lr 5e-4 x batch/512, wd 0.05, 300 epochs, cosine,
  5 warmup epochs from 1e-6, min lr 1e-5, drop path 0.1, RandAugment rand-m9-mstd0.5-inc1, color jitter 0.4,
  bicubic, random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1, no grad clip.
- ``swin``: Swin-ACmix released configs: AdamW eps 1e-8, lr 5e-4 x batch/512, wd 0.05 (not on 1-D params), 300
  epochs, 20 warmup epochs from 5e-7, min lr 5e-6, cosine per iteration, grad clip 5.0, drop path 0.2 (T; 0.3 for
  S: pass ``--drop-path 0.3``), RandAugment rand-m9-mstd0.5-inc1, color jitter 0.4, random erasing 0.25, mixup 0.8,
  cutmix 1.0 (switch 0.5, batch mode), label smoothing 0.1, bicubic, eval 256 -> 224 (crop_pct 0.875).
- ``digits``: the embedded default (acmix_micro on scikit-learn's digits), equal to the TrainConfig defaults.

Deviations: repeated augmentation (PVT) is not implemented; the ResNet script's label smoothing puts eps/(K-1) on
non-targets while timm's puts eps/K (a 1/K difference in the smoothed mass, recorded in docs/deviations.md).
"""

from __future__ import annotations

import difflib
from typing import Any

__all__ = ["RECIPES", "get_recipe", "list_recipes"]

_IMAGENET_EVAL = dict(input_size=224, crop_pct=0.875)

#: what the ResNet script and SAN share, one concern a line: SGD momentum with wd on all parameters at lr 0.1 for batch
#: 256; cosine to 0; label smoothing and flips only; bilinear
_SGD_CNN: dict[str, Any] = {
    **dict(opt="momentum", momentum=0.9, wd_all_params=True, lr=0.1, lr_base_size=256, weight_decay=1e-4),
    **dict(sched="cosine", min_lr=0.0),
    **dict(smoothing=0.1, mixup=0.0, cutmix=0.0, aa=None, color_jitter=0.0, reprob=0.0, hflip=0.5),
    **dict(interpolation="bilinear", batch_size=32, **_IMAGENET_EVAL),
}

#: what PVT and Swin share (the DeiT recipe), one concern a line: AdamW at lr 5e-4 for batch 512; 300 cosine epochs;
#: label smoothing, mixup / cutmix, RandAugment, random erasing; bicubic
_ADAMW_VIT: dict[str, Any] = {
    **dict(opt="adamw", opt_eps=1e-8, lr=5e-4, lr_base_size=512, weight_decay=0.05),
    **dict(epochs=300, sched="cosine"),
    **dict(smoothing=0.1, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.25),
    **dict(remode="pixel", interpolation="bicubic", batch_size=128, **_IMAGENET_EVAL),
}

RECIPES: dict[str, dict[str, Any]] = {
    "resnet": dict(_SGD_CNN, epochs=90, warmup_epochs=5, warmup_lr=0.025),  # warmup from lr / 4 at the base batch
    "san": dict(_SGD_CNN, epochs=100, warmup_epochs=0),
    "pvt": dict(_ADAMW_VIT, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, drop_path=0.1, clip_grad=None),
    "swin": {
        **dict(_ADAMW_VIT, warmup_epochs=20, warmup_lr=5e-7, min_lr=5e-6, drop_path=0.2, clip_grad=5.0),
        **dict(mixup_switch_prob=0.5, mixup_mode="batch", recount=1),
    },
    "digits": dict(),
}
"""Recipe name -> the :class:`~acmix.train.config.TrainConfig` fields it sets (sources in the module docstring)."""


def list_recipes() -> list[str]:
    """The names of the recipes, sorted."""
    return sorted(RECIPES)


def get_recipe(name: str) -> dict[str, Any]:
    """The override mapping of recipe ``name``; unknown names raise ValueError with close matches."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r} (choose from {', '.join(list_recipes())}){hint}")
    return dict(RECIPES[name])
