"""Run tests/test_triton_backend.py in Triton's CPU interpreter, in a subprocess.

Triton fixes interpreter-or-GPU when it decorates a kernel, and an interpreted backend would then be runnable for
every CPU test of the worker process; a child process with ``TRITON_INTERPRET=1`` keeps the rest of the suite on
the usual CPU backends. On a machine with CUDA the module runs natively instead (in the same ``make test``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acmix.ops._backends.triton_attention import triton_status

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_triton_backend.py runs natively")
@pytest.mark.skipif(not triton_status()[0], reason=triton_status()[1])
def test_triton_kernels_in_the_cpu_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfEs"]
    proc = subprocess.run(
        [*cmd, str(ROOT / "tests" / "test_triton_backend.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter run failed (rc {proc.returncode}):\n{tail}"
    summary = re.search(r"(\d+) passed", proc.stdout)
    assert summary and int(summary.group(1)) >= 30, f"too few interpreter tests ran:\n{tail}"
    assert "skipped" not in proc.stdout.splitlines()[-1], f"interpreter tests were skipped:\n{tail}"
