"""CPU measurement of the op family's paths at the demo scale (issue 13's tiny layers).

    python bench/cpu_paths.py [--out bench/results/cpu_paths] [--rounds 7] [--threads 1]

Times, interleaved round by round (so a load change hits every candidate alike; the minimum over
rounds is reported, the median beside it):
* one KIND layer of the demo model (hidden 64: q/k/v/proj 64×64, fc1 64×256, fc2 256×64; B = 64
  images of T = 16 tokens, N_T = 16 tailors, K = 4 active, 2 classes + null), transfer training
  (learngenes frozen, x needs its gradient) and eval, per path (M0 the reference op, M3 merged
  weights, M4 plain autograd ops, and the cost model's own choice), beside nn.Linear;
* the demo's training step (DiT hidden 64, depth 4, 8×8 digits, batch 64, AdamW): KIND transfer
  with the old path (M0 pinned) and with the cost model's choice, and full fine-tuning;
* a CFG sampling step (batch 64 → 128 rows): M0 pinned, the cost model's choice (M3 on cached
  merged weights), and the dense DiT.
Writes <out>.json and <out>.md. The machine is shared: the load average is recorded.
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
from kind_fast.dit import DiT, KindConfig
from kind_fast.ops.paths import choose_path, force_path

B, T, N_T, K, CLASSES = 64, 16, 16, 4, 2


def interleaved(fns: dict, rounds: int, min_time: float = 0.1) -> dict:
    """name -> (min, median, min wall) seconds per call, measured round-robin. The first two are
    this thread's CPU time (time.thread_time): on a machine shared with other jobs, waiting for
    a core does not count, so candidates compare fairly; the wall-clock minimum is kept too."""
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


def layer_rows(rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n_in, n_out, name in ((64, 64, "q/k/v/proj"), (64, 256, "fc1"), (256, 64, "fc2")):
        rows += layer_case(n_in, n_out, name, gen, rounds)
    return rows


def layer_case(n_in: int, n_out: int, name: str, gen: torch.Generator, rounds: int) -> list[dict]:
    every = ("M0", "M1", "M2", "M3", "M4")
    gate = kf.ClassGate.block(CLASSES, N_T, K)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=N_T, gate=gate).freeze_learngenes()
    lin = nn.Linear(n_in, n_out)
    x = torch.randn(B, T, n_in, generator=gen).requires_grad_(True)
    g = torch.randn(B, T, n_out, generator=gen)
    labels = torch.randint(0, CLASSES + 1, (B,), generator=gen)

    def train(path):
        def fn():
            with force_path(path):
                layer(x, labels=labels).backward(g)
        return fn

    fns = {p or "cost model": train(p) for p in ("M0", "M3", "M4", None)}
    fns["nn.Linear"] = lambda: lin(x).backward(g)
    res = interleaved(fns, rounds)
    auto = choose_path(B * T, n_in, n_out, K, N_T, learngene_rank=min(n_in, n_out) - N_T, samples=B,
                       distinct_classes=CLASSES + 1, training=True, backend="torch", device_type="cpu",
                       allow=every).path
    rows = [dict(kind="layer", name=f"{name} {n_in}x{n_out}", mode="transfer fwd+bwd", auto_path=auto,
                 **{k: v[0] * 1e6 for k, v in res.items()}, median={k: v[1] * 1e6 for k, v in res.items()},
                 wall={k: v[2] * 1e6 for k, v in res.items()})]
    layer.eval()
    ye = torch.cat([torch.full((B // 2,), 1), torch.full((B // 2,), CLASSES)])  # a CFG batch
    xe = x.detach()

    def evaluate(path):
        def fn():
            with torch.no_grad(), gate.serving([1, CLASSES]), force_path(path):
                layer(xe, labels=ye)
        return fn

    fns = {p or "cost model": evaluate(p) for p in ("M0", "M3", "M4", None)}
    fns["nn.Linear"] = lambda: lin(xe)
    with torch.no_grad():
        res = interleaved(fns, rounds)
    auto = choose_path(B * T, n_in, n_out, K, N_T, learngene_rank=min(n_in, n_out) - N_T, samples=B,
                       distinct_classes=2, training=False, merged_cached=True, backend="torch",
                       device_type="cpu", allow=every).path
    rows.append(dict(kind="layer", name=f"{name} {n_in}x{n_out}", mode="eval (CFG batch)", auto_path=auto,
                     **{k: v[0] * 1e6 for k, v in res.items()}, median={k: v[1] * 1e6 for k, v in res.items()},
                     wall={k: v[2] * 1e6 for k, v in res.items()}))
    return rows


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
    from kind_fast.benchmark import make_cfg_sample_step, make_train_step

    kind_model, dense_model = demo_model(True), demo_model(False)
    kind_step, _ = make_train_step(kind_model, B)
    full_step, _ = make_train_step(dense_model, B)
    fused_step, _ = make_train_step(demo_model(True, qkv="fused"), B)

    def pinned(fn, path):
        def run():
            with force_path(path):
                fn()
        return run

    res = interleaved({"KIND transfer, old path (M0)": pinned(kind_step, "M0"),
                       "KIND transfer, cost model": kind_step,
                       "KIND transfer, fused qkv (one 64x192 KIND layer), cost model": fused_step,
                       "full fine-tuning": full_step}, rounds)
    rows = [dict(kind="step", name=n, mode="train step", seconds=v[0], median=v[1], wall=v[2]) for n, v in res.items()]
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
                       "KIND sampling step, cost model (M3)": served(kind_sample, None),
                       "dense DiT sampling step": dense_sample}, rounds)
    rows += [dict(kind="step", name=n, mode="CFG sample step", seconds=v[0], median=v[1], wall=v[2])
             for n, v in res.items()]
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    out = [f"# CPU paths at the demo scale ({meta['date']})", "",
           f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} thread(s). Shared with other "
           f"engineers' jobs: load average {meta['load_before']} before, {meta['load_after']} after (1/5/15 min) "
           "on 2 cores. Times are this thread's CPU time (time.thread_time, so waiting for a core does not "
           "count), the minimum over interleaved rounds; medians and wall-clock minima are in the JSON.", "",
           "## One KIND layer (B = 64 × T = 16 rows, N_T = 16, K = 4, 3 gate rows), µs per call", "",
           "| layer | mode | M0 (old) | M3 | M4 | cost model → | nn.Linear |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "layer":
            out.append(f"| {r['name']} | {r['mode']} | {r['M0']:.0f} | {r['M3']:.0f} | {r['M4']:.0f} | "
                       f"{r['auto_path']}: {r['cost model']:.0f} | {r['nn.Linear']:.0f} |")
    out += ["", "## Demo model steps (DiT hidden 64, depth 4, 8×8 digits, batch 64), ms per step", "",
            "| step | ms | ratio |", "|---|---|---|"]
    steps = [r for r in rows if r["kind"] == "step"]
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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load_before = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = layer_rows(a.rounds) + model_rows(a.rounds)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()} {os.cpu_count()} cores "
                f"({platform.processor() or platform.platform()})", torch=torch.__version__, threads=a.threads,
                load_before=load_before, load_after=" / ".join(f"{v:.2f}" for v in os.getloadavg()))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = markdown(meta, rows)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
