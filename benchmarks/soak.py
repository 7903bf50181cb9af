"""Soak: >= 2,000 training updates of ``acmix train`` on the embedded digits, sampling resident memory (RSS).

Starts the real command (default 90 epochs x 23 updates = 2,070 updates, plots and checkpoints every epoch),
samples the process's RSS from /proc every second, drops the first 10 % of the run (start-up), and reports the median
RSS of the first and of the last tenth of the rest, their difference (growth; must stay within ``--bound-mb``) and
the least-squares trend in MB per 1,000 updates.

    .venv/bin/python benchmarks/soak.py [--epochs 90] [--bound-mb 50] [--json results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--bound-mb", type=float, default=50.0)
    p.add_argument("--interval-s", type=float, default=1.0)
    p.add_argument("--json")
    args = p.parse_args()
    run = Path(tempfile.mkdtemp(prefix="acmix-soak-")) / "run"
    cmd = [sys.executable, "-m", "acmix", "train", "--epochs", str(args.epochs), "--output", str(run), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []
    while proc.poll() is None:
        m = rss_mb(proc.pid)
        if m is not None:
            samples.append((time.perf_counter() - t0, m))
        time.sleep(args.interval_s)
    out, err = proc.communicate()
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
        return proc.returncode
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    import statistics

    n = len(samples)
    warm = samples[max(1, n // 10) :]  # drop start-up (imports, first allocations)
    k = max(1, len(warm) // 10)
    early = statistics.median(m for _, m in warm[:k])  # median RSS of the first tenth after warm-up
    late = statistics.median(m for _, m in warm[-k:])  # ... and of the last tenth
    ts = [t for t, _ in warm]
    ms = [m for _, m in warm]
    tbar, mbar = statistics.fmean(ts), statistics.fmean(ms)
    slope = sum((t - tbar) * (m - mbar) for t, m in warm) / max(sum((t - tbar) ** 2 for t in ts), 1e-9)  # MB/s
    updates = rows[-1]["updates"]
    duration = ts[-1] - ts[0] if len(ts) > 1 else 1.0
    result = {
        "updates": updates,
        "epochs": len(rows),
        "seconds": round(samples[-1][0], 1) if samples else None,
        "rss_median_first_tenth_mb": round(early, 1),
        "rss_median_last_tenth_mb": round(late, 1),
        "rss_min_max_after_warmup_mb": [round(min(ms), 1), round(max(ms), 1)],
        "growth_mb": round(late - early, 1),
        "trend_mb_per_1000_updates": round(slope * duration / max(updates * 0.9, 1) * 1000, 1),
        "bound_mb": args.bound_mb,
        "within_bound": (late - early) <= args.bound_mb,
        "final_top1": round(rows[-1]["val_top1"], 2),
        "samples": [(round(t, 1), round(m, 1)) for t, m in samples[:: max(1, n // 40)]],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["within_bound"] and result["updates"] >= 2000 else 1


if __name__ == "__main__":
    sys.exit(main())
