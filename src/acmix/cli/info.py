"""``acmix info``: versions, devices and local-attention backends.

The ``cpp`` backend is compiled on first use; ``info`` reports its build state (built and cached, not built yet,
or why it cannot run) without starting a build.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from ..ops import backend_status, choose_backend
from ..ops._backends import cpp
from ..version import __version__


def collect_info() -> dict[str, object]:
    import timm

    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    sample = torch.empty(1, 1, 1, 1, 1)
    return {
        "acmix": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "devices": devices,
        "backends": [{"name": n, "runnable_on_cpu": ok, "reason": why} for n, ok, why in backend_status(sample)],
        "default_backend_cpu": choose_backend(sample).name,
        "cpp_extension": cpp.build_state(),  # never builds: says "not built yet" instead
    }


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "backends":
            print("backends:")
            for b in value:  # type: ignore[attr-defined]
                state = "yes" if b["runnable_on_cpu"] else f"no ({b['reason']})"
                print(f"  {b['name']:<12} cpu: {state}")
        else:
            print(f"{key}: {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, devices and available backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
