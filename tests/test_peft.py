"""The LoRA baseline through PEFT: the same trainable set and outputs as the hand-written LoRA it
replaced, merge_and_unload, adapter folders."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kind_fast.models.baselines import HEAD_MODULES, apply_lora, lora_config
from kind_fast.models.dit import DiT
from kind_fast.models.kindify import replace_linears
from kind_fast.testing import perturbed, tiny_dit

peft = pytest.importorskip("peft")


class OldLoRALinear(nn.Module):
    """The baseline's previous hand-written layer (kept here as the reference it must match)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = (rank if alpha is None else alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def old_apply_lora(model, rank, alpha=None):
    model.requires_grad_(False)
    replace_linears(model, None, lambda name, lin: OldLoRALinear(lin, rank, alpha))
    for h in HEAD_MODULES:
        getattr(model, h).requires_grad_(True)
    return model



def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 2, 8, 8, generator=g), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 6])


def trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("rank,alpha", [(4, None), (2, 8.0)])
def test_same_trainable_count_and_outputs_as_the_old_baseline(rank, alpha):
    base = tiny_dit()
    x, t, y = inputs()
    ref = base(x, t, y)
    old = old_apply_lora(copy.deepcopy(base), rank, alpha)
    new = apply_lora(copy.deepcopy(base), rank, alpha=alpha)
    assert isinstance(new, peft.PeftModel)
    assert trainable(new) == trainable(old) > 0
    # at initialisation (B = 0) both are the base model
    torch.testing.assert_close(new(x, t, y), ref, rtol=0, atol=0)
    torch.testing.assert_close(old(x, t, y), ref, rtol=0, atol=0)
    # with the same nonzero A, B (and trained heads) they agree: same placement and α/r scaling
    with torch.no_grad():
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for i in range(2):
                o = old.blocks[i].get_submodule(name)
                n = new.base_model.model.blocks[i].get_submodule(name)
                o.lora_B.normal_()
                n.lora_A["default"].weight.copy_(o.lora_A)
                n.lora_B["default"].weight.copy_(o.lora_B)
        for h in HEAD_MODULES:
            for p_old, p_new in zip(getattr(old, h).parameters(),
                                    getattr(new.base_model.model, h).modules_to_save["default"].parameters()):
                p_old.add_(0.1)
                p_new.copy_(p_old)
    out = new(x, t, y)
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(out, old(x, t, y), rtol=1e-5, atol=1e-6)
    # trained parameters: adapters of the 4 block linears per block, and the two heads in full
    names = [n for n, p in new.named_parameters() if p.requires_grad]
    assert sum("lora_A" in n for n in names) == 8 and all(
        "lora_" in n or "modules_to_save" in n for n in names)


def test_merge_and_unload_and_adapter_folder(tmp_path):
    base = tiny_dit()
    x, t, y = inputs()
    model = apply_lora(copy.deepcopy(base), 4)
    perturbed(model, trainable_only=True)
    ref = model(x, t, y)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(x, t, y), ref, rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert type(merged) is DiT and type(merged.blocks[0].attn.qkv) is nn.Linear
    assert type(merged.y_embedder).__name__ == "LabelEmbedder"
    torch.testing.assert_close(merged(x, t, y), ref, rtol=1e-5, atol=1e-6)


def test_errors_and_config():
    with pytest.raises(ValueError, match="rank"):
        lora_config(0, model=tiny_dit())
    with pytest.raises(ValueError, match="target_modules= or model="):
        lora_config(4)
    from kind_fast.models.dit import KindConfig

    kind = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=4, num_classes=3,
               kind=KindConfig(tailor_rank=8, active=4))
    with pytest.raises(TypeError, match="KIND layer"):
        apply_lora(kind, 4)
    cfg = lora_config(4, alpha=8, model=tiny_dit())
    assert cfg.r == 4 and cfg.lora_alpha == 8 and set(cfg.modules_to_save) == set(HEAD_MODULES)


def test_missing_peft_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ImportError, match="pip install peft"):
        apply_lora(tiny_dit(), 4)
