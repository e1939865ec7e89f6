"""CPU measurement of the op family's paths, and the fit of the cost model's CPU constants.

    python bench/cpu_paths.py [--out bench/results/cpu_paths] [--rounds 7] [--threads 1] [--quick]

Times, interleaved round by round (a load change hits every candidate alike), this thread's CPU
time (``time.thread_time``: on a shared machine, waiting for a core does not count; the
wall-clock minimum is kept beside it in the JSON):

* one KIND layer, transfer training (learngenes frozen, x needs its gradient) and eval with a
  declared CFG batch (one serving scope around all calls, as the sampler holds it), along every
  CPU path (M0 the reference op, M3 merged weights, M4 plain
  autograd ops, M5 the lean path with its union and per-sample plans) and the cost model's own
  choice, beside nn.Linear of the same shape: the demo's layers (hidden 64, B = 64 images of
  T = 16 tokens, N_T = 16, K = 4, 2 classes + null), the demo's q/k/v as one group against a
  dense 64→192 qkv layer, DiT-S/2 layers (B = 2, T = 256, N_T = 96, K = 32) and DiT-B/2 fc1
  (2048 tokens);
* the demo's training step (DiT hidden 64, depth 4, 8×8 digits, batch 64, AdamW): KIND transfer
  (q/k/v grouped, the cost model's paths), the same with q/k/v one by one, with the old path (M0
  pinned), and full fine-tuning; and a CFG sampling step.

Then it fits the CPU constants of ``kind_fast.ops.paths.COSTS`` (dense GEMM rate, skinny GEMM
rate, per-op, per-registered-op and per-batched-item overheads) to the layer timings by
non-negative least squares on relative errors, prints them with the model's prediction beside
each measurement, and says for every case whether the path the fitted model picks is the one
measured fastest. Writes <out>.json and <out>.md; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import kind_fast as kf
from kind_fast.models.dit import Attention, DiT, KindConfig
from kind_fast.ops import paths
from kind_fast.ops.paths import TERMS, force_path, path_terms

B, T, N_T, K, CLASSES = 64, 16, 16, 4, 2


def interleaved(fns: dict, rounds: int, min_time: float = 0.05) -> dict:
    """name -> (min, median, min wall) seconds per call, measured round-robin. The first two are
    this thread's CPU time (time.thread_time); the wall-clock minimum is kept too."""
    reps = {}
    for name, fn in fns.items():  # warm-up and calls per round
        fn()
        t0 = time.thread_time()
        fn()
        reps[name] = max(1, int(min_time / max(time.thread_time() - t0, 1e-6)))
    times = {n: [] for n in fns}
    walls = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.thread_time() - t0) / reps[name])
            walls[name].append((time.perf_counter() - w0) / reps[name])
    return {n: (min(v), statistics.median(v), min(walls[n])) for n, v in times.items()}


# (name, in, out, group size, B, T, N_T, K, classes in the gate)
CASES = [
    ("demo q/k/v/proj", 64, 64, 1, B, T, N_T, K, CLASSES),
    ("demo fc1", 64, 256, 1, B, T, N_T, K, CLASSES),
    ("demo fc2", 256, 64, 1, B, T, N_T, K, CLASSES),
    ("demo q,k,v grouped", 64, 64, 3, B, T, N_T, K, CLASSES),
    ("DiT-S/2 proj", 384, 384, 1, 2, 256, 96, 32, 10),
    ("DiT-S/2 fc1", 384, 1536, 1, 2, 256, 96, 32, 10),
    ("DiT-B/2 fc1", 768, 3072, 1, 8, 256, 96, 32, 10),
]
QUICK = {"demo q/k/v/proj", "demo fc1", "demo q,k,v grouped", "DiT-S/2 proj"}


def _labels(b: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    if classes == CLASSES:  # the demo's transfer batches: both digits and some null labels
        return torch.randint(0, classes + 1, (b,), generator=gen)
    return torch.randint(0, classes, (b,), generator=gen)


def layer_case(case, rounds: int) -> list[dict]:
    name, n_in, n_out, g_n, b, t, n_t, k, classes = case
    gen = torch.Generator().manual_seed(0)
    gate = kf.ClassGate.block(classes, n_t, k)
    layers = [kf.FastKindLinear(n_in, n_out, tailor_rank=n_t, gate=gate).freeze_learngenes() for _ in range(g_n)]
    lin = nn.Linear(n_in, g_n * n_out)
    x = torch.randn(b, t, n_in, generator=gen).requires_grad_(True)
    g = torch.randn(b, t, n_out, generator=gen)
    labels = _labels(b, classes, gen)
    grouped = g_n > 1

    def call(path, grad=True):
        def fn():
            with force_path(path):
                if grouped:
                    ys = kf.kind_group(layers, x if grad else x.detach(), labels)
                else:
                    ys = (layers[0](x if grad else x.detach(), labels=labels),)
                if grad:
                    torch.autograd.backward(ys, [g] * len(ys))
        return fn

    present = tuple(sorted(set(labels.tolist())))
    idx, val = gate.compiled()
    union = paths.lean_union_rank(labels, idx, val, present)
    candidates = ["M0", "M4", "M5:union"] + (["M5:sample"] if t >= k else [])
    if grouped:
        candidates = ["M5:union"] + (["M5:sample"] if t >= k else [])
    fns = {p: call(p) for p in candidates}
    if grouped:
        Attention_like = [None]  # noqa: F841 - the ungrouped q, k, v for comparison

        def separately():
            ys = [m(x, labels=labels) for m in layers]
            torch.autograd.backward(ys, [g] * len(ys))
        fns["one by one (cost model)"] = separately
    fns["cost model"] = call(None)
    gl = torch.randn(b, t, g_n * n_out, generator=gen)
    fns["nn.Linear"] = lambda: lin(x).backward(gl)
    res = interleaved(fns, rounds if b * t * n_in * n_out < 5e7 else max(3, rounds // 2))
    with paths.record_paths() as rec:
        call(None)()
    rows = [dict(name=name, mode="transfer fwd+bwd", n_in=n_in, n_out=n_out, groups=g_n, b=b, t=t, n_t=n_t, k=k,
                 union=union, classes=len(present), chosen=rec[0]["path"] + (":" + rec[0]["plan"] if rec[0]["plan"]
                                                                             else ""),
                 times={p: v[1] for p, v in res.items()}, times_min={p: v[0] for p, v in res.items()},
                 wall_min={p: v[2] for p, v in res.items()}, training=True)]
    if grouped:
        return rows
    # eval: a CFG batch of one class and the null class, declared (the sampler's way)
    layer = layers[0].eval()
    ye = torch.cat([torch.full((b // 2,), 1), torch.full((b - b // 2,), classes)])
    xe = x.detach()

    def evaluate(path):
        def fn():
            with force_path(path):
                layer(xe, labels=ye)
        return fn

    fns = {p: evaluate(p) for p in ("M0", "M3", "M4", "M5:union")}
    fns["cost model"] = evaluate(None)
    fns["nn.Linear"] = lambda: lin(xe[..., :n_in])
    # one serving scope around every call, as the sampler holds it over its steps (leaving it drops
    # the merged weights and W_G: a scope per call would time their rebuilds)
    with torch.no_grad(), gate.serving([1, classes]):
        res = interleaved(fns, rounds if b * t * n_in * n_out < 5e7 else max(3, rounds // 2))
        with paths.record_paths() as rec:
            layer(xe, labels=ye)
    rows.append(dict(name=name, mode="eval (CFG batch, declared)", n_in=n_in, n_out=n_out, groups=1, b=b, t=t,
                     n_t=n_t, k=k, union=paths.lean_union_rank(ye, idx, val, (1, classes)), classes=2,
                     chosen=rec[0]["path"] + (":" + rec[0]["plan"] if rec[0]["plan"] else ""),
                     times={p: v[1] for p, v in res.items()}, times_min={p: v[0] for p, v in res.items()},
                     wall_min={p: v[2] for p, v in res.items()}, training=False))
    return rows


# ----------------------------------------------------------------------------- the fit
def terms_of(row: dict, path: str) -> list[float] | None:
    """The cost model's terms (TERMS) of ``path`` for a measured row; a group of G layers costs
    G layers' FLOPs and one call's overheads."""
    m = row["b"] * row["t"]
    kw = dict(learngene_rank=min(row["n_in"], row["n_out"]) - row["n_t"], samples=row["b"],
              distinct_classes=row["classes"], training=row["training"], merged_cached=not row["training"],
              backend="torch", device_type="cpu", union_rank=row["union"])
    t = path_terms(m, row["n_in"], row["n_out"] * row["groups"], row["k"], row["n_t"], **kw)
    if path not in t:
        return None
    out = list(t[path][0])
    if row["groups"] > 1:  # the tailor term: G layers of n_out each, not one of G·n_out
        single = path_terms(m, row["n_in"], row["n_out"], row["k"], row["n_t"], **kw)[path][0]
        out[1] = single[1] * row["groups"]
    return out


def gemm_rates(rounds: int) -> dict:
    """The dense GEMM rate (the layers' x·W_Gᵀ shapes) and the tailor term's skinny GEMM rate
    (R×in by in×M, and batched per-sample K-column GEMMs), FLOP/s, medians over shapes."""
    gen = torch.Generator().manual_seed(0)
    dense, skinny = {}, {}
    for name, n_in, n_out, _, b, t, n_t, k, _ in CASES:
        m = b * t
        x = torch.randn(m, n_in, generator=gen)
        w = torch.randn(n_out, n_in, generator=gen)
        dense[name] = (lambda x=x, w=w: torch.mm(x, w.t()), 2 * m * n_in * n_out)
        r = 8 if k == K else 32
        v = torch.randn(r, n_in, generator=gen)
        skinny[name + " union"] = (lambda x=x, v=v: torch.mm(v, x.t()), 2 * m * r * n_in)
        xb = x.view(b, t, n_in)
        vb = torch.randn(b, k, n_in, generator=gen)
        skinny[name + " sample"] = (lambda xb=xb, vb=vb: torch.bmm(xb, vb.transpose(1, 2)), 2 * m * k * n_in)
    out = {}
    for key, group in (("flops_per_s", dense), ("skinny_flops_per_s", skinny)):
        res = interleaved({n: f for n, (f, _) in group.items()}, rounds)
        out[key] = statistics.median(group[n][1] / res[n][1] for n in group)
    return out


def fit(rows: list[dict], rates: dict) -> dict:
    """The GEMM rates measured directly (``gemm_rates``); the per-op, per-registered-op and
    per-batched-item overheads fitted to what the layer timings leave over, by non-negative
    least squares on relative errors."""
    import numpy as np
    from scipy.optimize import nnls

    a, y = [], []
    for r in rows:
        for p, t in r["times"].items():
            if p in ("cost model", "nn.Linear") or p.startswith("one by one"):
                continue
            v = terms_of(r, p)
            if v is None:
                continue
            flop_time = v[0] / rates["flops_per_s"] + v[1] / rates["skinny_flops_per_s"]
            a.append([v[2] / t, v[3] / t, v[4] / t])
            y.append(1.0 - flop_time / t)
    sol, _ = nnls(np.array(a), np.array(y))
    op_s, custom_s, item_s = (float(v) for v in sol)
    return dict(rates, op_s=op_s, custom_op_s=custom_s, item_s=item_s, points=len(y))


def predicted(row: dict, path: str, c: dict) -> float | None:
    v = terms_of(row, path)
    if v is None:
        return None
    rates = (1 / c["flops_per_s"], 1 / c["skinny_flops_per_s"], c["op_s"], c["custom_op_s"], c["item_s"])
    return sum(a * w for a, w in zip(v, rates))


# ----------------------------------------------------------------------------- model steps
def demo_model(kind: bool, qkv: str = "split") -> DiT:
    torch.manual_seed(0)
    cfg = KindConfig(tailor_rank=N_T, active=K, qkv=qkv) if kind else None
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4,
                num_classes=8, kind=cfg)
    if kind:
        model.prepare_transfer(CLASSES, generator=torch.Generator().manual_seed(1))
    else:
        model.retarget(CLASSES)
        model.set_mode("full_finetune")
    return model.train()


def model_rows(rounds: int) -> list[dict]:
    from kind_fast.perf.benchmark import make_cfg_sample_step, make_train_step
    from kind_fast.nn.caching import training_scope

    kind_model, dense_model = demo_model(True), demo_model(False)
    kind_step, _ = make_train_step(kind_model, B)
    full_step, _ = make_train_step(dense_model, B)

    def pinned(fn, path, grouped=True):
        def run():
            Attention.group_qkv = grouped
            try:
                with force_path(path):
                    fn()
            finally:
                Attention.group_qkv = True
        return run

    with training_scope(kind_model):
        res = interleaved({"KIND transfer, cost model, q/k/v grouped": kind_step,
                           "KIND transfer, cost model, q/k/v one by one": pinned(kind_step, None, False),
                           "KIND transfer, old path (M0 pinned, q/k/v one by one)": pinned(kind_step, "M0", False),
                           "full fine-tuning": full_step}, rounds)
    rows = [dict(kind="step", name=n, mode="train step", seconds=v[1], seconds_min=v[0], wall=v[2])
            for n, v in res.items()]
    kind_model.eval()
    dense_model.eval()
    kind_sample = make_cfg_sample_step(kind_model, B, cfg_scale=1.5)
    dense_sample = make_cfg_sample_step(dense_model, B, cfg_scale=1.5)
    y = torch.cat([torch.arange(B) % CLASSES, torch.full((B,), CLASSES)])
    classes = sorted(set(y.tolist()))

    def served(fn, path):
        def run():
            with kind_model.kind_gate.serving(classes), force_path(path):
                fn()
        return run

    res = interleaved({"KIND sampling step, M0 pinned": served(kind_sample, "M0"),
                       "KIND sampling step, cost model": served(kind_sample, None),
                       "dense DiT sampling step": dense_sample}, rounds)
    rows += [dict(kind="step", name=n, mode="CFG sample step", seconds=v[1], seconds_min=v[0], wall=v[2])
             for n, v in res.items()]
    return rows


# ----------------------------------------------------------------------------- report
def markdown(meta: dict, layers: list[dict], steps: list[dict], c: dict) -> str:
    cur = paths.COSTS["cpu"]
    out = [f"# CPU paths and the cost model's CPU constants ({meta['date']})", "",
           f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} thread(s). Shared with other "
           f"engineers' jobs: load average {meta['load_before']} before, {meta['load_after']} after (1/5/15 min) "
           "on 2 cores. Times are this thread's CPU time (time.thread_time; waiting for a core does not count), "
           "medians of interleaved rounds; minima and wall-clock minima are in the JSON. "
           f"Command: `{meta['command']}`.", "",
           "## Fitted CPU constants (kind_fast.ops.paths.COSTS['cpu'])", "",
           "| constant | fitted now | in the code |", "|---|---|---|",
           f"| dense GEMM rate | {c['flops_per_s']:.3g} FLOP/s | {cur.flops_per_s:.3g} |",
           f"| tailor-term (skinny) GEMM rate | {c['skinny_flops_per_s']:.3g} FLOP/s | "
           f"{cur.skinny_flops_per_s:.3g} |",
           f"| per eager op | {c['op_s'] * 1e6:.2f} µs | {cur.op_s * 1e6:.2f} |",
           f"| per registered-op call | {c['custom_op_s'] * 1e6:.1f} µs | {cur.custom_op_s * 1e6:.1f} |",
           f"| per batched-GEMM item | {c['item_s'] * 1e6:.2f} µs | {cur.item_s * 1e6:.2f} |", "",
           "The two GEMM rates are measured directly (the cases' x·W_Gᵀ shapes; their R- and K-column tailor "
           "GEMMs); the three overheads are fitted, by non-negative least squares on the relative error, to what "
           f"the {c['points']} (layer, path) timings below leave over after the FLOPs.", "",
           "## One KIND layer (or group) per path, µs per call: measured (fitted model)", ""]
    head = ["M0", "M3", "M4", "M5:union", "M5:sample"]
    out += ["| layer | mode | R | " + " | ".join(head) + " | the code's cost model picks | one by one | nn.Linear | "
            "picked / nn.Linear | fastest measured | the fit picks |",
            "|" + "---|" * (len(head) + 9)]
    for r in layers:
        cells = []
        for p in head:
            t = r["times"].get(p)
            pr = predicted(r, p, c) if t is not None else None
            cells.append("-" if t is None else f"{t * 1e6:.0f} ({pr * 1e6:.0f})" if pr else f"{t * 1e6:.0f}")
        paths_only = {p: t for p, t in r["times"].items() if p in head}
        fastest = min(paths_only, key=paths_only.get)
        pred = {p: predicted(r, p, c) for p in paths_only}
        fit_pick = min((p for p in pred if pred[p] is not None), key=pred.get)
        sep = r["times"].get("one by one (cost model)")
        out.append(f"| {r['name']} | {r['mode']} | {r['union']} | " + " | ".join(cells) +
                   f" | {r['chosen']}: {r['times']['cost model'] * 1e6:.0f} | "
                   f"{'-' if sep is None else f'{sep * 1e6:.0f}'} | {r['times']['nn.Linear'] * 1e6:.0f} | "
                   f"{r['times']['cost model'] / r['times']['nn.Linear']:.2f} | {fastest} | {fit_pick} |")
    out += ["", "## Demo model steps (DiT hidden 64, depth 4, 8×8 digits, batch 64), ms per step", "",
            "| step | ms (median) | ratio |", "|---|---|---|"]
    for mode in ("train step", "CFG sample step"):
        group = [r for r in steps if r["mode"] == mode]
        ref = group[-1]["seconds"]
        for r in group:
            out.append(f"| {r['name']} | {r['seconds'] * 1e3:.2f} | {r['seconds'] / ref:.2f}× {group[-1]['name']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/cpu_paths")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the demo layers and DiT-S/2 proj only")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load_before = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    cases = [c for c in CASES if not a.quick or c[0] in QUICK]
    layers = [r for case in cases for r in layer_case(case, a.rounds)]
    c = fit(layers, gemm_rates(a.rounds))
    steps = model_rows(a.rounds)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=f"{platform.machine()} {os.cpu_count()} cores "
                f"({platform.processor() or platform.platform()})", torch=torch.__version__, threads=a.threads,
                load_before=load_before, load_after=" / ".join(f"{v:.2f}" for v in os.getloadavg()),
                command="python bench/cpu_paths.py " + " ".join(
                    f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else (f"--{k}" if v else "")
                    for k, v in vars(a).items()).strip())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, fit=c, layers=layers, steps=steps), indent=1))
    md = markdown(meta, layers, steps, c)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
