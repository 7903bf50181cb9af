"""What ``ACmix(recompute=True)`` saves in a whole model: peak-RSS growth and time of one training step.

Each variant runs in a fresh interpreter (a process that already ran steps keeps freed pages): build the model and
the batch, reset the peak resident set (``/proc/self/clear_refs``, Linux), run one forward + backward, read
``VmHWM``; then time ``--repeats`` more steps. Usage::

    python benchmarks/recompute_memory.py --model acmix_resnet26 --batch 8 --resolution 224 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(model_name: str, batch: int, resolution: int, threads: int, recompute: bool, repeats: int) -> dict:
    import torch

    import acmix

    torch.set_num_threads(threads)
    model = acmix.create_model(model_name, num_classes=1000, acmix_kwargs={"recompute": recompute}).train()
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 1000, (batch,))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _vm_kib("VmRSS")
    step()
    peak = _vm_kib("VmHWM")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"recompute": recompute, "peak_growth_mib": (peak - base) / 1024, "step_ms": 1000 * times[len(times) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="acmix_resnet26")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        res = child(a.model, a.batch, a.resolution, a.threads, a.child == "on", a.repeats)
        print(json.dumps(res))
        return
    rows = []
    for flag in ("off", "on", "off", "on"):  # interleaved, twice
        out = subprocess.run(
            [sys.executable, __file__, "--child", flag, "--model", a.model, "--batch", str(a.batch),
             "--resolution", str(a.resolution), "--threads", str(a.threads), "--repeats", str(a.repeats)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for r in rows:
        mem, ms = r["peak_growth_mib"], r["step_ms"]
        print(f"recompute={r['recompute']!s:5} peak growth {mem:6.0f} MiB, step {ms:6.0f} ms")
    off = [r for r in rows if not r["recompute"]]
    on = [r for r in rows if r["recompute"]]
    mem = min(r["peak_growth_mib"] for r in on) / min(r["peak_growth_mib"] for r in off)
    tim = min(r["step_ms"] for r in on) / min(r["step_ms"] for r in off)
    print(f"{a.model} batch {a.batch} {a.resolution}^2, {a.threads} threads: recompute / plain peak growth {mem:.2f}, "
          f"time {tim:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
