"""The models: the DiT (``dit``), its diffusion process (``diffusion``), kindify for other models
(``kindify``), dense-checkpoint readers (``dense_io``), the CFG-exact export forms (``export``) and
the baselines (``baselines``: LoRA, SVDiff, Heur-LG, TLEG). May import ``nn``, ``ops`` and the
top-level helpers, never ``deploy``, ``perf`` or ``train`` (tests/test_layering.py).
"""
