"""LoRA runs through PEFT in the trainer: exact resume, export (weights + PEFT adapter folder),
load_weights → PeftModel → merge_and_unload."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from kind_fast.train.loop import Trainer
from kind_fast.train.models import load_weights

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_config  # noqa: E402

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    tr = Trainer(tiny_config(out, steps=2))
    tr.train()
    tr.export()
    tr.close()
    return out


def lora_cfg(out, pretrained, steps=5):
    return tiny_config(out, "transfer", steps=steps, optim={"ema_decay": 0.9},
                       method={"name": "lora", "init": str(pretrained), "lora_rank": 2})


def test_lora_resume_is_bitwise(tmp_path, pretrained):
    a = Trainer(lora_cfg(tmp_path / "a", pretrained))
    assert isinstance(a.model, peft.PeftModel)
    losses_a = a.train()
    state_a = a.checkpoint_state()
    a.close()
    b = Trainer(lora_cfg(tmp_path / "b", pretrained))
    b.train(until=2)
    b.save_checkpoint()
    b.close()
    torch.manual_seed(999)
    np.random.seed(3)
    c = Trainer(lora_cfg(tmp_path / "b", pretrained), resume="auto")
    assert c.step == 2
    losses_c = c.train()
    state_c = c.checkpoint_state()
    c.close()
    assert losses_c == losses_a
    for part in ("model", "ema"):
        assert set(state_a[part]) == set(state_c[part])
        for k, v in state_a[part].items():
            assert torch.equal(v, state_c[part][k]), (part, k)
    assert any("lora_B" in k for k in state_a["ema"]) and any("modules_to_save" in k for k in state_a["ema"])


def test_lora_export_adapter_and_merge(tmp_path, pretrained):
    tr = Trainer(lora_cfg(tmp_path / "run", pretrained, steps=3))
    tr.train()
    paths = tr.export()
    live = tr.eval_model("ema")
    tr.close()
    ema = paths["ema"]
    assert (ema / "model.safetensors").is_file() and (ema / "adapter" / "adapter_model.safetensors").is_file()
    model = load_weights(ema).eval()
    assert isinstance(model, peft.PeftModel)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([5, 700]), torch.tensor([0, 1])
    ref = live(x, t, y)
    torch.testing.assert_close(model(x, t, y), ref, rtol=0, atol=0)
    # the adapter folder on the run's base model (the retargeted dense export of the init)
    from kind_fast.train.models import build_from_spec, read_spec

    spec = read_spec(ema)
    base = build_from_spec(dict(spec, method="full")).eval()  # same dense DiT structure, other weights
    state = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}
    base_state = {k.replace(".base_layer", ""): v for k, v in state.items()
                  if "lora_" not in k and "modules_to_save" not in k}
    base_state = {k.replace(".original_module", ""): v for k, v in base_state.items()}
    base.load_state_dict(base_state)
    adapted = peft.PeftModel.from_pretrained(base, ema / "adapter").eval()
    torch.testing.assert_close(adapted(x, t, y), ref, rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "DiT" and merged.kind is None
    torch.testing.assert_close(merged(x, t, y), ref, rtol=1e-5, atol=1e-5)
