"""Benchmarks as library code (scripts in ``benchmarks/`` and ``acmix bench`` are thin wrappers).

* :mod:`acmix.bench.op`: forward + backward time and peak memory of the attention op, its backends, a 3 x 3 conv,
  the 1 x 1 projections and the whole ACmix layer at the ResNet shapes (``acmix bench op``);
* :mod:`acmix.bench.runner` / :mod:`acmix.bench.model`: whole models (``acmix bench model``);
* :mod:`acmix.bench.env`: device and version capture, device sync, peak-memory probe.

Submodules are imported on demand (``from acmix.bench import op``) so that importing the package stays cheap.
"""
