"""kind_fast: fused kernels and drop-in PyTorch modules for KIND in Diffusion Transformers.

The top level holds the layer and its gate (``FastKindLinear``, ``ClassGate``), groups of layers
that read one input (``kind_group``), the ops (``kind_linear``, ``kind_linear_ref``,
``kind_linear_grouped``), conversion (``kindify``, ``kindify_from_pretrained``),
deployment (``save_export`` / ``load_export``, ``save_task`` / ``load_task`` / ``load_base``,
``MultiTaskDiT``), ``weight_cache``, backend selection and ``print_trainable_parameters``. The
DiT is ``kind_fast.models.dit``, the trainer ``kind_fast.train``; docs/design.md is the contract.

The subpackages are layers, each importing only those below it (docs/design.md, "Package
layout"): ``ops`` (the op family, its backends and ``_C`` loader), ``nn`` (gate, layers, caches),
``models`` (DiT, diffusion, kindify, exports, baselines), ``deploy`` (save/load, tasks, CUDA
graphs), ``perf`` (FLOPs, launch plans, time model, audit, benchmarks), ``train`` (the trainer,
its data, the demo, the commands); ``integrations`` (diffusers) and ``kernels`` (Triton sources).

Importing this package never initialises CUDA, imports Triton or loads the compiled
extension; backends are resolved on first use (see ``python -m kind_fast.info``).
"""

from kind_fast._version import __version__
from kind_fast.ops.backends import current_backend, set_backend, use_backend
from kind_fast.nn.caching import weight_cache
from kind_fast.deploy.export_io import load_export, save_export
from kind_fast.nn.gate import ClassGate
from kind_fast.models.kindify import kindify
from kind_fast.nn.layers import FastKindLinear, kind_group
from kind_fast.ops.kind_linear import kind_linear, kind_linear_ref
from kind_fast.ops.kind_linear_grouped import kind_linear_grouped
from kind_fast.deploy.serialization import kindify_from_pretrained
from kind_fast.deploy.tasks import MultiTaskDiT, load_base, load_task, save_task
from kind_fast.nn.utils import print_trainable_parameters

# kf.caching.invalidate() keeps working: the module is kind_fast.nn.caching (not in __all__)
from kind_fast.nn import caching  # noqa: F401,I001

__all__ = [
    "__version__",
    "ClassGate",
    "FastKindLinear",
    "kind_group",
    "kind_linear",
    "kind_linear_grouped",
    "kind_linear_ref",
    "kindify",
    "kindify_from_pretrained",
    "load_export",
    "save_export",
    "save_task",
    "load_task",
    "load_base",
    "MultiTaskDiT",
    "print_trainable_parameters",
    "use_backend",
    "current_backend",
    "set_backend",
    "weight_cache",
]
