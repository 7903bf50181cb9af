"""Where the time of one ACmix layer step (forward + backward) goes: torch.profiler, grouped into the layer's parts.

    .venv/bin/python benchmarks/profile_layer.py --threads 2 [--backend cpp] [--conv-impl fused] [--channels-last] \
        [--channels 64 --size 56 --stride 1]

First the median forward + backward time of the layer and of its own 1 x 1 projections (``layer.qkv``), timed
interleaved in this process, and their ratio (the issue's "layer / projections"); then the profile.

Parts (self CPU time of the profiled ops, summed; categories from the op name and its input shapes):
``projections`` (the fused q/k/v 1 x 1 conv, forward and backward), ``attention fwd`` / ``attention bwd`` (the
backend's own ops: the C++ kernels for ``cpp``; everything under the attention call for other backends is counted in
``other``), ``conv path`` (the fused grouped k_c x k_c conv), ``position`` (the 1 x 1 position projection),
``copies / layout`` (copy_, cat, stack, clone, contiguous, permute materialisation), ``elementwise`` (add, mul,
sum ... : the alpha / beta mix, gradient accumulation) and ``other``. Prints the table of the top ops as well.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from acmix.layers import ACmix
from acmix.ops import use_backend

_COPIES = ("aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::contiguous", "aten::_to_copy")
_ELEMENTWISE = (
    "aten::add",
    "aten::add_",
    "aten::mul",
    "aten::mul_",
    "aten::sum",
    "aten::neg",
    "aten::sub",
    "aten::fill_",
    "aten::zero_",
)


def _category(name: str, shapes: list, channels: int, heads: int) -> str:
    if "acmix_cpp" in name:
        # torch.library's autograd wrapper of the forward op is GeneratedBackwardFor_acmix_cpp_..._fwd_default (its
        # forward call) and ..._defaultBackward (its backward node, which calls local_attention_bwd)
        if "bwd" in name or name.endswith("Backward") or "evaluate_function" in name:
            return "attention bwd"
        return "attention fwd"
    flat = [tuple(s) for s in shapes if isinstance(s, (list, tuple)) and s and all(isinstance(x, int) for x in s)]
    if "conv" in name or "mkldnn" in name:
        if (3 * channels, channels, 1, 1) in flat:
            return "projections"
        if any(len(s) == 4 and s[0] == channels and s[1] == 3 * heads for s in flat):
            return "conv path"
        if any(len(s) == 4 and s[1] == 2 and s[2:] == (1, 1) for s in flat):
            return "position"
        return "conv (other)"
    if name in _COPIES:
        return "copies / layout"
    if name in _ELEMENTWISE:
        return "elementwise"
    return "other"


def _ratio(layer: ACmix, x: torch.Tensor, repeats: int) -> str:
    """Median forward + backward of the layer and of its projections, interleaved, and their ratio."""

    def step(module: torch.nn.Module) -> float:
        t0 = time.perf_counter()
        y = module(x)
        y.backward(torch.ones_like(y))
        x.grad = None
        layer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    subjects = {"layer": layer, "projections": layer.qkv}
    times: dict[str, list[float]] = {k: [] for k in subjects}
    for _ in range(repeats):
        for name, module in subjects.items():
            times[name].append(step(module))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return (
        f"layer {med['layer']:.1f} ms, projections {med['projections']:.1f} ms, "
        f"layer / projections {med['layer'] / med['projections']:.2f}x (median of {repeats}, interleaved)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default=None, help="attention backend (default: automatic)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--conv-impl", default=None, choices=("fused", "reference", "auto"))
    p.add_argument("--channels-last", action="store_true", help="input (and so the projection) in channels_last")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the ratio")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = ACmix(args.channels, stride=args.stride, num_heads=args.heads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, args.channels, args.size, args.size).contiguous(memory_format=fmt).requires_grad_()
    with use_backend(attention=args.backend, conv=args.conv_impl):
        grad = None
        for _ in range(2):  # warm-up (builds / loads the cpp extension, oneDNN primitives)
            out = layer(x)
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
        ratio = _ratio(layer, x, args.repeats)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).backward(grad)
    events = prof.key_averages(group_by_input_shape=True)
    parts: dict[str, float] = defaultdict(float)
    for e in events:
        parts[_category(e.key, e.input_shapes or [], args.channels, args.heads)] += e.self_cpu_time_total
    total = sum(parts.values())
    print(f"ACmix({args.channels}, heads {args.heads}, stride {args.stride}) B={args.batch} {args.size}x{args.size}, ")
    print(f"threads {args.threads}, backend {args.backend or 'auto'}, torch {torch.__version__}")
    print(ratio)
    print("profile, per step:")
    for name, us in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<16} {us / 1e3 / args.steps:8.1f} ms  {100 * us / total:5.1f} %")
    print(f"  {'total':<16} {total / 1e3 / args.steps:8.1f} ms")
    print()
    print(
        events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40, max_shapes_column_width=60)
    )


if __name__ == "__main__":
    main()
