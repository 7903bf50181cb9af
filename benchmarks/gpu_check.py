"""One prepared GPU run (about 3 minutes on an H100/H200): correctness of every CUDA backend, then the op timings.

1. Correctness, first and fail-fast: every local-attention backend that can run on the device (``triton``,
   ``flex``, ``tiled``, ``offset``) and every aggregation backend (``triton``, ``offset``) against the float64
   unfold references, forward and every gradient (q, k, v, rel_pos / x, weight), in float32 / bfloat16 / float16,
   on ResNet-like and awkward shapes (odd, stride 2, tiny maps, head_dim 24 and 128, q/k/v as strided NCHW and
   channels_last views of one projection). A failure prints ``CORRECTNESS FAILED`` with every failing check and
   exits 1 before anything is timed.
2. The issue-12 op target: attention forward + backward at B = 64, C = 64, 56 x 56 (4 heads, k = 7), ``triton``
   against ``tiled``, bfloat16 and float32 (target: triton / tiled <= 0.3); the triton tile sizes swept at that
   shape (stride 1 and 2); SAN aggregation ``triton`` against ``offset`` at two SAN-10 shapes.
3. ``acmix bench op`` on the ResNet shapes (B = 8; float32, then bfloat16 for the attention op only), every
   runnable backend including ``triton``.

Stops starting new sections when ``--budget`` seconds have passed. ``--device cpu --quick`` is a dry run of the
same code paths on tiny shapes (``triton`` runs there only with ``TRITON_INTERPRET=1``).

    python benchmarks/gpu_check.py [--budget 200] [--json gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import torch

from acmix.bench import op as bench_op
from acmix.bench.env import synchronize
from acmix.ops import available_aggregate_backends, available_backends, get_backend, local_aggregate, local_attention
from acmix.ops._dispatch import AGGREGATE
from acmix.ops._reference import local_attention_reference
from acmix.ops.aggregation import local_aggregate_reference

#: (forward, backward) atol = rtol against the float64 reference (tests/test_backends.py)
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 2e-2), torch.bfloat16: (5e-2, 1e-1)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: (B, heads, head_dim, H, W), k, stride, layout of the q/k/v views ("nchw" or "cl")
ATTENTION_CASES = [
    ((2, 4, 16, 56, 56), 7, 1, "nchw"),  # ResNet stage 1
    ((2, 4, 32, 27, 29), 7, 2, "cl"),  # strided, odd, channels_last views
    ((1, 2, 16, 3, 2), 7, 1, "nchw"),  # map smaller than the window (repeated reflection)
    ((2, 4, 128, 7, 7), 7, 1, "cl"),  # ResNet-50 stage 4: head_dim 128
    ((1, 2, 24, 9, 10), 5, 2, "nchw"),  # head_dim not a power of two
]
QUICK_ATTENTION_CASES = [((1, 2, 16, 9, 7), 7, 1, "nchw"), ((1, 1, 16, 5, 6), 3, 2, "cl")]
#: (B, C, H, W), Wc, k, stride, channels_last
AGGREGATE_CASES = [((2, 32, 28, 27), 4, 7, 2, False), ((2, 16, 9, 11), 2, 7, 1, True), ((1, 8, 1, 1), 8, 7, 1, False)]
QUICK_AGGREGATE_CASES = [((1, 4, 5, 6), 2, 3, 1, False)]
#: every backend compiles (Triton) or autotunes per shape and dtype: the low-precision dtypes check a subset of the
#: cases (indices into the case lists), flex (opt-in, measured slower, compiled per shape) fewer still
CASE_SUBSET = {torch.float32: None, torch.bfloat16: (0, 1, 3), torch.float16: (0, 1)}
FLEX_CASES = {torch.float32: (0, 2), torch.bfloat16: (0,), torch.float16: (0,)}
AGGREGATE_SUBSET = {torch.float32: None, torch.bfloat16: (0,), torch.float16: (0,)}
#: issue 12: attention op forward + backward, B = 64 C = 64 56 x 56, triton / tiled <= 0.3
OP_TARGET = 0.3


def _views(shape, dtype, dev, layout, g):
    """q, k, v as (B, N, D, H, W) strided views of one (B, 3C, H, W) projection, as the layer makes them; rel_pos."""
    b, n, d, h, w = shape
    x = torch.randn(b, 3 * n * d, h, w, generator=g).to(dev, dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    q, k, v = (t.reshape(shape) for t in x.chunk(3, 1))
    return q, k, v, torch.randn(d, h, w, generator=g).to(dev, dtype)


def _grads(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor]):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return out.detach(), torch.autograd.grad((out * proj).sum(), leaves)


def _compare(got, got_g, want, want_g, dtype) -> tuple[bool, float, float]:
    fwd_tol, bwd_tol = TOL[dtype]
    fwd_err = (got.double() - want).abs().max().item()
    bwd_err = max((a.double() - b).abs().max().item() for a, b in zip(got_g, want_g))
    ok = bool(torch.allclose(got.double(), want, atol=fwd_tol, rtol=fwd_tol)) and all(
        a.shape == b.shape and bool(torch.allclose(a.double(), b, atol=bwd_tol, rtol=bwd_tol))
        for a, b in zip(got_g, want_g)
    )
    return ok, fwd_err, bwd_err


def _check_one(row: dict, run: Callable[[], tuple[bool, float, float]]) -> dict:
    t0 = time.perf_counter()
    try:
        ok, fwd_err, bwd_err = run()
        return {**row, "status": "ok" if ok else "FAIL", "fwd_err": fwd_err, "bwd_err": bwd_err,
                "s": round(time.perf_counter() - t0, 2)}  # fmt: skip
    except Exception as exc:  # report and go on: one failing backend must not hide the others
        traceback.print_exc()
        return {**row, "status": f"FAIL: {type(exc).__name__}: {exc}"[:300]}


def check_attention(dev: torch.device, cases=ATTENTION_CASES, deadline: float = float("inf")) -> list[dict]:
    results = []
    for name in available_backends():
        if name == "reference":
            continue
        for dtype in DTYPES:
            for i, (shape, ks, stride, layout) in enumerate(cases):
                row = {"op": "attention", "backend": name, "dtype": str(dtype), "shape": shape, "stride": stride,
                       "kernel": ks, "layout": layout}  # fmt: skip
                subset = FLEX_CASES[dtype] if name == "flex" else CASE_SUBSET[dtype]
                if subset is not None and i not in subset and len(cases) > max(subset):
                    continue
                if time.perf_counter() > deadline:
                    results.append({**row, "status": "no time"})
                    continue
                q, k, v, pos = _views(shape, dtype, dev, layout, torch.Generator().manual_seed(i))
                ok, why = get_backend(name).can_run(q)
                if not ok:
                    results.append({**row, "status": f"skipped: {why}"})
                    continue

                def run(q=q, k=k, v=v, pos=pos, ks=ks, stride=stride, name=name, dtype=dtype):
                    got, got_g = _grads(
                        lambda *t: local_attention(*t[:3], ks, stride, t[3], backend=name), (q, k, v, pos)
                    )
                    want, want_g = _grads(
                        lambda *t: local_attention_reference(*t[:3], ks, stride, t[3]),
                        [t.double() for t in (q, k, v, pos)],
                    )
                    return _compare(got, got_g, want, want_g, dtype)

                results.append(_check_one(row, run))
    return results


def check_aggregate(dev: torch.device, cases=AGGREGATE_CASES, deadline: float = float("inf")) -> list[dict]:
    results = []
    for name in available_aggregate_backends():
        if name == "reference":
            continue
        for dtype in DTYPES:
            for i, ((b, c, h, w), wc, ks, stride, channels_last) in enumerate(cases):
                subset = AGGREGATE_SUBSET[dtype]
                if subset is not None and i not in subset and len(cases) > max(subset):
                    continue
                row = {"op": "aggregate", "backend": name, "dtype": str(dtype), "shape": (b, c, h, w), "stride": stride,
                       "kernel": ks, "layout": "cl" if channels_last else "nchw"}  # fmt: skip
                if time.perf_counter() > deadline:
                    results.append({**row, "status": "no time"})
                    continue
                g = torch.Generator().manual_seed(i)
                ho, wo = -(-h // stride), -(-w // stride)
                x = torch.randn(b, c, h, w, generator=g).to(dev, dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                wt = torch.randn(b, wc, ks * ks, ho, wo, generator=g).to(dev, dtype)
                ok, why = AGGREGATE.get(name).can_run(x)
                if not ok:
                    results.append({**row, "status": f"skipped: {why}"})
                    continue

                def run(x=x, wt=wt, ks=ks, stride=stride, name=name, dtype=dtype):
                    got, got_g = _grads(lambda a, bb: local_aggregate(a, bb, ks, stride, backend=name), (x, wt))
                    want, want_g = _grads(
                        lambda a, bb: local_aggregate_reference(a, bb, ks, stride), (x.double(), wt.double())
                    )
                    return _compare(got, got_g, want, want_g, dtype)

                results.append(_check_one(row, run))
    return results


def _median_ms(fn: Callable[[], None], dev: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(dev)
        t0 = time.perf_counter()
        fn()
        synchronize(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_target(dev: torch.device, batch: int, size: int, repeats: int) -> list[dict]:
    """Forward + backward of the attention op at (batch, 64 channels, size^2), triton vs tiled (interleaved)."""
    rows = []
    names = [n for n in ("triton", "tiled") if get_backend(n).can_run(torch.empty(1, 4, 16, 1, 1, device=dev))[0]]
    if len(names) < 2:
        return [{"status": f"skipped: needs triton and tiled on {dev.type}"}]
    for dtype in ("bfloat16", "float32"):
        group = [bench_op.OpSpec("attention", n, batch, 64, size, 1, 4, 7, dtype, str(dev)) for n in names]
        got = bench_op.run([group], warmup=3, repeats=repeats, memory="inprocess", threads=None)
        by = {r.backend: r for r in got}
        ratio = by["triton"].median_ms / by["tiled"].median_ms
        rows.append({"dtype": dtype, "shape": got[0].shape, "triton_ms": by["triton"].median_ms,
                     "tiled_ms": by["tiled"].median_ms, "triton_mib": by["triton"].peak_mib,
                     "tiled_mib": by["tiled"].peak_mib, "ratio": ratio, "target": OP_TARGET,
                     "met": ratio <= OP_TARGET})  # fmt: skip
    return rows


#: (query tile, key tile) pairs timed by :func:`tile_sweep` (acmix.ops._backends.triton_attention tables)
TILE_SWEEP = [((4, 4), (4, 4)), ((4, 4), (8, 8)), ((4, 8), (4, 8)), ((8, 8), (8, 8))]


def tile_sweep(dev: torch.device, batch: int, size: int, repeats: int) -> list[dict]:
    """Triton attention fwd+bwd (bfloat16, B x 64 x size^2, stride 1 and 2) for each tile pair of TILE_SWEEP."""
    from acmix.ops._backends import triton_attention as ta

    if not get_backend("triton").can_run(torch.empty(1, 4, 16, 1, 1, device=dev))[0]:
        return []
    saved = (dict(ta.QUERY_TILES), dict(ta.KEY_TILES))
    rows = []
    try:
        for stride in (1, 2):
            for qt, kt in TILE_SWEEP:
                ta.QUERY_TILES[stride], ta.KEY_TILES[stride] = qt, kt
                spec = bench_op.OpSpec("attention", "triton", batch, 64, size, stride, 4, 7, "bfloat16", str(dev))
                got = bench_op.run([[spec]], warmup=2, repeats=repeats, memory="off", threads=None)
                rows.append({"stride": stride, "query_tile": qt, "key_tile": kt, "ms": got[0].median_ms,
                             "default": (qt, kt) == (saved[0][stride], saved[1][stride])})  # fmt: skip
    finally:
        ta.QUERY_TILES.clear()
        ta.QUERY_TILES.update(saved[0])
        ta.KEY_TILES.clear()
        ta.KEY_TILES.update(saved[1])
    return rows


def aggregate_timing(dev: torch.device, shapes, repeats: int) -> list[dict]:
    """Forward + backward of SAN aggregation, every runnable backend but the reference, bfloat16 and float32."""
    rows = []
    for (b, c, h), wc in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, c, h, h, generator=g).to(dev, dtype).requires_grad_(True)
            wt = torch.randn(b, wc, 49, h, h, generator=g).to(dev, dtype).requires_grad_(True)
            grad = torch.randn(b, c, h, h, generator=g).to(dev, dtype)
            row: dict = {"shape": f"{b}x{c}x{h}x{h} Wc={wc} k=7", "dtype": str(dtype)}
            for name in available_aggregate_backends():
                if name == "reference" or not AGGREGATE.get(name).can_run(x)[0]:
                    continue

                def step(name=name, x=x, wt=wt, grad=grad):
                    x.grad = wt.grad = None
                    local_aggregate(x, wt, 7, 1, backend=name).backward(grad)

                row[f"{name}_ms"] = _median_ms(step, dev, 2, repeats)
            rows.append(row)
    return rows


def op_table(dev: torch.device, quick: bool, repeats: int, deadline: float) -> list:
    rows_all = []
    shapes = [(16, 8)] if quick else list(bench_op.RESNET_SHAPES)
    batch = 1 if quick else 8
    for dtype, subjects in (("float32", list(bench_op.SUBJECTS)), ("bfloat16", ["attention", "conv3x3", "proj1x1"])):
        rows = []
        groups = bench_op.specs_for(shapes, [1, 2], batch=batch, dtype=dtype, device=dev.type, subjects=subjects)
        for group in groups:
            if time.perf_counter() > deadline:
                print(f"budget spent; skipping {dtype} {group[0].channels}@{group[0].size}/s{group[0].stride}")
                continue
            try:
                rows += bench_op.run([group], warmup=2, repeats=repeats, memory="inprocess", threads=None)
            except Exception:
                traceback.print_exc()
        if rows:
            print()
            print(bench_op.format_environment(rows))
            print(bench_op.format_table(rows))
            print(bench_op.format_summary(bench_op.summarize(rows)))
            rows_all += rows
    return rows_all


def _print_checks(rows: list[dict]) -> None:
    for r in rows:
        errs = f"fwd {r['fwd_err']:.1e} bwd {r['bwd_err']:.1e} ({r['s']} s)" if "fwd_err" in r else ""
        print(f"  {r['op']:9s} {r['backend']:8s} {r['dtype']:15s} {str(r.get('shape', '')):22s} k{r.get('kernel', '')} "
              f"s{r.get('stride', '')} {r.get('layout', ''):4s} {r['status'][:90]} {errs}")  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run; use with --quick)")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which no new section starts")
    parser.add_argument("--json", default=None, help="write everything as JSON")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU dry run of every code path)")
    parser.add_argument("--correctness-only", action="store_true", help="stop after the correctness checks")
    parser.add_argument("--skip-correctness", action="store_true", help="timings only (correctness run before)")
    parser.add_argument("--csv", default=None, help="write the op-table rows as CSV")
    parser.add_argument("--plot", default=None, help="write the op-table plot (PNG)")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do (--device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    report: dict = {"device": name, "torch": torch.__version__}

    def dump() -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1, default=str)

    att_cases = QUICK_ATTENTION_CASES if args.quick else ATTENTION_CASES
    agg_cases = QUICK_AGGREGATE_CASES if args.quick else AGGREGATE_CASES
    deadline = start + (0.9 if args.correctness_only else 0.6) * args.budget
    report["correctness"] = (
        []
        if args.skip_correctness
        else check_attention(dev, att_cases, deadline) + check_aggregate(dev, agg_cases, deadline)
    )
    if dev.type == "cuda":  # the Triton kernels are what this run is for: not running them on a GPU is a failure
        for r in report["correctness"]:
            if r["backend"] == "triton" and str(r["status"]).startswith("skipped"):
                r["status"] = f"FAIL: triton did not run on CUDA ({r['status']})"
    _print_checks(report["correctness"])
    failed = [r for r in report["correctness"] if str(r["status"]).startswith("FAIL")]
    checked = sum(r["status"] == "ok" for r in report["correctness"])
    untimed = sum(r["status"] == "no time" for r in report["correctness"])
    print(f"correctness: {checked} ok, {len(failed)} failing, {untimed} not run (budget) "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    if failed:
        print(f"CORRECTNESS FAILED: {len(failed)} check(s); nothing timed. Failing:")
        _print_checks(failed)
        dump()
        return 1
    if args.correctness_only:
        dump()
        return 0

    batch, size = (2, 16) if args.quick else (64, 56)
    report["attention_target"] = attention_target(dev, batch, size, args.repeats)
    for r in report["attention_target"]:
        if "ratio" in r:
            print(f"attention fwd+bwd {r['shape']} {r['dtype']}: triton {r['triton_ms']:.2f} ms, tiled "
                  f"{r['tiled_ms']:.2f} ms, ratio {r['ratio']:.2f} (target <= {OP_TARGET}: "
                  f"{'met' if r['met'] else 'MISSED'}); peak MiB {r['triton_mib']} vs {r['tiled_mib']}")  # fmt: skip
        else:
            print(f"attention target: {r['status']}")
    report["tile_sweep"] = tile_sweep(dev, batch, size, args.repeats)
    for r in report["tile_sweep"]:
        print(f"triton tiles stride {r['stride']} query {r['query_tile']} key {r['key_tile']}: {r['ms']:.2f} ms"
              f"{'  (current default)' if r['default'] else ''}")  # fmt: skip
    agg_shapes = [((1, 4, 8), 2)] if args.quick else [((64, 64, 56), 8), ((64, 128, 28), 16)]
    report["aggregate_timing"] = aggregate_timing(dev, agg_shapes, args.repeats)
    for r in report["aggregate_timing"]:
        print(
            "aggregation fwd+bwd " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else str(v) for k, v in r.items())
        )
    dump()

    table = op_table(dev, args.quick, args.repeats, start + args.budget)
    report["bench"] = [r.__dict__ for r in table]
    if table and args.csv:
        print(f"wrote {bench_op.write_csv(table, args.csv)}")
    if table and args.plot:
        print(f"wrote {bench_op.plot(table, args.plot)}")
    print(f"total {time.perf_counter() - start:.0f} s")
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
