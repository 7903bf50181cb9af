"""Where the time of one ACmix layer goes: torch.profiler table of forward + backward, and the layer / projection
ratio of the same run.

    .venv/bin/python benchmarks/profile_layer.py --batch 8 --channels 64 --size 56 --stride 1 --threads 2 \
        [--backend cpp] [--conv-impl fused] [--channels-last] [--rows 25]

Prints the median forward + backward time of the layer and of its own 1 x 1 projections (``layer.qkv``), timed
interleaved in this process, their ratio, then the profiler's top ops by self CPU time over ``--profile-steps``
steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from acmix import ACmix
from acmix.ops import use_backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default=None, help="local-attention backend (default: automatic)")
    p.add_argument("--conv-impl", default=None, choices=("fused", "reference", "auto"))
    p.add_argument("--channels-last", action="store_true", help="input in channels_last")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = ACmix(args.channels, stride=args.stride, num_heads=args.heads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, args.channels, args.size, args.size).contiguous(memory_format=fmt).requires_grad_()

    def step(module: torch.nn.Module) -> None:
        y = module(x)
        y.backward(torch.ones_like(y))
        x.grad = None
        layer.zero_grad(set_to_none=True)

    subjects = {"layer": layer, "proj1x1": layer.qkv}
    times: dict[str, list[float]] = {k: [] for k in subjects}
    with use_backend(attention=args.backend, conv=args.conv_impl):
        for module in subjects.values():
            step(module)  # warm-up
        for _ in range(args.repeats):
            for name, module in subjects.items():
                t0 = time.perf_counter()
                step(module)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"B={args.batch} C={args.channels} {args.size}x{args.size} s={args.stride} threads={args.threads} "
            f"backend={args.backend or 'auto'} conv={args.conv_impl or 'auto'}: layer {med['layer']:.1f} ms, "
            f"projections {med['proj1x1']:.1f} ms, layer / projections {med['layer'] / med['proj1x1']:.2f}x"
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                step(layer)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
