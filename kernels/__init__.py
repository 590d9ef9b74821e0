"""Triton kernels, one module per op family (installed as ``fastssl.kernels``).

Modules here import triton at import time; ``fastssl._dispatch`` imports them lazily.
"""
