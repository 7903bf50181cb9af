"""Training configuration: :class:`TrainConfig` is the one place defaults live.

Precedence (lowest to highest): the dataclass defaults, a named recipe (``--recipe``, :mod:`acmix.train.recipes`),
a YAML file (``--config``) whose keys are the flag names (``batch-size`` or ``batch_size``), explicit flags.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "field_names", "load_yaml_overrides", "merge_overrides", "resolve_config"]


@dataclass
class TrainConfig:
    """Every training setting. Field ``batch_size`` is flag ``--batch-size`` and YAML key ``batch-size``.

    The defaults train ``acmix_micro`` on the embedded digits (scikit-learn) to >= 97 % top-1 in a few CPU
    minutes; the paper recipes (``recipe``) replace them for ImageNet-scale runs.
    """

    # --- model / data
    model: str = "acmix_micro"
    data_dir: str | None = None  # image folder with train/ and val/ sub-folders; None: embedded digits
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None  # None: from the data
    pretrained: bool = False
    initial_checkpoint: str | None = None
    input_size: int | None = None  # None: the model's pretrained_cfg input size
    drop_rate: float | None = None
    drop_path: float | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of stopping
    # --- recipe / files
    recipe: str | None = None
    config: str | None = None
    output: str | None = None  # run folder; None: runs/<model>-<YYYYmmdd-HHMMSS>[-N]
    overwrite: bool = False  # a new run may replace the run already in ``output`` (else it is refused)
    resume: str | None = None  # a run folder or a checkpoint path (``last``/``best`` state file)
    # --- schedule
    epochs: int = 30
    batch_size: int = 64
    grad_accum_steps: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (tests, smoke runs)
    # --- optimiser (timm.optim.create_optimizer_v2)
    opt: str = "adamw"
    lr: float = 3e-3
    lr_base_size: int | None = None  # if set, lr is scaled by global_batch / lr_base_size (linear rule)
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float | None = None
    wd_all_params: bool = False  # weight decay on norms, biases, alpha/beta too (ResNet/SAN scripts)
    clip_grad: float | None = None
    clip_mode: str = "norm"
    # --- scheduler (timm.scheduler.create_scheduler_v2), stepped per optimizer update
    sched: str = "cosine"
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-4
    min_lr: float = 1e-5
    # --- regularisation / augmentation (timm.data)
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    aa: str | None = None  # RandAugment string, e.g. rand-m9-mstd0.5-inc1
    color_jitter: float = 0.4
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    hflip: float = 0.5
    interpolation: str = ""  # '' : the model's default
    crop_pct: float | None = None
    shift_aug: int = 1  # embedded digits: random translation by up to this many pixels
    # --- EMA
    model_ema: bool = False
    model_ema_decay: float = 0.999
    # --- numerics / device
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = False
    amp_dtype: str = "bfloat16"  # bfloat16 or float16 (float16 only on CUDA)
    channels_last: bool = False
    sync_bn: bool = False
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the whole training model (the first steps compile; needs a C++ toolchain)
    threads: int | None = None  # torch CPU threads; None: 1 for the embedded digits (tiny ops), else torch default
    seed: int = 0
    deterministic: bool = False
    nan_policy: str = "stop"  # stop (keep last good checkpoint) or skip (drop the step, count it)
    # --- loader / logging
    workers: int = 0
    log_interval: int = 10
    tensorboard: bool = False
    plots: bool = True
    progress: bool = True
    checkpoint_every: int = 0  # also write ``last`` every N optimizer steps (0: once per epoch)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, recorded in the state file

    # ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError for impossible or contradictory settings (before any work starts)."""
        positive = ("epochs", "batch_size", "grad_accum_steps", "recount", "log_interval")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be positive, got {self.max_steps}")
        if self.workers < 0 or self.checkpoint_every < 0 or self.shift_aug < 0:
            raise ValueError("--workers, --checkpoint-every and --shift-aug must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("smoothing", "reprob", "mixup_prob", "mixup_switch_prob", "hflip"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{_flag(name)} must be in [0, 1], got {value}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"--mixup and --cutmix must be >= 0, got {self.mixup}, {self.cutmix}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"--amp-dtype must be bfloat16 or float16, got {self.amp_dtype!r}")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"--nan-policy must be stop or skip, got {self.nan_policy!r}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip-grad must be positive, got {self.clip_grad}")
        if self.clip_mode not in ("norm", "value", "agc"):
            raise ValueError(f"--clip-mode must be norm, value or agc, got {self.clip_mode!r}")
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(f"--input-size must be positive, got {self.input_size}")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"--mixup-mode must be batch, pair or elem, got {self.mixup_mode!r}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"--mixup/--cutmix need an even --batch-size, got {self.batch_size}")
        if self.resume and self.initial_checkpoint:
            raise ValueError("--resume and --initial-checkpoint contradict each other; give one")
        if self.resume and self.pretrained:
            raise ValueError("--resume and --pretrained contradict each other; a resumed run loads its own weights")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; --resume continues the run, keep it")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _typed(name: str, value: Any, source: str) -> Any:
    """``value`` as the type of field ``name`` (an int for a float field, a whole float for an int field);
    a value of another type raises ValueError naming the setting, the expected type and what arrived."""
    kind = str(next(f.type for f in dataclasses.fields(TrainConfig) if f.name == name)).replace(" ", "")
    if value is None and kind.endswith("|None"):
        return None
    base = kind.split("|")[0].split("[")[0]
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "dict": lambda v: isinstance(v, dict),
    }[base]
    if base == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not ok(value):
        want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        expected = want.get(base, "a mapping") + (" or null" if kind.endswith("|None") else "")
        raise ValueError(f"{source}: {_flag(name)} must be {expected}, got {shown} ({type(value).__name__})")
    return float(value) if base == "float" else value


def merge_overrides(cfg: TrainConfig, overrides: Mapping[str, Any], source: str) -> TrainConfig:
    """Return ``cfg`` with ``overrides`` (keys: flag names, dashes or underscores) applied; unknown keys and
    values of the wrong type raise ValueError."""
    names = field_names()
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(_flag(c) for c in close)}?" if close else ""
            raise ValueError(f"{source}: unknown setting {key!r}{hint}")
        clean[name] = _typed(name, value, source)
    return dataclasses.replace(cfg, **clean)


def load_yaml_overrides(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of flag names to values (``--config``)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{p}: not valid YAML ({first})") from None
    except RecursionError:
        raise ValueError(f"{p}: not valid YAML (nested too deeply)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def resolve_config(
    flags: Mapping[str, Any],
    *,
    saved: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build the run's TrainConfig: defaults (or a resumed run's saved config), recipe, YAML, explicit flags.

    Args:
        flags: only the flags the user gave (field names as keys), including ``recipe``/``config``/``resume``.
        saved: the config stored in a checkpoint being resumed; it replaces the defaults, so a resumed run
            continues with the settings it started with unless a flag says otherwise.
    """
    from .recipes import get_recipe

    cfg = TrainConfig()
    if saved is not None:
        known = {k: v for k, v in saved.items() if k in field_names()}
        cfg = merge_overrides(cfg, known, "checkpoint config")
        # output: where the run is now; overwrite: never inherited (it deleted the run it replaced)
        cfg = dataclasses.replace(cfg, resume=None, config=None, max_steps=None, output=None, overwrite=False)
    yaml_over = load_yaml_overrides(flags["config"]) if flags.get("config") else {}
    recipe = flags.get("recipe") or yaml_over.get("recipe")
    if recipe is not None:
        cfg = merge_overrides(cfg, get_recipe(str(recipe)), f"recipe {recipe}")
        cfg = dataclasses.replace(cfg, recipe=str(recipe))
    if yaml_over:
        cfg = merge_overrides(cfg, yaml_over, str(flags["config"]))
    cfg = merge_overrides(cfg, flags, "flags")
    cfg.validate()
    return cfg
