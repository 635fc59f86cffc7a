"""Triton kernels, imported lazily by the op modules (Triton is an optional dependency).

Triton decides at definition time whether a kernel is compiled or run by its CPU
interpreter (``TRITON_INTERPRET=1``), so that variable must be set before these modules are
first imported.
"""
