"""The modules users put in their models: the class gate (``gate``), the layer ``FastKindLinear``
and its grouped projections (``layers``), the weight caches (``caching``, ``merged_cache``) and
model helpers (``utils``). May import ``kind_fast.ops`` and the top-level helpers only.

Nothing is imported here: ``kind_fast`` re-exports the public names (``kind_fast.FastKindLinear``, ...).
"""
