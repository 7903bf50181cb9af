"""The attention op and its neighbours: every backend vs the unfold reference, a 3x3 conv, the 1x1 projections and
the whole ACmix layer, forward + backward, at the ResNet shapes (B = 8; C = 64@56, 128@28, 256@14, 512@7;
stride 1 and 2). A thin wrapper over ``acmix bench op`` (library: :mod:`acmix.bench.op`); every flag works here.

    .venv/bin/python benchmarks/bench_op.py --csv results/op.csv --json results/op.json --plot results/op.png
"""

from __future__ import annotations

import sys

from acmix.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "op", *sys.argv[1:]]))
