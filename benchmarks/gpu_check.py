"""One prepared GPU run (under 4 minutes on an H100/H200): correctness of every CUDA backend, then the op table.

1. Every local-attention backend that can run on CUDA (``flex``, ``tiled``, ``offset``) against the float64 unfold
   reference, forward and all gradients (q, k, v, rel_pos), in float32 / bfloat16 / float16, on a stage-1 shape,
   a strided odd shape and a tiny map; plus the aggregation backends.
2. ``acmix bench op`` on CUDA at the ResNet shapes (B = 8, float32, then bfloat16 for the attention op only).

Prints one compact summary; exits non-zero when a correctness check fails. Stops starting new sections when
``--budget`` seconds (default 200) have passed.

    .venv/bin/python benchmarks/gpu_check.py [--budget 200] [--json gpu_check.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback

import torch

from acmix.bench import op as bench_op
from acmix.ops import available_backends, get_backend, local_aggregate, local_attention
from acmix.ops._dispatch import AGGREGATE
from acmix.ops._reference import local_attention_reference
from acmix.ops.aggregation import local_aggregate_reference

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 2e-2), torch.bfloat16: (5e-2, 1e-1)}
CASES = [((2, 4, 16, 56, 56), 7, 1), ((2, 4, 32, 27, 29), 7, 2), ((1, 2, 16, 3, 2), 7, 1)]
#: compiled backends recompile per shape and dtype: check them on fewer combinations to stay inside the budget
COMPILED = {"flex"}


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return out.detach(), torch.autograd.grad((out * w).sum(), leaves)


def _attention(q, k, v, pos, *, kernel_size, stride, backend):
    if backend is None:
        return local_attention_reference(q, k, v, kernel_size, stride, pos)
    return local_attention(q, k, v, kernel_size, stride, pos, backend=backend)


def check_attention(dev: torch.device, deadline: float = float("inf")) -> list[dict]:
    results = []
    for name in available_backends():
        if name == "reference":
            continue
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for i, (shape, ks, stride) in enumerate(CASES):
                if name in COMPILED and dtype != torch.float32 and i > 0:
                    continue  # low precision: stage-1 shape only
                if time.perf_counter() > deadline:
                    results.append({"op": "attention", "backend": name, "dtype": str(dtype), "status": "no time"})
                    continue
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(shape, generator=g).to(dev, dtype) for _ in range(3))
                pos = torch.randn(shape[2:], generator=g).to(dev, dtype)
                ok, why = get_backend(name).can_run(q)
                row = {"op": "attention", "backend": name, "dtype": str(dtype), "shape": shape, "stride": stride}
                if not ok:
                    results.append({**row, "status": f"skipped: {why}"})
                    continue
                try:
                    t0 = time.perf_counter()
                    fast = functools.partial(_attention, kernel_size=ks, stride=stride, backend=name)
                    ref = functools.partial(_attention, kernel_size=ks, stride=stride, backend=None)
                    got, got_g = _grads(fast, (q, k, v, pos))
                    want, want_g = _grads(ref, [t.double() for t in (q, k, v, pos)])
                    fwd_err = (got.double() - want).abs().max().item()
                    bwd_err = max((a.double() - b).abs().max().item() for a, b in zip(got_g, want_g))
                    fwd_tol, bwd_tol = TOL[dtype]
                    # relative to the magnitude, as assert_close(atol=rtol=tol) would
                    fwd_ok = bool(torch.allclose(got.double(), want, atol=fwd_tol, rtol=fwd_tol))
                    bwd_ok = all(
                        bool(torch.allclose(a.double(), b, atol=bwd_tol, rtol=bwd_tol)) for a, b in zip(got_g, want_g)
                    )
                    status = "ok" if fwd_ok and bwd_ok else "FAIL"
                    results.append(
                        {**row, "status": status, "fwd_err": fwd_err, "bwd_err": bwd_err,
                         "s": round(time.perf_counter() - t0, 2)}
                    )  # fmt: skip
                except Exception as exc:  # report and go on: one failing backend must not hide the others
                    traceback.print_exc()
                    results.append({**row, "status": f"FAIL: {type(exc).__name__}: {exc}"[:300]})
    return results


def check_aggregate(dev: torch.device) -> list[dict]:
    results = []
    for name in AGGREGATE.names():
        if name == "reference":
            continue
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 32, 28, 27, generator=g).to(dev, dtype)
            w = torch.randn(2, 4, 49, 14, 14, generator=g).to(dev, dtype)
            got, got_g = _grads(lambda a, b, n=name: local_aggregate(a, b, 7, 2, backend=n), (x, w))
            want, want_g = _grads(lambda a, b: local_aggregate_reference(a, b, 7, 2), (x.double(), w.double()))
            tol = TOL[dtype][1]
            ok = bool(torch.allclose(got.double(), want, atol=tol, rtol=tol)) and all(
                bool(torch.allclose(a.double(), b, atol=tol, rtol=tol)) for a, b in zip(got_g, want_g)
            )
            results.append({"op": "aggregate", "backend": name, "dtype": str(dtype), "status": "ok" if ok else "FAIL"})
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which no new section starts")
    parser.add_argument("--json", default=None, help="write everything as JSON")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do", file=sys.stderr)
        return 2
    start = time.perf_counter()
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    report: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}

    report["correctness"] = check_attention(dev, start + 0.45 * args.budget) + check_aggregate(dev)
    failed = [r for r in report["correctness"] if str(r["status"]).startswith("FAIL")]
    for r in report["correctness"]:
        errs = f"fwd {r['fwd_err']:.1e} bwd {r['bwd_err']:.1e} ({r['s']} s)" if "fwd_err" in r else ""
        print(f"  {r['op']:9s} {r['backend']:8s} {r['dtype']:15s} {str(r.get('shape', '')):22s} "
              f"s{r.get('stride', '')} {r['status'][:90]} {errs}")  # fmt: skip
    print(f"correctness: {len(failed)} failing of {len(report['correctness'])} ({time.perf_counter() - start:.0f} s)")

    report["bench"] = []
    for dtype, subjects in (("float32", list(bench_op.SUBJECTS)), ("bfloat16", ["attention", "conv3x3", "proj1x1"])):
        rows = []
        groups = bench_op.specs_for(bench_op.RESNET_SHAPES, [1, 2], dtype=dtype, device="cuda", subjects=subjects)
        for group in groups:
            if time.perf_counter() - start > args.budget:
                print(f"budget of {args.budget:.0f} s spent; skipping {dtype} {group[0].channels}@{group[0].size}")
                continue
            try:
                rows += bench_op.run([group], warmup=3, repeats=args.repeats, memory="inprocess", threads=None)
            except Exception:
                traceback.print_exc()
        if not rows:
            continue
        print()
        print(bench_op.format_environment(rows))
        print(bench_op.format_table(rows))
        print(bench_op.format_summary(bench_op.summarize(rows)))
        report["bench"] += [r.__dict__ for r in rows]
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
