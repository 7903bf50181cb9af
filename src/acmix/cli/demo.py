"""``acmix demo``: a tiny ACmix operator run: shapes, the alpha/beta mix, reference vs default backend."""

from __future__ import annotations

import argparse
import time

import torch

from ..layers import ACmix
from ..ops import choose_backend, use_backend


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.channels < 1 or args.size < 1:
        raise ValueError(
            f"--batch, --channels and --size must be positive, got {args.batch}, {args.channels}, {args.size}"
        )
    torch.manual_seed(0)
    layer = ACmix(args.channels, stride=args.stride, num_heads=args.heads).eval()
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    backend = choose_backend(x.reshape(args.batch, args.heads, -1, args.size, args.size)).name
    with torch.no_grad():
        t0 = time.perf_counter()
        y = layer(x)
        elapsed = time.perf_counter() - t0
        with use_backend(attention="reference", conv="reference"):
            y_ref = layer(x)
    print(layer)
    print(f"input  {tuple(x.shape)}  ->  output {tuple(y.shape)}")
    print(f"parameters: {sum(p.numel() for p in layer.parameters()):,}")
    print(f"alpha = {layer.alpha.item():.2f} (attention), beta = {layer.beta.item():.2f} (convolution)")
    print(
        f"backend: {backend}, forward {elapsed * 1e3:.1f} ms; max |default - reference| = {(y - y_ref).abs().max():.2e}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run one ACmix layer on random input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--size", type=int, default=14)
    p.add_argument("--stride", type=int, default=1)
    p.set_defaults(func=run)
