"""``acmix inspect CHECKPOINT``: learned alpha (attention) and beta (convolution) of every ACmix layer.

Prints a table in depth order and writes a plot by depth (``--plot``, default ``<checkpoint stem>-alpha-beta.png``
next to the checkpoint, or in the run folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .main import UsageError, add_command
from .train import one_line_errors


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import read_weights
    from ..train.inference import acmix_alpha_beta, alpha_beta_from_state_dict, load_model
    from ..train.plots import plot_alpha_beta

    path = Path(args.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (
        path.suffix == ".safetensors"
        and args.model is None
        and not path.with_name(path.name.removesuffix(".safetensors").removesuffix(".ema") + ".state.pt").is_file()
    ):
        rows = alpha_beta_from_state_dict(read_weights(path))
        name = path.name
    else:
        loaded = load_model(path, model_name=args.model, use_ema=args.ema)
        rows = acmix_alpha_beta(loaded.model)
        name = loaded.model_name
    if not rows:
        raise UsageError(f"{path}: no ACmix layers (no parameters named alpha/beta)")
    if args.json:
        print(json.dumps(rows))
    else:
        width = max(len(r["layer"]) for r in rows)
        print(f"{'depth':>5}  {'layer':<{width}}  {'alpha (att)':>11}  {'beta (conv)':>11}  {'alpha/(alpha+beta)':>18}")
        for i, r in enumerate(rows):
            a, b = r["alpha"], r["beta"]
            share = a / (a + b) if (a + b) != 0 else float("nan")
            print(f"{i:>5}  {r['layer']:<{width}}  {a:>11.4f}  {b:>11.4f}  {share:>18.3f}")
    if not args.no_plot:
        if args.plot:
            out = Path(args.plot)
        elif path.is_dir():
            out = path / "alpha-beta.png"
        else:
            out = path.with_name(path.name.split(".")[0] + "-alpha-beta.png")
        plot_alpha_beta(rows, out, title=name)
        if not args.json:
            print(f"plot: {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "inspect", "alpha/beta of every ACmix layer (table + plot)", __doc__, run)
    p.add_argument("checkpoint", help="run folder, .state.pt or .safetensors (official files with --model)")
    p.add_argument("--model", help="model name, for checkpoints without an acmix state file")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--plot", help="PNG path for the plot")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--json", action="store_true")
    one_line_errors(p, "acmix inspect")
