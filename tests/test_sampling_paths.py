"""Sampling with merged per-class weights (path M3) and CUDA-graph capture of the model call:
the samples equal path M1's, KIND-DiT's layers take M3 on weights merged once, the graph
decision and its eager fallback (CPU), and the capture itself on a GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from kind_fast.models.dit import DiT, KindConfig
from kind_fast.deploy.graphs import GraphedCall, graphed, use_cuda_graphs
from kind_fast.ops import paths
from kind_fast.ops.paths import force_path
from kind_fast.train.sampling import sample
from kind_fast.nn.utils import class_gates, serving

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(seed=0, **kw):
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                kind=KindConfig(tailor_rank=8, active=2), **kw)
    with torch.no_grad():  # adaLN-Zero starts at zero: give the blocks something to do
        for p in model.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def test_dit_eval_cfg_m3_matches_m1():
    """A DiT's CFG evaluation through merged class weights (M3, pinned: at this tiny size the CPU
    cost model measures the lean path faster; at DiT-XL/2 size it picks M3) equals the reference,
    with every layer's merged weights built once and reused."""
    assert paths.choose_path(8192, 1152, 1152, 32, 96, samples=32, distinct_classes=2, training=False,
                             merged_cached=True, backend="torch", device_type="cpu", union_rank=32).path == "M3"
    model = tiny_dit()
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([10, 10, 500, 500])
    y = torch.tensor([1, 1, 3, 3])  # class 1 and the null class (3)
    with torch.no_grad():
        with force_path("M0"):
            ref = model(x, t, y)
        with serving(model, [1, 3]), force_path("M3"), paths.record_paths() as calls:
            out = model(x, t, y)
            again = model(x, t, y)
    assert calls and {c["path"] for c in calls} == {"M3"}
    layers = model.kind_layers()
    assert all(layer.merged_cache.builds == 1 and layer.merged_cache.hits >= 1 for layer in layers)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert class_gates(model) == [model.kind_gate]


def test_sample_merged_equals_unmerged():
    model = tiny_dit(1)
    labels = torch.tensor([0, 2, 2, 1])
    kw = dict(shape=(1, 8, 8), steps=3, cfg_scale=2.0, seed=3, batch_size=3)
    with force_path("M3"):  # merged weights (at this size the cost model measures the lean path faster)
        a = sample(model, labels, merged=True, **kw)
    with force_path("M0"):
        b = sample(model, labels, merged=False, **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert model.kind_layers()[0].merged_cache.builds >= 2  # one class set per chunk
    assert model.kind_gate.served is None  # the declaration ends with the call


def test_cuda_graph_decision_on_cpu(monkeypatch):
    assert use_cuda_graphs("cpu") is False and use_cuda_graphs("cpu", False) is False
    with pytest.raises(ValueError, match="CUDA device"):
        use_cuda_graphs("cpu", True)
    with pytest.raises(TypeError):
        use_cuda_graphs("cpu", "yes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_cuda_graphs("cuda") is True and use_cuda_graphs("cuda", True) is True
    monkeypatch.setenv("KIND_FAST_CUDA_GRAPHS", "0")
    assert use_cuda_graphs("cuda") is False and use_cuda_graphs("cuda", True) is True
    fn = lambda x: x  # noqa: E731
    assert graphed(fn, "cpu") is fn


def test_graphed_call_falls_back_to_eager_when_capture_fails():
    """On a machine where capture is impossible (here: no CUDA), the call warns once and runs
    eagerly with the same result."""
    calls = []

    def fn(x, t):
        calls.append(1)
        return x * 2 + t

    g = GraphedCall(fn)
    x, t = torch.randn(3), torch.ones(3)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture"):
        out = g(x, t)
    torch.testing.assert_close(out, x * 2 + t)
    torch.testing.assert_close(g(x, t), x * 2 + t)
    assert g.failed and g.replays == 0


def test_cli_sample_flags(tmp_path, capsys):
    from kind_fast.__main__ import main

    assert main(["sample", str(tmp_path), "--cuda-graphs", "on", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no ema/ folder" in err or "CUDA device" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graphed_sampling_equals_eager():
    model = tiny_dit(2).cuda()
    labels = torch.tensor([0, 1, 2, 2])
    kw = dict(shape=(1, 8, 8), steps=4, cfg_scale=1.5, seed=0, device="cuda")
    eager = sample(model, labels, cuda_graphs=False, **kw)
    captured = sample(model, labels, cuda_graphs=True, **kw)
    torch.testing.assert_close(captured, eager, rtol=1e-4, atol=1e-4)
