"""Measurement and models of cost: analytic FLOPs (``flops``), the traffic model over the kernels'
launch plans (``perfmodel``), the time model and launch recorder (``timemodel``, ``launches``), the
kernels' launches at the audited shapes (``replay``), the static kernel audit (``audit``) and
model-level benchmarks (``benchmark``). May import every layer below
``train`` (``ops``, ``nn``, ``models``, ``kernels``), never ``deploy`` or ``train`` (tests/test_layering.py).
"""
