"""Reading official checkpoints safely and loading them into the acmix models.

Three layers, each usable alone:

* :func:`read_checkpoint` turns a file into Python objects without executing anything from it: safetensors, or
  ``torch.load(weights_only=True)`` with a short, scoped allowlist for what the official training scripts pickle
  beside the weights (``argparse.Namespace``, numpy scalars, and yacs ``CfgNode``, which is read as an inert
  ``OrderedDict`` so yacs need not be installed). Any other global (``os.system`` in a malicious
  ``__reduce__``, say) is refused by PyTorch's weights-only unpickler before it can run.
* :func:`extract_state_dict` finds the weights inside a training state (``'model'``, ``'state_dict'``) and strips
  ``module.`` / ``_orig_mod.`` prefixes.
* :func:`load_official_checkpoint` maps them onto a built model with the family's ``checkpoint_filter_fn``,
  adapts the classifier and first conv the way timm does, and returns a :class:`LoadReport`.

timm's standard path, ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``, reaches
the same code: :func:`acmix.models._registry.build_acmix_model` marks a user-supplied ``file``/``url`` as
``custom_load`` so that timm calls the model's ``load_pretrained`` (from :class:`OfficialWeightsMixin`) instead of its
own ``torch.load``, which refuses the yacs ``CfgNode`` of the official Swin checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "CheckpointFilter",
    "InertConfig",
    "LoadReport",
    "OfficialWeightsMixin",
    "extract_state_dict",
    "get_checkpoint_filter",
    "load_official_checkpoint",
    "read_checkpoint",
    "register_checkpoint_filter",
]

_logger = logging.getLogger(__name__)

#: ``fn(state_dict, model) -> state_dict``: timm's signature for mapping foreign keys onto a model
CheckpointFilter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]

PathLike = str | os.PathLike[str]


class InertConfig:
    """Stand-in for configuration classes pickled inside official training states (yacs ``CfgNode``).

    Unpickling "creates" one by calling ``__new__``, which returns a plain ``OrderedDict``: the items land in it
    and the node's private flags in its ``__dict__``. Nothing of yacs is imported or run.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict[Any, Any]:  # type: ignore[misc]
        init = args[0] if args and isinstance(args[0], Mapping) else {}
        return OrderedDict(init)


#: dotted names of config classes that official checkpoints pickle, read as :class:`InertConfig`
INERT_CONFIG_CLASSES = ("yacs.config.CfgNode",)


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars and dtypes (metrics saved as numpy floats): data constructors only, no code."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out: list[Any] = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                out.append(getattr(dtypes, name))
    return out


def _safe_globals() -> list[Any]:
    extra: list[Any] = [argparse.Namespace, *_numpy_safe_globals()]
    extra += [(InertConfig, name) for name in INERT_CONFIG_CLASSES]
    return extra


#: lines of PyTorch's weights-only refusal that name what was refused
_REFUSAL = re.compile(r"GLOBAL|global|Unsupported|unsupported|reduce|allowlist|blocked|Can only")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= size - 8


def read_checkpoint(path: PathLike) -> Any:
    """Read a checkpoint file into Python objects without executing code from it.

    Args:
        path: a ``.safetensors`` file, or a ``torch.save`` file (zip or legacy format): a state dict or a whole
            training state (official Swin: ``'model'``, ``'optimizer'``, ``'lr_scheduler'``, yacs ``'config'``...;
            PVT/DeiT: ``'model'`` and an ``argparse.Namespace`` under ``'args'``; SAN: ``'state_dict'``...).

    Returns:
        What was saved, on the CPU (yacs ``CfgNode`` objects become ``OrderedDict``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty, truncated or corrupt, or its pickle needs a global that is not allowed
            (code that would run on loading); the message names the file and the refused global.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise ValueError(f"cannot read checkpoint {p}: the file is empty")
    if _is_safetensors(p):
        from .._safetensors import ChecksumError, loads

        try:
            return loads(p.read_bytes())
        except ChecksumError as exc:
            raise ValueError(f"cannot read safetensors file {p}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"cannot read safetensors file {p}: truncated or corrupt ({exc})") from None
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        refusal = [ln for ln in lines if _REFUSAL.search(ln) and "documentation" not in ln]
        if refusal:
            detail = refusal[0].removeprefix("WeightsUnpickler error:").strip()
            raise ValueError(
                f"refusing to read {p}: its pickle asks for something acmix does not allow ({detail}). "
                "acmix never executes code from a checkpoint; if you trust this file, load it yourself with "
                "torch.load(weights_only=False) and pass the object on."
            ) from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cannot read checkpoint {p}: truncated or corrupt ({first})") from None
    except FileNotFoundError:
        raise
    except Exception as exc:  # a damaged pickle or zip raises almost anything (IndexError, MemoryError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot read checkpoint {p}: truncated or corrupt ({type(exc).__name__}: {first[:200]})"
        ) from None


_STATE_KEYS = ("model", "state_dict")
_PREFIXES = ("module.", "_orig_mod.")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: a state dict, or the ``'model'``/``'state_dict'`` entry of a training state.

    ``module.`` (DataParallel/DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes are removed
    when every key carries them.

    Raises:
        ValueError: no state dict found (the message lists the top-level keys).
    """
    cur = obj
    for _ in range(4):
        if _is_tensor_dict(cur):
            break
        if not isinstance(cur, Mapping):
            raise ValueError(f"{source}: expected a state dict or a training state (dict), got {type(cur).__name__}")
        nxt = next((cur[k] for k in _STATE_KEYS if isinstance(cur.get(k), Mapping)), None)
        if nxt is None:
            tensors = {k: v for k, v in cur.items() if isinstance(v, torch.Tensor)}
            if tensors and len(tensors) >= len(cur) / 2:
                cur = tensors  # a state dict with a few non-tensor extras
                break
            keys = ", ".join(map(str, list(cur)[:12]))
            raise ValueError(
                f"{source}: no state dict found; top-level keys: {keys} (expected 'model' or 'state_dict')"
            )
        cur = nxt
    state = {str(k): v for k, v in cur.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k, v in cur.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        _logger.debug("%s: ignoring %d non-tensor entries (%s)", source, len(skipped), ", ".join(skipped[:5]))
    if not state:
        raise ValueError(f"{source}: the state dict holds no tensors")
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


# ---------------------------------------------------------------------------------------------- filter registry
_FILTERS: dict[type, CheckpointFilter] = {}


def register_checkpoint_filter(model_cls: type, fn: CheckpointFilter) -> None:
    """Declare how official state dicts map onto ``model_cls`` (and its subclasses without their own filter)."""
    _FILTERS[model_cls] = fn


def get_checkpoint_filter(model: nn.Module | type) -> CheckpointFilter | None:
    """The filter registered for the model's class or its nearest base class; None when there is none."""
    cls = model if isinstance(model, type) else type(model)
    for base in cls.__mro__:
        if base in _FILTERS:
            return _FILTERS[base]
    return None


def _register_timm_filters() -> None:
    """timm's own baselines (Swin, ResNet) load official files through the same entry point."""
    from timm.models import swin_transformer

    register_checkpoint_filter(swin_transformer.SwinTransformer, swin_transformer.checkpoint_filter_fn)


_register_timm_filters()


# ---------------------------------------------------------------------------------------------- loading
def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{shown}{more}"


@dataclass
class LoadReport:
    """What :func:`load_official_checkpoint` did.

    Attributes:
        source: the file (or ``"<state dict>"``).
        architecture: the model's registered name (``pretrained_cfg['architecture']``) or class name.
        source_tensors: tensors found in the checkpoint.
        loaded: model tensors filled from the checkpoint.
        renamed: checkpoint keys whose name the family filter changed (official -> acmix names).
        missing: model keys the checkpoint did not provide (only adapted classifiers, unless ``strict=False``).
        unexpected: checkpoint keys the model has no place for (empty unless ``strict=False``).
        adapted: human-readable notes (classifier dropped for a new ``num_classes``, first conv adapted...).
    """

    source: str
    architecture: str
    source_tensors: int = 0
    loaded: int = 0
    renamed: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{self.source} -> {self.architecture}: loaded {self.loaded} tensors "
            f"({self.source_tensors} in the file, {self.renamed} renamed from official names)"
        ]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {_summarise(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {_summarise(self.unexpected)}")
        parts += self.adapted
        return "; ".join(parts)

    __str__ = summary


def _as_tuple(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def load_official_checkpoint(
    model: nn.Module,
    checkpoint: PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    filter_fn: CheckpointFilter | None = None,
) -> LoadReport:
    """Load an official (or acmix/timm) checkpoint into a built model and report what was mapped.

    Args:
        model: a model built by ``timm.create_model`` (any acmix model, or timm's Swin / ResNet baselines).
        checkpoint: a file for :func:`read_checkpoint`, or an already loaded object (state dict or training state).
        strict: refuse missing or unexpected keys (an adapted classifier is always allowed to be missing).
        filter_fn: override the family's registered ``checkpoint_filter_fn(state_dict, model)``.

    Returns:
        A :class:`LoadReport` (also logged at INFO).

    Raises:
        FileNotFoundError, ValueError: unreadable file (see :func:`read_checkpoint`), tensors whose shapes do not
            fit the model (wrong architecture), or, with ``strict``, missing/unexpected keys. Messages summarise the
            keys instead of listing thousands of them.
    """
    if isinstance(checkpoint, Mapping):
        source, obj = "<state dict>", checkpoint
    else:
        source, obj = str(checkpoint), read_checkpoint(checkpoint)
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = pretrained_cfg.get("architecture") or type(model).__name__
    state = extract_state_dict(obj, source)
    report = LoadReport(source=source, architecture=arch, source_tensors=len(state))
    fn = filter_fn or get_checkpoint_filter(model)
    if fn is not None:
        original = set(state)
        state = dict(fn(dict(state), model))
        report.renamed = len(set(state) - original)
    target = model.state_dict()
    dropped = _drop_other_classifier(state, target, _as_tuple(pretrained_cfg.get("classifier")))
    report.adapted += [f"classifier {key} {got} -> {want}: not loaded (new head)" for key, got, want in dropped]
    for key, chans in _adapt_first_conv(state, target, _as_tuple(pretrained_cfg.get("first_conv"))):
        report.adapted.append(f"first conv {key}: adapted to {chans} input channels")
    missing, unexpected = _check_fit(source, arch, state, target, strict, excused={key for key, _, _ in dropped})
    model.load_state_dict(state, strict=False)
    report.loaded = sum(1 for k in state if k in target)
    report.missing, report.unexpected = missing, unexpected
    _logger.info("%s", report.summary())
    return report


def _drop_other_classifier(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], names: tuple[str, ...]
) -> list[tuple[str, tuple[int, ...], tuple[int, ...] | str]]:
    """Remove classifier tensors the model has no place for (another number of classes, or no head), as timm does.

    Returns one ``(key, checkpoint shape, model shape or "none")`` per removed tensor.
    """
    dropped: list[tuple[str, tuple[int, ...], tuple[int, ...] | str]] = []
    for name in names:
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in state and (key not in target or state[key].shape != target[key].shape):
                got = tuple(state.pop(key).shape)
                dropped.append((key, got, tuple(target[key].shape) if key in target else "none"))
    return dropped


def _adapt_first_conv(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], names: tuple[str, ...]
) -> list[tuple[str, int]]:
    """Adapt first-conv weights to the model's input channels (timm's ``adapt_input_conv``), in place.

    Returns one ``(key, input channels)`` per adapted tensor.
    """
    adapted = []
    for name in names:
        key = f"{name}.weight"
        if key in state and key in target and state[key].dim() == 4 and state[key].shape[1] != target[key].shape[1]:
            from timm.models import adapt_input_conv

            chans = int(target[key].shape[1])
            state[key] = adapt_input_conv(chans, state[key])
            adapted.append((key, chans))
    return adapted


def _check_fit(
    source: str,
    arch: str,
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    strict: bool,
    excused: set[str],
) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` keys; raises ``ValueError`` on shape mismatches, and with ``strict`` on missing keys
    (other than ``excused``, the classifier tensors dropped for a new head) or unexpected ones."""
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    hard_missing = [k for k in missing if k not in excused]
    if mismatched:
        raise ValueError(
            f"{source} does not fit {arch}: {len(mismatched)} tensors have other shapes "
            f"({_summarise(mismatched, 3)}); is it a checkpoint of another architecture?"
        )
    if strict and (hard_missing or unexpected):
        parts = []
        if hard_missing:
            parts.append(f"{len(hard_missing)} missing ({_summarise(hard_missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_summarise(unexpected)})")
        raise ValueError(
            f"{source} does not match {arch}: " + "; ".join(parts) + ". Is it a checkpoint of another architecture? "
            "Pass strict=False to load what fits."
        )
    return missing, unexpected


class OfficialWeightsMixin:
    """Gives a model timm's ``load_pretrained(path)`` hook, which timm calls for ``custom_load`` weight sources.

    With it, ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` reads ``PATH``
    with :func:`read_checkpoint` and maps it with the family's filter (official or acmix keys alike).
    """

    def load_pretrained(self, checkpoint_path: PathLike, strict: bool = True) -> LoadReport:
        assert isinstance(self, nn.Module)
        return load_official_checkpoint(self, checkpoint_path, strict=strict)
