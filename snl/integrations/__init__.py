"""Adapters that run :class:`snl.SNL` inside other frameworks.

Each adapter lives in its own module and imports its framework only when that module is
imported, so ``import snl`` never needs them:

- :mod:`snl.integrations.anomalib`: ``SNL``, an anomalib 2.x ``AnomalibModule``
  (``pip install "snl-kernels[anomalib]"``).
"""
