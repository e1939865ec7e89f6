"""Triton kernels of kind_fast, installed as ``kind_fast.kernels`` (never as a top-level
``kernels`` module: that name belongs to another PyPI package).

One file per op, named after the op (``kind_linear.py`` for ``kind_fast::kind_linear``).
Nothing here is imported by ``import kind_fast``: the Triton backend loads it on first use.

Every module here may define ``audit_specs(full: bool = True) -> list[kind_fast.audit.AuditSpec]``:
the configs its launchers can launch on a GPU. ``python -m kind_fast.audit`` (and
tests/test_audit.py with ``full=False``, the short list CI compiles) builds each one for sm_90a
and checks spills, shared memory, warpgroup MMA and pipelined K-loops. The easy way to write
it: run the module's own launchers on ``meta`` tensors inside
``kind_fast.audit.capture_launches(label)``, which records each launch as a spec (see
``kind_linear.audit_specs`` / ``replay_launches``).
"""
