"""Interop with other libraries (imported only on request: each module needs its library).

* ``kind_fast.integrations.diffusers``: class-conditional CFG sampling of a (kindified)
  ``DiTTransformer2DModel`` with any number of classes (``KindDiTPipeline``, ``sample_dit``).

The PEFT LoRA baseline lives in ``kind_fast.models.baselines``; kindify's diffusers round trip in
``kind_fast.models.kindify`` / ``kind_fast.deploy.serialization``.
"""
