"""Triton kernels of kind_fast, installed as ``kind_fast.kernels`` (never as a top-level
``kernels`` module: that name belongs to another PyPI package).

One file per op, named after the op (``kind_linear.py`` for ``kind_fast::kind_linear``).
Nothing here is imported by ``import kind_fast``: the Triton backend loads it on first use.
"""
