"""Integrations with other frameworks, each an optional extra (the core package needs none of them).

* :mod:`acmix.integrations.ultralytics` (``pip install 'acmix[yolo]'``): ``ACmix`` in ultralytics YOLO model YAMLs,
  and :class:`~acmix.integrations.ultralytics.ACmixDetectionTrainer` for DDP training.

This package imports nothing; import the integration you need.
"""
