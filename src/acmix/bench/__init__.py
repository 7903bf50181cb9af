"""Benchmarks as library code (scripts in ``benchmarks/`` and ``acmix bench`` are thin wrappers).

* :mod:`acmix.bench.op`: forward + backward time and peak memory of the attention op, its backends, a 3 x 3 conv,
  the 1 x 1 projections and the whole ACmix layer at the ResNet shapes (``acmix bench op``);
* :mod:`acmix.bench.model`: whole models, each ACmix model beside its baseline and its official-style formulation
  (``acmix bench model``), on top of

  - :mod:`acmix.bench.config`: what to measure (:class:`BenchConfig`) and the result rows (:class:`BenchResult`);
  - :mod:`acmix.bench.runner`: warm-up, timing, interleaved repeats and out-of-memory halving;
  - :mod:`acmix.bench.switch`: which implementation of the ACmix ops a row runs (the backend switch);
  - :mod:`acmix.bench.memory`: peak memory in a fresh interpreter, and the memory modes;
  - :mod:`acmix.bench.profiling`: a ``torch.profiler`` table of one step;
* :mod:`acmix.bench.report`: text tables and atomic CSV / JSON / PNG writers shared by both;
* :mod:`acmix.bench.env`: device and version capture, device sync, thread setting, peak-memory probe.
"""

from .config import BenchConfig, BenchResult
from .model import compare_models, compute_ratios
from .profiling import profile_step
from .runner import BenchCase, time_inference, time_interleaved, time_train_step

__all__ = [
    "BenchCase",
    "BenchConfig",
    "BenchResult",
    "compare_models",
    "compute_ratios",
    "profile_step",
    "time_inference",
    "time_interleaved",
    "time_train_step",
]
