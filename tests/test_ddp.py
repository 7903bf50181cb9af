"""DDP: `torchrun --nproc_per_node 2 -m acmix train` (gloo, CPU) equals one process on the same global batch.

Equivalence needs the same maths in both runs: acmix_micro with GroupNorm (per-sample statistics; torch's
SyncBatchNorm has no CPU kernel, and plain BatchNorm would normalise each rank's half-batch separately), no dropout
and no random augmentation. Rank r of 2 sees samples r, r+2, ... of the epoch's permutation, so one update of
2 x 16 images uses exactly the 32 images of the single-process update; DDP averages the two half-batch gradients,
which equals the full-batch mean. Tolerance: 1e-5 absolute on every weight after 4 AdamW updates (float32
all-reduce summation order differs from a single batched reduction).
"""

from __future__ import annotations

import os
import subprocess
import sys

import timm
import torch
from safetensors.torch import load_file

from acmix.cli.main import main

COMMON = [
    "--model-kwargs",
    "norm_layer=groupnorm",
    "--drop-rate",
    "0",
    "--shift-aug",
    "0",
    "--max-steps",
    "4",
    "--warmup-epochs",
    "0",
    "--epochs",
    "1",
    "--no-progress",
    "--no-plots",
    "--threads",
    "1",
    "--device",
    "cpu",
]


def test_two_process_gloo_equals_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    ddp_run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "acmix",
        "train",
        "--batch-size",
        "16",
        "--output",
        str(ddp_run),
        *COMMON,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    single_run = tmp_path / "single"
    assert main(["train", "--batch-size", "32", "--output", str(single_run), *COMMON]) == 0
    a = load_file(str(ddp_run / "last.safetensors"))
    b = load_file(str(single_run / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    # the runs really trained: the weights moved far more than the two runs differ
    torch.manual_seed(0)
    init = timm.create_model("acmix_micro", num_classes=10, in_chans=1, drop_rate=0.0, norm_layer="groupnorm")
    init_sd = init.state_dict()
    moved = max(float((a[k] - init_sd[k]).abs().max()) for k in a)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3 and gap < moved / 100, (moved, gap)
    # only rank 0 wrote: exactly one set of checkpoint files
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == [
        "e0000-u00000004.safetensors",
        "e0000-u00000004.state.pt",
    ]
