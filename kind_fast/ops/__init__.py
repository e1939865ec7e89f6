"""Registered op families of kind_fast (``torch.ops.kind_fast.*``), one module per op.

The functional is ``kind_fast.kind_linear``; ``kind_fast.ops.kind_linear`` is the module
(reference → registered ops → autograd → functional). ``kind_fast.ops.kind_linear_merged`` is
path M3 of the same family (merged per-class weights); ``kind_fast.ops.paths`` is the one entry
point that picks a path per call (FastKindLinear calls it).
"""

from kind_fast.ops import kind_linear  # noqa: F401  (registers torch.ops.kind_fast.kind_linear*)
