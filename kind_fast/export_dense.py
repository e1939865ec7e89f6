"""The dense export: one class of a KIND-DiT as a plain DiT that serves that class only.

``DiT.to_dense(c)`` folds class c's tailors into dense block weights,

    W = W_G + U_Tᵀ diag(σ_T ⊙ g_c) V_T,

so the result equals the KIND model exactly for label c, and for no other label: label c'
would need g_{c'}, and the null label of classifier-free guidance the learngenes alone. A plain
``DiT`` would still take any label and answer without complaint. ``DenseExportDiT`` is that
plain DiT (same modules, same facebookresearch-layout state dict) whose forward refuses every
label but c, naming c; ``forward_with_cfg`` is refused (no null label). ``DiT.export(c,
"dense", guidance=False)`` and ``kind_fast.load_export`` of a dense export return one.
"""

from __future__ import annotations

from torch import Tensor

from kind_fast.dit import DiT
from kind_fast.export import check_served, per_labels

__all__ = ["DenseExportDiT"]


class DenseExportDiT(DiT):
    """A dense DiT exact for the one class ``export_classes[0]``; other labels are a ValueError."""

    export_classes: list[int]
    _plan_cache: tuple | None = None

    @classmethod
    def from_dense(cls, dense: DiT, class_id: int) -> DenseExportDiT:
        """``dense`` (= ``to_dense(class_id)`` of a KIND-DiT) as the export of ``class_id``
        (its tensors are taken over, not copied)."""
        if not isinstance(dense, DiT) or dense.kind is not None:
            raise TypeError(f"DenseExportDiT.from_dense takes a dense DiT (kind=None), got {type(dense).__name__}")
        import torch

        with torch.device("meta"):
            out = cls(**dense.arch, kind=None)
        out.load_state_dict(dense.state_dict(), strict=True, assign=True)
        return out.serving(class_id).train(dense.training)

    def serving(self, class_id: int) -> DenseExportDiT:
        if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < self.num_classes:
            raise ValueError(f"a dense export serves one class id in [0, {self.num_classes}), got {class_id!r}")
        self.export_classes = [class_id]
        self._plan_cache = None
        return self

    def __getstate__(self):  # the label cache holds a weak reference: not picklable, not needed
        return {**self.__dict__, "_plan_cache": None}

    def _check(self, y: Tensor, labels: list[int]) -> bool:
        c = self.export_classes[0]
        check_served(labels, self.export_classes, self.num_classes, False,
                     f"this dense export (exact for class {c} only)",
                     hint=f"A dense export holds class {c}'s weights; export the others with --form merged or "
                          "reduced (which also serve the null label for classifier-free guidance)")
        return True

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is not None and bool(force_drop_ids.any()):
            raise ValueError(f"this dense export serves class {self.export_classes[0]} only: it has no null label "
                             "to drop labels to (force_drop_ids)")
        per_labels(self, y, self._check)
        return super().forward(x, t, y)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        raise ValueError(f"this dense export serves class {self.export_classes[0]} without guidance (no null "
                         "label): it cannot run classifier-free guidance; sample it with cfg scale 1, or export "
                         "with --form merged or reduced for CFG-exact samples")

    def extra_repr(self) -> str:
        return f"dense export of class {self.export_classes[0]}"
