"""Registered op families of kind_fast (``torch.ops.kind_fast.*``)."""

from kind_fast.ops.kind_linear import kind_linear, kind_linear_backward_ref, kind_linear_ref

__all__ = ["kind_linear", "kind_linear_ref", "kind_linear_backward_ref"]
