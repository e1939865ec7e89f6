"""How fast could the demo's KIND transfer step be in eager PyTorch on this CPU? A measured floor.

    python bench/cpu_demo_floor.py [--rounds 9] [--threads 0] [--out bench/results/cpu_demo_floor]

The demo's goal (docs/design.md §6) is KIND transfer at ≤ 0.90 × full fine-tuning's wall time.
This script measures, interleaved round by round in one process (a load change hits every
candidate alike), at the demo's defaults and thread choice:

* ``full step`` / ``KIND step``: one ``Trainer.train_step`` of each demo trainer on the same batch
  (forward, backward, clipping, AdamW, EMA, the scheduler);
* ``KIND fwd+bwd``: the KIND model's forward and backward alone (the step minus its optimizer work);
* ``dense, blocks frozen``: the dense DiT of full fine-tuning with every block frozen: the layers
  KIND's learngenes replace, with no weight gradient and no tailor term: what a KIND layer would
  cost if its tailor term and its own bookkeeping were free;
* ``tailor ops, raw``: the tailor term of every KIND layer of the model as the bare aten calls of
  path M5's union plan (docs/design.md §2: shrink GEMM, gate scaling, expand GEMMs; backward: dh,
  dx, dV, dσ, dU), on the model's shapes and the demo batch's union rank R, called back to back
  with no Python around them, no autograd, no gather of the union's rows and no scatter of the
  gradients into the N_T rows: fewer ops than any real implementation needs.

The floor of a KIND step in eager PyTorch is then ``KIND step − KIND fwd+bwd + dense, blocks
frozen + tailor ops, raw``: the optimizer and trainer work KIND really does, the dense work no
implementation can skip, and the fewest ops its tailor term needs. ``floor / full step`` is the
best ratio any eager implementation could reach here; the demo's wall time adds the same
per-run work to both sides, which moves the ratio towards 1. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_demo_steps import _load, build_trainers  # noqa: E402


def _raw_tailor_ops(model, labels: torch.Tensor, rows: int):
    """A callable running the bare tailor-term ops of every KIND layer of ``model`` (union plan)
    for one forward and backward, and the union rank R it uses."""
    from kind_fast.ops.kind_linear_lean import lean_plan
    from kind_fast.ops.paths import distinct_classes

    gate = model.kind_gate
    idx, val = gate.compiled(torch.device("cpu"))
    plan = lean_plan(labels, idx, val, distinct_classes(labels), "union")
    r = plan.rank
    gen = torch.Generator().manual_seed(0)
    groups = []
    gates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per group size, shared by layers (as the plan's)
    for blk in model.blocks:
        a, m = blk.attn, blk.mlp
        for layers in ((a.q, a.k, a.v), (a.proj,), (m.fc1,), (m.fc2,)):
            n_in = layers[0].in_features
            outs = [lay.out_features for lay in layers]
            g_n = len(layers)
            if g_n not in gates:
                gates[g_n] = (torch.rand(g_n * r, rows, generator=gen), torch.rand(g_n * r, rows, generator=gen))
            t = dict(x=torch.randn(rows, n_in, generator=gen), vr=torch.randn(g_n * r, n_in, generator=gen),
                     urs=[torch.randn(r, o, generator=gen) for o in outs],
                     s=gates[g_n][0], gr=gates[g_n][1],
                     ys=[torch.randn(rows, o, generator=gen) for o in outs],
                     gs=[torch.randn(rows, o, generator=gen) for o in outs],
                     dx=torch.randn(rows, n_in, generator=gen), dhs=torch.empty(g_n * r, rows))
            groups.append(t)

    def ops_of(t) -> list:
        """The group's ops in order, each a closure (forward: shrink, gate scaling, expand per
        layer; backward: dh per layer, dh scaling, dx, dV, dσ, dU per layer)."""
        x, vr, s, gr, dhs = t["x"], t["vr"], t["s"], t["gr"], t["dhs"]
        st = {}

        def shrink():
            st["ht"] = torch.mm(vr, x.t())

        def scale():
            st["hs"], st["hg"] = st["ht"] * s, st["ht"] * gr

        def dh_scale():
            st["dh"] = dhs * s

        ops = [shrink, scale]
        ops += [lambda i=i, ur=ur, y=y: y.addmm_(st["hs"][i * r:(i + 1) * r].t(), ur)
                for i, (ur, y) in enumerate(zip(t["urs"], t["ys"]))]
        ops += [lambda i=i, ur=ur, g=g: torch.mm(ur, g.t(), out=dhs[i * r:(i + 1) * r])
                for i, (ur, g) in enumerate(zip(t["urs"], t["gs"]))]
        ops += [dh_scale, lambda: t["dx"].addmm_(st["dh"].t(), vr), lambda: torch.mm(st["dh"], x),
                lambda: torch.linalg.vecdot(dhs, st["hg"])]
        ops += [lambda i=i, g=g: torch.mm(st["hs"][i * r:(i + 1) * r], g) for i, g in enumerate(t["gs"])]
        return ops

    seq = [op for t in groups for op in ops_of(t)]
    for op in seq:  # first calls (and the state every later op reads)
        op()

    def run() -> None:
        for op in seq:
            op()

    def hot(reps: int = 50, tries: int = 3) -> float:
        """ms: the sum over the ops of each op's best time repeated on hot caches (the most
        favourable per-op cost there is)."""
        total = 0.0
        for op in seq:
            best = math.inf
            for _ in range(tries):
                t0 = time.perf_counter()
                for _ in range(reps):
                    op()
                best = min(best, (time.perf_counter() - t0) / reps)
            total += best
        return total * 1e3

    return run, hot, r, len(seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=10, help="calls per candidate per round")
    ap.add_argument("--pretrain-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="0: as the demo picks")
    ap.add_argument("--out", default="bench/results/cpu_demo_floor")
    a = ap.parse_args()
    from kind_fast.train.data import batch_stream
    from kind_fast.train.demo import _auto_threads

    threads = a.threads or _auto_threads()
    torch.set_num_threads(threads)
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        args, tr = build_trainers(Path(tmp), a.pretrain_steps, 10_000, threads)
        try:
            kind, full = tr["kind"], tr["full"]
            for t in tr.values():  # warm-up (first-call costs, caches)
                t.train(until=t.step + 5)
            x, y = next(iter(batch_stream(kind.data, kind.sampler, 0, 1, 0, 1, 0)))
            frozen = copy.deepcopy(full.train_model)
            for blk in frozen.blocks:
                blk.requires_grad_(False)
            # the post-dropout labels the KIND layers see (the trainer's draws, the model's own rule)
            labels = kind.train_model.y_embedder.drop(y, kind._draws(kind.step)[2].long())
            rows = x.shape[0] * kind.train_model.x_embedder.num_patches
            raw, raw_hot, rank, n_ops = _raw_tailor_ops(kind.train_model, labels, rows)

            def fwd_bwd(t, model):
                model.train()
                for p in model.parameters():
                    p.grad = None
                t._forward_loss(model, x, y, t.step)["loss"].backward()

            cases = {
                "full step": lambda: full.train_step(x, y),
                "KIND step": lambda: kind.train_step(x, y),
                "KIND fwd+bwd": lambda: fwd_bwd(kind, kind.train_model),
                "dense, blocks frozen, fwd+bwd": lambda: fwd_bwd(full, frozen),
                "tailor ops, raw": raw,
            }
            ms: dict[str, list[float]] = {k: [] for k in cases}
            ms["tailor ops, each op hot (best of 3 × 50 calls)"] = []
            with kind.weight_cache_scope():
                for r in range(a.rounds):
                    ms["tailor ops, each op hot (best of 3 × 50 calls)"].append(raw_hot())
                    order = list(cases) if r % 2 == 0 else list(reversed(cases))
                    for k in order:
                        cases[k]()
                        t0 = time.perf_counter()
                        for _ in range(a.reps):
                            cases[k]()
                        ms[k].append((time.perf_counter() - t0) / a.reps * 1e3)
        finally:
            for t in tr.values():
                t.close()
    med = {k: statistics.median(v) for k, v in ms.items()}
    base = [ks - kf + d for ks, kf, d in zip(ms["KIND step"], ms["KIND fwd+bwd"], ms["dense, blocks frozen, fwd+bwd"])]
    floors = [b + t for b, t in zip(base, ms["tailor ops, raw"])]
    floors_hot = [b + t for b, t in zip(base, ms["tailor ops, each op hot (best of 3 × 50 calls)"])]
    ratios = {"KIND step / full step": [k / f for k, f in zip(ms["KIND step"], ms["full step"])],
              "floor / full step (tailor ops as a sequence)": [fl / f for fl, f in zip(floors, ms["full step"])],
              "floor / full step (each tailor op at its hot best)": [
                  fl / f for fl, f in zip(floors_hot, ms["full step"])],
              "(KIND step − KIND fwd+bwd + dense frozen) / full step: the tailor term free": [
                  (ks - kf + d) / f for ks, kf, d, f in zip(ms["KIND step"], ms["KIND fwd+bwd"],
                                                            ms["dense, blocks frozen, fwd+bwd"], ms["full step"])]}
    res = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=f"{platform.machine()} {os.cpu_count()} cores",
               torch=torch.__version__, python=sys.version.split()[0], threads=threads, load_before=load_before,
               load_after=_load(), batch=args.batch, rows=rows, union_rank=rank, rounds=a.rounds, reps=a.reps,
               tailor_ops=n_ops, ms=ms, median_ms=med, floor_ms=floors, floor_hot_ms=floors_hot,
               ratios={k: dict(median=statistics.median(v), min=min(v), max=max(v)) for k, v in ratios.items()})
    lines = [f"{res['date']}, {res['machine']}, torch {res['torch']}, {threads} thread(s), load "
             f"{load_before} → {res['load_after']}; batch {args.batch} ({rows} token rows), union rank R = {rank}, "
             f"{n_ops} bare tailor ops per step; "
             f"median of {a.rounds} rounds × {a.reps} calls (wall clock)", "",
             "| candidate | ms (median) |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in med.items()]
    lines += [f"| floor = KIND step − KIND fwd+bwd + dense frozen + tailor ops raw | {statistics.median(floors):.2f} |",
              f"| the same with each tailor op at its hot best | {statistics.median(floors_hot):.2f} |",
              "", "| ratio | median (min–max over rounds) |", "|---|---|"]
    lines += [f"| {k} | **{statistics.median(v):.3f}** ({min(v):.3f}–{max(v):.3f}) |" for k, v in ratios.items()]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
