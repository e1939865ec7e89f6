"""What was computed from a labels tensor, kept while that tensor is unchanged.

Every KIND layer of a model sees the same labels tensor in a step, so the per-labels work (the
range check, the classes present and their rows, the tailor plan, the slots of a segmented GEMM)
is done once and reused by the other layers. "Unchanged" must really mean unchanged: a write
through ``labels.data[...]`` or ``labels.numpy()[...]`` changes the values without bumping the
version counter, and a plan kept on the version alone would then serve the old labels (a silent
wrong answer). So a hit needs the same tensor object, the same version counter and the same
values:

* CPU labels: compared with a copy taken when the value was kept (B integers: microseconds);
* CUDA labels: reading them would synchronise, so a hit enqueues a device assertion that they
  still equal the copy: a changed tensor is an error at the next synchronisation, never a silent
  reuse (pass a new labels tensor instead of writing into the old one behind autograd's back);
* inference tensors (made under ``torch.inference_mode``) have no version counter: never kept.

Callers skip the memo under torch.compile and dispatch modes (they trace instead).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["LabelsMemo", "check_labels"]


class LabelsMemo:
    """One kept value per memo, for the labels tensor seen last (and an ``extra`` key)."""

    __slots__ = ("_ref", "_version", "_copy", "_extra", "_value")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._ref = self._version = self._copy = self._extra = self._value = None

    def get(self, labels: Tensor, extra: Any = None) -> Any:
        """The value kept for ``labels`` (and ``extra``), or None when it was not kept for this
        tensor or the tensor changed since (see the module docstring)."""
        ref = self._ref
        if ref is None or ref() is not labels or self._extra != extra or labels.is_inference():
            return None
        if self._version != labels._version or self._copy.shape != labels.shape:
            return None
        if labels.device.type == "cpu":
            if not torch.equal(labels, self._copy):
                return None
        elif labels.device.type == "cuda":
            torch._assert_async((labels == self._copy).all(),
                                "kind_fast: labels were changed in place without autograd seeing it (through .data "
                                "or a view of its memory) after a layer used them; pass a new labels tensor instead")
        return self._value

    def put(self, labels: Tensor, value: Any, extra: Any = None) -> Any:
        """Keep ``value`` for ``labels`` (not for an inference tensor); returns ``value``."""
        if labels.is_inference():
            self.clear()
            return value
        self._ref, self._version, self._extra, self._value = weakref.ref(labels), labels._version, extra, value
        self._copy = labels.detach().clone()
        return value


def check_labels(labels: Any, num_classes: int, *, name: str = "labels") -> Tensor:
    """Validate per-sample labels: a 1-D integer tensor with values in [0, num_classes].

    ``num_classes`` is the gate's C; the value C is the null class. The range check reads
    the values, so it runs where that is free: on CPU tensors, and on GPU tensors only as an
    asynchronous device assertion (no host sync). Under torch.compile the range check is traced
    as a device assertion (``torch._assert_async``, lowered by Inductor into the graph): it
    survives tracing and still names the range.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class ids, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one class id per sample), got shape {tuple(labels.shape)}")
    if torch.compiler.is_compiling():
        torch._assert_async(((labels >= 0) & (labels <= num_classes)).all(),
                            f"{name} out of range: expected class ids in [0, {num_classes}] "
                            f"({num_classes} classes; {num_classes} is the null class)")
        return labels
    if labels.numel() == 0:
        return labels
    # Every KIND layer of a model sees the same labels tensor: check it once while it is unchanged
    # (kind_fast.ops.labels: the same tensor, version and values; inference tensors every call).
    if _CHECKED.get(labels, num_classes) is not None:
        return labels
    if labels.device.type == "cpu":
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(
                f"{name} out of range: got values in [{lo}, {hi}], expected [0, {num_classes}] "
                f"({num_classes} classes; {num_classes} is the null class)"
            )
    elif labels.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch._assert_async(
            ((labels >= 0) & (labels <= num_classes)).all(),
            f"{name} out of range [0, {num_classes}]",
        )
    _CHECKED.put(labels, True, num_classes)
    return labels


_CHECKED = LabelsMemo()  # the last labels tensor that passed the check, per num_classes
