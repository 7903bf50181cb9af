"""``acmix info``: versions, devices and the backends of both local ops, each with why it can or cannot run.

The ``cpp`` backend is compiled on first use; ``info`` reports its build state (built and cached, not built yet,
or why it cannot run) without starting a build.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from ..ops import choose_aggregate_backend, choose_backend
from ..ops._backends import cpp
from ..ops._dispatch import AGGREGATE, ATTENTION, Registry
from ..version import __version__


def _backend_rows(registry: Registry, cpu: torch.Tensor, cuda: torch.Tensor | None) -> list[dict[str, object]]:
    """One row per backend, best first: runnable on CPU / CUDA (float32 samples) and why not; opt-in reason."""
    rows = []
    for name in registry.names():
        backend = registry.get(name)
        ok_cpu, why_cpu = backend.can_run(cpu)
        if cuda is None:
            ok_cuda, why_cuda = False, "no CUDA device"
        else:
            ok_cuda, why_cuda = backend.can_run(cuda)
        rows.append(
            {
                "name": name,
                "runnable_on_cpu": ok_cpu,
                "reason": why_cpu,
                "runnable_on_cuda": ok_cuda,
                "reason_cuda": why_cuda,
                "opt_in": backend.opt_in,
                "description": backend.description,
            }
        )
    return rows


def collect_info() -> dict[str, object]:
    import timm

    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    # float32 samples with head_dim 16: what a typical ACmix layer would hand the ops
    sample = torch.empty(1, 1, 16, 1, 1)
    sample_cuda = torch.empty(1, 1, 16, 1, 1, device="cuda") if torch.cuda.is_available() else None
    info: dict[str, object] = {
        "acmix": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "devices": devices,
        "backends": _backend_rows(ATTENTION, sample, sample_cuda),
        "default_backend_cpu": choose_backend(sample).name,
        "aggregate_backends": _backend_rows(AGGREGATE, sample[0], None if sample_cuda is None else sample_cuda[0]),
        "default_aggregate_backend_cpu": choose_aggregate_backend(sample[0]).name,
        "cpp_extension": cpp.build_state(),  # never builds: says "not built yet" instead
    }
    if sample_cuda is not None:
        info["default_backend_cuda"] = choose_backend(sample_cuda).name
        info["default_aggregate_backend_cuda"] = choose_aggregate_backend(sample_cuda[0]).name
    return info


def _state(ok: object, reason: object) -> str:
    return "yes" if ok else f"no ({reason})"


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    titles = {"backends": "local-attention backends", "aggregate_backends": "SAN aggregation backends"}
    for key, value in info.items():
        if key in titles:
            print(f"{titles[key]} (best first):")
            for b in value:  # type: ignore[attr-defined]
                print(f"  {b['name']:<10} {b['description']}")
                print(f"  {'':<10} cpu: {_state(b['runnable_on_cpu'], b['reason'])}")
                print(f"  {'':<10} cuda: {_state(b['runnable_on_cuda'], b['reason_cuda'])}")
                if b["opt_in"]:
                    print(f"  {'':<10} opt-in only (never chosen automatically): {b['opt_in']}")
        else:
            print(f"{key}: {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, devices and the backends of both local ops (with reasons)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
