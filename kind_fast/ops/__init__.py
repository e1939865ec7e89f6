"""The op family (``torch.ops.kind_fast.*``): the ops and their schemas, the paths and their cost
model, the backends and their selection, the self-check, the guarded loader of ``kind_fast._C``.
May import the top-level helpers (``_tracing``, ``_version``) and ``kind_fast.kernels`` (on first
use: the Triton kernels and their launch plans), never ``perf``, ``nn``, ``models``, ``deploy`` or
``train`` (tests/test_layering.py).

The functional is ``kind_fast.kind_linear``; ``kind_fast.ops.kind_linear`` is the module
(reference → registered ops → autograd → functional). ``kind_fast.ops.kind_linear_merged`` is
path M3 of the same family (merged per-class weights); ``kind_fast.ops.paths`` is the one entry
point that picks a path per call (FastKindLinear calls it); ``backends`` / ``autoselect`` pick the
backend, ``self_check`` proves one on first use, ``_ext`` / ``_cuda_toolkit`` build and load ``_C``.
"""

from kind_fast.ops import kind_linear  # noqa: F401  (registers torch.ops.kind_fast.kind_linear*)
