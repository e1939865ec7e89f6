"""Triton kernels of kind_fast, imported as ``kind_fast.kernels`` (never as a top-level
``kernels`` module: that name belongs to another PyPI package, which transformers and
diffusers import).

The kernel sources live in the repository's top-level ``kernels/`` folder. That folder has no
``__init__.py`` on purpose: from the repository root, ``python -m``/``python -c`` put the root
first on ``sys.path``, and a *regular* package there would hide the installed ``kernels``
package; a folder without ``__init__.py`` is at most a namespace portion, which Python uses
only when no regular package of that name exists anywhere on the path (docs/design.md,
"Packaging"). This package is the one import name for the kernels:

* in a wheel, ``setup.py`` copies ``kernels/*.py`` beside this file;
* in a source checkout or an editable install, the sources are not beside this file, so the
  top-level ``kernels/`` folder is appended to ``__path__`` below.

One file per op, named after the op (``kind_linear.py`` for ``kind_fast::kind_linear``).
Nothing here is imported by ``import kind_fast``: the Triton backend loads it on first use.

The modules here import nothing of the package (only torch, Triton, the standard library and
each other, as ``kind_fast.kernels.<module>``; tests/test_layering.py): ``kind_linear_plans`` holds
the launch plans the launchers take (pure Python; ``kind_fast.perf.perfmodel`` re-exports them).
The static audit's cases, the replays of each kernel module's launchers on ``meta`` tensors, live
above them in ``kind_fast.perf.replay`` (``AUDIT_CASES``); ``python -m kind_fast.perf.audit``
refuses a module here that defines Triton kernels and has no entry there.
"""

from __future__ import annotations

import os as _os

#: a file every kernel folder of ours holds (tells our ``kernels/`` from the PyPI package)
_MARKER = "kind_linear.py"


def _source_folder() -> str | None:
    """The top-level ``kernels/`` folder of the checkout this package sits in, when its kernel
    files are not installed beside this file (source checkout, editable install)."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isfile(_os.path.join(here, _MARKER)):
        return None  # a wheel: the kernels were installed here
    src = _os.path.join(_os.path.dirname(_os.path.dirname(here)), "kernels")
    ours = _os.path.isfile(_os.path.join(src, _MARKER)) and not _os.path.exists(_os.path.join(src, "__init__.py"))
    return src if ours else None


_src = _source_folder()
if _src is not None:
    __path__.append(_src)  # noqa: F821 - __path__ is defined for every package
del _src
