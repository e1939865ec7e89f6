"""Deployment: save/load of KIND models (``serialization``), of exports (``export_io``), tasks on
one shared base (``tasks``: ``MultiTaskDiT``) and CUDA-graph replay (``graphs``). May import
``models``, ``nn``, ``ops`` and the top-level helpers, never ``perf`` or ``train`` (tests/test_layering.py).
"""
