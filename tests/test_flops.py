"""The analytic FLOP model (kind_fast.perf.flops), checked against DiT's table, against
torch.utils.flop_counter on real models, and against the KIND paper's arithmetic; plus the
`kind-fast flops` / `kind-fast bench --report` commands."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kind_fast.__main__ import main
from kind_fast.perf.benchmark import build_model, load_results, make_batch
from kind_fast.nn.caching import weight_cache
from kind_fast.models.dit import DiT_models, KindConfig, build_dit
from kind_fast.perf.flops import (
    DIT_PAPER_GMACS,
    MODES,
    PAPER_TRANSFER,
    TRAIN_MODES,
    baseline_savings,
    count_flops,
    dit_flops,
    flop_counter,
    paper_conventions,
    transfer_saving,
)
from kind_fast.nn.gate import ClassGate
from kind_fast.ops.kind_linear import kind_linear_backward_ref, kind_linear_flops, kind_linear_ref
from kind_fast.nn.utils import parameter_breakdown

pytestmark = pytest.mark.usefixtures("one_thread")


# =====================================================================================
# DiT's own table
# =====================================================================================
@pytest.mark.parametrize("model,size", sorted(DIT_PAPER_GMACS), ids=lambda v: str(v))
def test_reproduces_dit_table(model, size):
    """Forward GMACs per image (DiT's "Gflops") within 1% for every config the paper lists."""
    got = dit_flops(model, "dense", image_size=size).gmacs("fwd")
    want = DIT_PAPER_GMACS[(model, size)]
    assert abs(got / want - 1) < 0.01, (model, size, got, want)


def test_units_and_amortisation():
    r = dit_flops("DiT-L/2", "pretrain", batch=32)
    assert r.flops("train") == 2 * r.macs("train")
    img, step = r._image_step("train")
    assert step > 0  # W_G materialisation + projection happen once per step
    assert r.macs("train", "step") == img * 32 + step
    assert r.macs("train", "image") == pytest.approx(img + step / 32)
    # per-step work weighs less per image at a larger batch
    assert r.with_batch(256).macs("train") < r.macs("train")
    # parts add up
    assert r.macs("bwd") == pytest.approx(r.macs("dx") + r.macs("dw"))
    assert r.macs("train") == pytest.approx(r.macs("fwd") + r.macs("bwd"))


def test_mode_structure():
    """What each mode computes, in relations that do not need a model."""
    full = dit_flops("DiT-XL/2", "full_ft")
    dense = dit_flops("DiT-XL/2", "dense")
    assert full.macs("fwd") == dense.macs("fwd")
    # full FT is ~3× forward (only the conv and the first timestep linear skip dX)
    assert 2.99 < full.macs("train") / full.macs("fwd") <= 3.0
    transfer = dit_flops("DiT-XL/2", "transfer")
    pretrain = dit_flops("DiT-XL/2", "pretrain")
    kind = dit_flops("DiT-XL/2", "kind")
    # transfer: W_G cached (no per-step work), no dW of the decomposed layers
    assert transfer._image_step("train")[1] == 0
    assert transfer.macs("fwd") == kind.macs("fwd") > dense.macs("fwd")
    assert transfer.macs("dw") < 0.05 * full.macs("dw")  # dU_T, dV_T only
    # pretrain: everything of full FT plus tailors, materialisation and projection
    assert pretrain.macs("train") > full.macs("train")
    lora = dit_flops("DiT-XL/2", "lora", lora_rank=8)
    svdiff = dit_flops("DiT-XL/2", "svdiff")
    assert lora.macs("dw") < 0.05 * full.macs("dw")
    assert svdiff.macs("dw") > full.macs("dw") * 0.99  # SVDiff still needs dW for dσ
    for r in (full, transfer, pretrain, lora, svdiff):
        assert r.macs("dx") == pytest.approx(full.macs("dx"), rel=0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown DiT config"):
        dit_flops("DiT-M/2")
    with pytest.raises(ValueError, match="mode must be"):
        dit_flops("DiT-S/2", "qlora")
    with pytest.raises(ValueError, match="image_size"):
        dit_flops("DiT-S/8", "dense", image_size=100)
    with pytest.raises(ValueError, match="batch"):
        dit_flops("DiT-S/2", batch=0)
    with pytest.raises(TypeError, match="KindConfig"):
        dit_flops("DiT-S/2", "transfer", kind={"tailor_rank": 96})
    r = dit_flops("DiT-S/2")
    with pytest.raises(ValueError, match="part"):
        r.macs("fwd+bwd")
    with pytest.raises(ValueError, match="per"):
        r.macs("train", "epoch")


# =====================================================================================
# The op's registered formulas against the reference's own GEMMs
# =====================================================================================
@pytest.mark.parametrize("rows_per_sample", [64, 4])  # "sample" plan (T >= K) and "row" plan
def test_kind_linear_formula_matches_reference_gemms(rows_per_sample):
    """Counting the reference's internal GEMMs gives the registered formula (sample plan);
    the row plan does N_T/K more tailor work, which the formula deliberately does not count."""
    torch.manual_seed(0)
    b, n_in, n_out, n_t, k = 3, 48, 80, 12, 6
    gate = ClassGate.block(4, n_t, k)
    idx, val = gate.compiled()
    m = b * rows_per_sample
    x, g = torch.randn(m, n_in), torch.randn(m, n_out)
    w, u = torch.randn(n_out, n_in), torch.randn(n_t, n_out)
    s, v = torch.rand(n_t), torch.randn(n_t, n_in)
    labels = torch.tensor([0, 2, 4])
    with flop_counter() as fc:  # the reference uses baddbmm_/addmm_: counted by flop_counter()
        _, h = kind_linear_ref(x, w, None, u, s, v, idx, val, labels)
    fwd = fc.get_total_flops()
    masks = [[True, False, False, True, True, True, False],  # transfer
             [True] * 6 + [False],  # pretrain
             [True] + [False] * 6]  # dX only
    bwd = []
    for mask in masks:
        with flop_counter() as fc:
            kind_linear_backward_ref(g, x, w, u, s, v, idx, val, labels, h, mask)
        bwd.append(fc.get_total_flops())
    if rows_per_sample >= k:
        assert fwd == kind_linear_flops(m, n_in, n_out, k)
        assert bwd == [kind_linear_flops(m, n_in, n_out, k, mk) for mk in masks]
    else:  # one GEMM against all N_T tailors
        assert fwd == kind_linear_flops(m, n_in, n_out, n_t)
        assert fwd > kind_linear_flops(m, n_in, n_out, k)


def test_flop_counter_counts_cpu_attention():
    """torch counts CPU SDPA as 0; flop_counter() counts it like the explicit matmuls."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        F.scaled_dot_product_attention(q, k, v)
    assert fc.get_total_flops() == 0  # if torch ever counts it, flop_counter() defers to torch

    def explicit():
        p = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)
        return p @ v

    counts = []
    for fn in (lambda: F.scaled_dot_product_attention(q, k, v), explicit):
        with flop_counter() as fc:
            out = fn()
        f = fc.get_total_flops()
        with flop_counter() as fc:
            out.sum().backward()
        counts.append((f, fc.get_total_flops()))
    assert counts[0] == counts[1] == (2 * 2 * 3 * 40 * 40 * 32, 4 * 2 * 3 * 40 * 40 * 32)


# =====================================================================================
# Analytic vs counted on real models (DiT-S/2, DiT-B/2)
# =====================================================================================
# (model, batch, optimizer, mode). B/2 runs the training modes only: their forward counts
# cover the inference forwards too (dense = full_ft's, kind = transfer's, W_G cached).
CASES = [("DiT-S/2", 2, "adamw", mode) for mode in MODES] + [
    ("DiT-B/2", 1, "sgd", mode) for mode in TRAIN_MODES]


def _reference_gemm_flops(shapes, output_mask=None) -> int:
    """FLOPs of the GEMMs the kind_linear reference really runs for one call of the op with
    these argument shapes (meta tensors: no values are needed to count)."""
    if output_mask is None:
        xs, ws, bs, us, ss, vs, idxs, vals, labs = shapes[:9]
    else:
        gs, xs, ws, us, ss, vs, idxs, vals, labs, hs = shapes[:10]
    with torch.device("meta"):
        x, w, u, s, v, val = (torch.empty(sh) for sh in (xs, ws, us, ss, vs, vals))
        bias = torch.empty(bs) if output_mask is None and bs is not None else None
        idx, labels = torch.zeros(idxs, dtype=torch.long), torch.zeros(labs, dtype=torch.long)
        with flop_counter() as fc:
            if output_mask is None:
                kind_linear_ref(x, w, bias, u, s, v, idx, val, labels)
            else:
                kind_linear_backward_ref(torch.empty(gs), x, w, u, s, v, idx, val, labels, torch.empty(hs),
                                         output_mask)
    return fc.get_total_flops()


def reference_gemm_mapping():
    """A ``custom_mapping`` that counts every kind_linear forward / backward call as the GEMMs
    its reference runs, instead of by the op's registered formula (``kind_linear_flops``): an
    independent count. The calls are recorded and counted afterwards, outside FlopCounterMode."""
    calls: list = []

    def fwd(*shapes, out_shape=None, **kw):
        calls.append((shapes, None))
        return 0

    def bwd(*shapes, out_shape=None, **kw):
        calls.append((shapes[:10], shapes[10]))
        return 0

    ops = torch.ops.kind_fast
    mapping = {ops.kind_linear: fwd, ops.kind_linear_backward: bwd}
    return mapping, calls


@pytest.mark.parametrize("name,batch,opt,mode", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_counted_matches_analytic(name, batch, opt, mode):
    """One forward and one training step (loss, backward, optimizer) counted by FlopCounterMode
    agree with the analytic model within 1% (they agree exactly), both as torch counts them
    (the kind_linear ops by their registered formula) and independently of that formula (every
    kind_linear call counted as the GEMMs its reference runs). Models are built on meta with
    cheap values (FLOPs do not depend on values); B/2 uses SGD to keep memory low (the
    optimizer does no GEMM: S/2 runs AdamW to show it). Attention is counted by the formulas
    ``flop_counter()`` adds for the CPU SDPA kernels."""
    model = build_model(name, mode, num_classes=10)
    x, t, y = make_batch(model, batch)
    optimizer = None
    if mode in TRAIN_MODES:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params) if opt == "adamw" else torch.optim.SGD(params, lr=0.0)
    mapping, calls = reference_gemm_mapping()
    # as the trainer and the sampler run: inside weight_cache(), W_G is built once and reused
    # (learngenes frozen), so a step after the first does not build it
    with weight_cache():
        if mode in ("transfer", "kind"):
            with torch.no_grad():
                model(x, t, y)
        counted = count_flops(model, x, t, y, optimizer=optimizer)
        independent = count_flops(model, x, t, y, optimizer=optimizer, custom_mapping=mapping)
    fwd_calls = [c for c in calls if c[1] is None]
    independent["fwd"] += sum(_reference_gemm_flops(sh) for sh, _ in fwd_calls)
    independent["bwd"] = independent.get("bwd", 0) + sum(_reference_gemm_flops(sh, m) for sh, m in calls if m)
    independent["train"] = independent["fwd"] + independent["bwd"]
    if mode in ("kind", "pretrain", "transfer"):
        assert fwd_calls, "no kind_linear call was counted: the independent count checked nothing"
    analytic = dit_flops(name, mode, batch=batch, num_classes=10)
    for got in (counted, independent):
        assert got["fwd"] == pytest.approx(analytic.flops("fwd", "step"), rel=0.01)
        if mode in TRAIN_MODES:
            assert got["bwd"] == pytest.approx(analytic.flops("bwd", "step"), rel=0.01)
            assert got["train"] == pytest.approx(analytic.flops("train", "step"), rel=0.01)


# =====================================================================================
# Parameters and the paper's arithmetic
# =====================================================================================
@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"])
def test_analytic_parameter_counts(name):
    """Analytic total and trainable parameters equal the built models' (meta device)."""
    for mode in MODES:
        model = build_model(name, mode, device="meta", num_classes=1000)
        got = parameter_breakdown(model)["all"]
        r = dit_flops(name, mode, num_classes=1000)
        assert r.params == got["total"], mode
        assert r.trainable_params == got["trainable"], mode


def test_paper_trainable_parameters():
    """DiT-L/2 KIND transfer: pretrained on 150 classes, retargeted to 461 novel ones, trains
    45,086,240 parameters: within 1% of the paper's 45.4M."""
    with torch.device("meta"):
        model = build_dit("DiT-L/2", kind=KindConfig(),
                          num_classes=PAPER_TRANSFER["pretrain_classes"])
    model.retarget(PAPER_TRANSFER["novel_classes"])
    model.set_mode("transfer")
    trainable = parameter_breakdown(model)["all"]["trainable"]
    assert trainable == 45_086_240
    assert trainable == dit_flops("DiT-L/2", "transfer", num_classes=461).trainable_params
    assert abs(trainable / PAPER_TRANSFER["trainable_params"] - 1) < 0.01


@pytest.mark.parametrize("batch", [1, 32, 256])
def test_transfer_saving_regression_values(batch):
    """Regression values of the FLOP model (not the paper's convention, which is unknown): per
    image per training step (FLOPs = 2 MACs, fwd + bwd), KIND transfer against full fine-tuning
    saves 133.19 GFLOPs on DiT-L/2 and 35.43 on DiT-B/2 at K = 32, at any batch. The forward
    alone saves nothing (KIND adds the tailor term)."""
    s = transfer_saving("DiT-L/2", batch=batch)
    assert s["saved_gflop"] >= PAPER_TRANSFER["saved_gflops"]
    assert s["saved_gflop"] == pytest.approx(133.19, abs=0.01)
    assert s["saved_fwd_gmac"] < 0
    b = transfer_saving("DiT-B/2", batch=batch)
    assert b["saved_gflop"] == pytest.approx(35.4, abs=0.05)
    rows = paper_conventions(batch=batch)
    fwd_rows = [r for r in rows if r["scope"] == "forward only"]
    assert fwd_rows and not any(r["meets"] for r in fwd_rows)
    assert any(r["meets"] and r["model"] == "DiT-L/2" and r["unit"] == "GFLOP"
               and r["per"] == "per image" for r in rows)


# =====================================================================================
# CLI and reports
# =====================================================================================
def test_cli_flops_writes_report(tmp_path, capsys):
    out = tmp_path / "flops"
    assert main(["flops", "--models", "DiT-S/2", "DiT-L/2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "45.09M" in text and "133.2 GFLOP" in text
    md = (out / "flops.md").read_text()
    assert "| DiT-L/2 | transfer | 45.09M |" in md  # 461 novel classes by default
    assert (out / "flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_flops_per_layer_and_errors(tmp_path, capsys):
    assert main(["flops", "--models", "DiT-S/2", "--modes", "transfer", "--per-layer", "DiT-S/2",
                 "--no-plot", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "blocks.*.attn.q (KIND)" in text
    assert not (tmp_path / "flops.png").exists()
    with pytest.raises(SystemExit, match="unknown model"):
        main(["flops", "--models", "DiT-Q/2", "--out", str(tmp_path)])


def test_cli_bench_report(tmp_path, capsys):
    """Measures every mode on a 1-block DiT-S/2 (batch 1) on the CPU, writes JSON, markdown
    and PNG, then rebuilds the report from the JSON."""
    out = tmp_path / "bench"
    assert main(["bench", "--report", "--models", "DiT-S/2", "--depth", "1", "--batch", "1",
                 "--reps", "1", "--out", str(out)]) == 0
    data = json.loads((out / "bench_model_step.json").read_text())
    assert [s["mode"] for s in data["steps"]] == list(TRAIN_MODES)
    for s in data["steps"]:
        assert s["step_ms"] > 0 and s["achieved_tflops"] > 0 and s["depth"] == 1
        assert s["optimizer_state_mb"] > 0 and s["saved_for_backward_mb"] > 0
    by_mode = {s["mode"]: s for s in data["steps"]}
    assert by_mode["transfer"]["trainable_params"] < by_mode["full_ft"]["trainable_params"]
    assert by_mode["lora"]["optimizer_state_mb"] < by_mode["full_ft"]["optimizer_state_mb"]
    assert {s["mode"] for s in data["sampling"]} == {"dense", "kind"}
    md = (out / "bench_model_step.md").read_text()
    assert "| DiT-S/2 | 1 | transfer |" in md
    assert (out / "bench_model_step.png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again"
    saved = str(out / "bench_model_step.json")
    assert main(["bench", "--load", saved, "--report", "--out", str(again)]) == 0
    assert (again / "bench_model_step.md").read_text() == md


def test_load_pytest_benchmark_json(tmp_path):
    """`kind-fast bench --load` reads the extra_info of a pytest-benchmark run."""
    step = dict(kind="model_step", model="DiT-S/2", depth=2, mode="full_ft", batch=4, device="cpu",
                step_ms=100.0, images_per_s=40.0, achieved_tflops=0.2, train_tflop_per_step=0.02,
                peak_mem_mb=None, saved_for_backward_mb=10.0, optimizer_state_mb=5.0,
                trainable_params=5_000_000, torch="2.x")
    other = dict(step, mode="transfer", step_ms=70.0)
    data = {"machine_info": {"cpu": {"brand_raw": "test cpu"}},
            "benchmarks": [{"extra_info": step}, {"extra_info": other},
                           {"extra_info": {"shape": "x"}}]}
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(data))
    res = load_results(path)
    assert [s["mode"] for s in res["steps"]] == ["full_ft", "transfer"]
    out = str(tmp_path / "r")
    assert main(["bench", "--load", str(path), "--report", "--out", out, "--no-plot"]) == 0
    md = (tmp_path / "r" / "bench_model_step.md").read_text()
    assert "| DiT-S/2 | 2 | transfer | 4 | 70 | 0.7 |" in md


def test_build_model_modes():
    for mode in MODES:
        m = build_model("DiT-S/2", mode, depth=1, num_classes=5)
        assert all(torch.isfinite(p).all() for p in m.parameters())
        trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
        if mode in ("dense", "kind"):
            assert not trainable and not m.training
        elif mode in ("transfer", "lora", "svdiff"):
            assert {"y_embedder", "final_layer"} <= trainable and "t_embedder" not in trainable
    with pytest.raises(ValueError, match="mode"):
        build_model("DiT-S/2", "qlora")
    assert set(DiT_models) >= {n for n, _ in DIT_PAPER_GMACS}


def test_savings_against_every_baseline():
    """KIND transfer is cheaper than full fine-tuning and SVDiff and dearer than LoRA (r = 8)."""
    rows = {(r["model"], r["baseline"]): r for r in baseline_savings(("DiT-B/2", "DiT-L/2"))}
    assert rows[("DiT-L/2", "full_ft")]["saved_gflop"] == pytest.approx(133.19, abs=0.01)
    assert rows[("DiT-L/2", "lora")]["saved_gflop"] == pytest.approx(-16.91, abs=0.01)
    assert rows[("DiT-L/2", "svdiff")]["saved_gflop"] == pytest.approx(171.53, abs=0.01)
    for m in ("DiT-B/2", "DiT-L/2"):
        assert rows[(m, "lora")]["saved_gflop"] < 0 < rows[(m, "full_ft")]["saved_gflop"]
        assert rows[(m, "svdiff")]["saved_gflop"] > 0


# =====================================================================================
# The learngene baselines (Heur-LG, TLEG): same FLOP model, counted on real models
# =====================================================================================
def _learngene_model(mode: str, name: str = "DiT-S/2", num_classes: int = 10):
    from kind_fast.models.baselines import TLEGDiT, heur_lg_descendant

    depth, hidden, heads, p = DiT_models[name]
    arch = dict(input_size=32, patch_size=p, in_channels=4, hidden_size=hidden, depth=depth, num_heads=heads,
                num_classes=num_classes)
    torch.manual_seed(0)
    if mode == "tleg_pretrain":
        return TLEGDiT(**arch).set_mode("pretrain")
    if mode == "tleg":
        return TLEGDiT(**arch).expand().set_mode("full_finetune")
    return heur_lg_descendant(build_dit(name, num_classes=num_classes), num_classes)


@pytest.mark.parametrize("mode", ["heur_lg", "tleg", "tleg_pretrain"])
def test_learngene_modes_counted_match_analytic(mode):
    """One training step of each learngene baseline's model, counted by FlopCounterMode, equals
    the analytic model; their parameter counts too (TLEG's ancestry stores two blocks)."""
    model = _learngene_model(mode)
    analytic = dit_flops("DiT-S/2", mode, batch=2, num_classes=10)
    got = parameter_breakdown(model)["all"]
    assert (analytic.params, analytic.trainable_params) == (got["total"], got["trainable"])
    x, t, y = make_batch(model, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    counted = count_flops(model, x, t, y, optimizer=torch.optim.SGD(params, lr=0.0))
    assert counted["fwd"] == pytest.approx(analytic.flops("fwd", "step"), rel=0.01)
    assert counted["train"] == pytest.approx(analytic.flops("train", "step"), rel=0.01)
    full = dit_flops("DiT-S/2", "full_ft", batch=2, num_classes=10)
    assert analytic.flops("train") == full.flops("train"), "a dense DiT's GEMMs, every weight training"
    if mode == "tleg_pretrain":
        block = sum(p.numel() for p in model.learngene["a"].parameters())
        assert full.params - analytic.params == (len(model.blocks) - 2) * block
