"""``acmix train``: train any registered model (acmix or timm) on an image folder or the embedded digits.

Every flag is a :class:`acmix.train.config.TrainConfig` field (``--batch-size`` is ``batch_size``); ``--recipe``
loads a paper recipe, ``--config FILE.yaml`` overrides with keys named like the flags, explicit flags win.
Under ``torchrun`` the same command trains with DDP.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
from typing import Any

from .main import UsageError, add_command

_GROUPS: dict[str, tuple[str, ...]] = {
    "model and data": (
        "model",
        "data_dir",
        "train_split",
        "val_split",
        "num_classes",
        "pretrained",
        "initial_checkpoint",
        "input_size",
        "drop_rate",
        "drop_path",
        "model_kwargs",
        "skip_bad_images",
    ),
    "recipe and files": ("recipe", "config", "output", "overwrite", "resume", "checkpoint_every"),
    "schedule": ("epochs", "batch_size", "grad_accum_steps", "max_steps"),
    "optimizer (timm.optim.create_optimizer_v2)": (
        "opt",
        "lr",
        "lr_base_size",
        "weight_decay",
        "momentum",
        "opt_eps",
        "wd_all_params",
        "clip_grad",
        "clip_mode",
    ),
    "scheduler (timm.scheduler.create_scheduler_v2, stepped per update)": (
        "sched",
        "warmup_epochs",
        "warmup_lr",
        "min_lr",
    ),
    "augmentation and regularisation (timm.data)": (
        "smoothing",
        "mixup",
        "cutmix",
        "mixup_prob",
        "mixup_switch_prob",
        "mixup_mode",
        "aa",
        "color_jitter",
        "reprob",
        "remode",
        "recount",
        "hflip",
        "interpolation",
        "crop_pct",
        "shift_aug",
        "model_ema",
        "model_ema_decay",
    ),
    "numerics, devices, logging": (
        "device",
        "amp",
        "amp_dtype",
        "channels_last",
        "sync_bn",
        "grad_checkpointing",
        "compile",
        "threads",
        "seed",
        "deterministic",
        "nan_policy",
        "workers",
        "log_interval",
        "tensorboard",
        "plots",
        "progress",
    ),
}

_HELP = {
    "model": "any timm-registered model (acmix_* or timm's); default: acmix_micro",
    "data_dir": "image folder with train/ and val/ sub-folders of class folders (default: embedded digits)",
    "recipe": "paper recipe: resnet, san, pvt, swin or digits (docs/recipes.md)",
    "config": "YAML file of overrides; keys are the flag names",
    "output": "run folder (default runs/<model>-<time>; a resumed run keeps its folder); must be empty or new",
    "overwrite": "let a new run delete the run already in --output (without it such a folder is refused)",
    "resume": "continue a run: its folder, or a .state.pt / .safetensors checkpoint",
    "model_kwargs": "extra timm.create_model arguments, KEY=VALUE (YAML values)",
    "max_steps": "stop after this many optimizer updates (writes last checkpoint)",
    "checkpoint_every": "also write the last checkpoint every N updates",
    "lr_base_size": "scale lr by global batch / this (linear rule); unset: lr as given",
    "nan_policy": "on a NaN/inf loss: stop (keep last good checkpoint) or skip the update",
    "skip_bad_images": "skip unreadable image files (counted, reported per epoch) instead of stopping",
    "shift_aug": "embedded digits: random translation by up to N pixels",
    "amp": "autocast: bfloat16 on CPU, float16/bfloat16 on CUDA (--amp-dtype)",
    "compile": "torch.compile the whole model for training and evaluation (the first steps are slow: compiling)",
    "threads": "torch CPU threads (default: 1 for the embedded digits, else torch's default)",
}


def _type_of(f: dataclasses.Field) -> tuple[Any, bool]:
    """(converter, is_bool) from the dataclass annotation string."""
    t = str(f.type).replace(" ", "")
    if t.startswith("bool"):
        return None, True
    if t.startswith("int"):
        return int, False
    if t.startswith("float"):
        return float, False
    return str, False


def _parse_kv(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def one_line_errors(parser: argparse.ArgumentParser, prog: str) -> None:
    """Make ``parser`` print usage errors as one line (with close matches for unknown flags) and exit 2."""

    def error(self: argparse.ArgumentParser, message: str) -> Any:
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    original = parser.parse_known_args

    def parse_known_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        ns, extras = original(args, namespace)
        if extras:
            options = [s for a in self._actions for s in a.option_strings]
            unknown = extras[0]
            close = difflib.get_close_matches(unknown.split("=")[0], options, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            self.error(f"unrecognized argument {unknown!r}{hint}")
        return ns, extras

    parser.error = types.MethodType(error, parser)  # type: ignore[method-assign]
    parser.parse_known_args = types.MethodType(parse_known_args, parser)  # type: ignore[method-assign]


def add_config_flags(p: argparse.ArgumentParser) -> None:
    from ..train.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    for title, names in _GROUPS.items():
        g = p.add_argument_group(title)
        for name in names:
            f = fields[name]
            flag = "--" + name.replace("_", "-")
            default = getattr(defaults, name)
            help_text = _HELP.get(name, "") + (f" (default: {default})" if default not in (None, "", {}) else "")
            if name == "model_kwargs":
                g.add_argument(flag, nargs="+", metavar="KEY=VALUE", default=argparse.SUPPRESS, help=help_text)
                continue
            conv, is_bool = _type_of(f)
            if is_bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            else:
                g.add_argument(flag, type=conv, default=argparse.SUPPRESS, help=help_text, metavar=name.upper())


def collect_flags(args: argparse.Namespace) -> dict[str, Any]:
    from ..train.config import field_names

    flags = {k: v for k, v in vars(args).items() if k in field_names()}
    if "model_kwargs" in flags:
        try:
            flags["model_kwargs"] = _parse_kv(flags["model_kwargs"])
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--model-kwargs: {exc}") from None
    return flags


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import find_state_file, load_state
    from ..train.config import resolve_config
    from ..train.trainer import TrainingStopped, run_training

    flags = collect_flags(args)
    saved = None
    if flags.get("resume") and (flags.get("initial_checkpoint") or flags.get("pretrained")):
        raise UsageError("--resume and --initial-checkpoint/--pretrained contradict each other; give one")
    if flags.get("resume"):
        saved = load_state(find_state_file(flags["resume"])).get("config", {})
    cfg = resolve_config(flags, saved=saved)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = run_training(cfg)
    except TrainingStopped as exc:
        if is_main:
            print(f"acmix train: stopped: {exc}", file=sys.stderr)
        return 1
    if not is_main:
        return 0
    last = result.last
    if result.stopped == "signal":
        print(
            f"acmix train: interrupted by {result.signal_name or 'a signal'} at update {result.updates}; "
            f"checkpoint written to {result.run_dir / 'last.state.pt'}; resume with: {result.resume_command}",
            file=sys.stderr,
        )
        return 130
    if last:
        print(
            f"{cfg.model}: {result.epochs_done} epoch(s), {result.updates} updates in {result.seconds:.1f} s; "
            f"val top-1 {last['val_top1']:.2f}% (best {result.best_top1:.2f}%), top-5 {last['val_top5']:.2f}%, "
            f"loss {last['val_loss']:.4f}"
        )
    else:
        print(f"{cfg.model}: {result.updates} updates in {result.seconds:.1f} s (no full epoch yet)")
    print(f"run folder: {result.run_dir}")
    if result.plot_errors:
        print(
            f"note: {len(result.plot_errors)} plot(s) could not be written (training went on): "
            f"{result.plot_errors[-1]}",
            file=sys.stderr,
        )
    if result.stopped == "max_steps":
        print(f"stopped at --max-steps; continue with: {result.resume_command} --max-steps N")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "train", "train a model (default: acmix_micro on the embedded digits)", __doc__, run)
    add_config_flags(p)
    one_line_errors(p, "acmix train")
