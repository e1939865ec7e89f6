"""The demo's transfer wall time, KIND against full fine-tuning, measured interleaved.

    python bench/cpu_demo_steps.py [--rounds 9] [--chunk 20] [--threads 0] [--out bench/results/cpu_demo_steps]

What ``kind-fast demo`` times (its table's "wall s"), at its defaults: the trainer's transfer
runs (digits 8-9, batch 64, AdamW, EMA, grad clipping, logging: ``Trainer.train``) of KIND
transfer and of full fine-tuning, built exactly as the demo builds them (``kind_fast.train.demo``'s
config, from one pretrained KIND model; its pretraining is cut to ``--pretrain-steps``, which
changes the weights' values, not the work of a step; the loss-curve plot that ends each
``train()`` call is left out, see ``build_trainers``). Both trainers live in one process and
train in alternating chunks of ``--chunk`` steps (order alternating between rounds), so both see
the same machine load; each round's ratio KIND / full is a pair, and the report gives the median
and spread of those ratios (wall clock, the demo's measure; and the process's CPU time, which
waiting for a core on a shared machine does not inflate) (docs/design.md §6: the goal is ≤ 0.90 on an idle 2-core machine).
``--threads 0`` picks threads as the demo does (all cores up to 4 when the machine is idle, 1 when
it is busy). The load average is recorded before and after; on a shared machine, rerun when idle.

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def build_trainers(root: Path, pretrain_steps: int, steps: int, threads: int):
    from kind_fast.train import demo
    from kind_fast.train.loop import Trainer

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args([])  # the demo's defaults
    args.pretrain_steps = pretrain_steps
    args.steps = steps
    args.threads = threads
    quiet = lambda *a, **k: None  # noqa: E731
    cfg = demo._config(args, "pretrain", "kind", root / "pretrain", None)
    cfg.progress = False
    pre = Trainer(cfg, log=quiet)
    pre.train()
    pre.export()
    pre.close()
    trainers = {}
    for method in ("kind", "full"):
        cfg = demo._config(args, "transfer", method, root / method, root / "pretrain")
        cfg.progress = False
        t = Trainer(cfg, log=quiet)
        # train() ends by drawing the loss curve (matplotlib, ~1.5 s, the same for every method);
        # the demo pays it once per run, this benchmark would pay it per chunk: not timed here
        t._plot = lambda: None
        trainers[method] = t
    return args, trainers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--chunk", type=int, default=20, help="training steps per method per round")
    ap.add_argument("--pretrain-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="0: as the demo picks")
    ap.add_argument("--out", default="bench/results/cpu_demo_steps")
    a = ap.parse_args()
    from kind_fast.train.demo import _auto_threads

    threads = a.threads or _auto_threads()
    torch.set_num_threads(threads)
    load_before = _load()
    steps = a.chunk * (a.rounds + 1) + 1
    with tempfile.TemporaryDirectory() as tmp:
        args, tr = build_trainers(Path(tmp), a.pretrain_steps, steps, threads)
        try:
            for t in tr.values():  # warm-up chunk (first-call costs, caches)
                t.train(until=t.step + a.chunk)
            times: dict[str, list[float]] = {"kind": [], "full": []}
            cpu: dict[str, list[float]] = {"kind": [], "full": []}
            for r in range(a.rounds):
                for m in (("kind", "full") if r % 2 == 0 else ("full", "kind")):
                    t0, c0 = time.perf_counter(), time.process_time()
                    tr[m].train(until=tr[m].step + a.chunk)
                    times[m].append((time.perf_counter() - t0) / a.chunk)
                    cpu[m].append((time.process_time() - c0) / a.chunk)
        finally:
            for t in tr.values():
                t.close()
    ratios = [k / f for k, f in zip(times["kind"], times["full"])]
    cpu_ratios = [k / f for k, f in zip(cpu["kind"], cpu["full"])]
    med = statistics.median
    res = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=f"{platform.machine()} {os.cpu_count()} cores",
               torch=torch.__version__, threads=threads, load_before=load_before, load_after=_load(),
               batch=args.batch, chunk=a.chunk, rounds=a.rounds, kind_ms=[t * 1e3 for t in times["kind"]],
               full_ms=[t * 1e3 for t in times["full"]], ratio_median=med(ratios), ratio_min=min(ratios),
               ratio_max=max(ratios), goal=0.90, python=sys.version.split()[0],
               kind_cpu_ms=[t * 1e3 for t in cpu["kind"]], full_cpu_ms=[t * 1e3 for t in cpu["full"]],
               cpu_ratio_median=med(cpu_ratios), cpu_ratio_min=min(cpu_ratios), cpu_ratio_max=max(cpu_ratios))
    md = (f"| {res['date']} | {threads} | {res['load_before']} → {res['load_after']} | "
          f"{med(times['kind']) * 1e3:.1f} | {med(times['full']) * 1e3:.1f} | **{res['ratio_median']:.3f}** "
          f"({res['ratio_min']:.3f}–{res['ratio_max']:.3f}) | {med(cpu['kind']) * 1e3:.1f} / "
          f"{med(cpu['full']) * 1e3:.1f}: {res['cpu_ratio_median']:.3f} "
          f"({res['cpu_ratio_min']:.3f}–{res['cpu_ratio_max']:.3f}) |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    header = ("| date | threads | load 1/5/15 min before → after | KIND transfer wall ms/step (median) | "
              "full fine-tuning wall ms/step (median) | KIND / full wall, per round: median (min–max) | "
              "process CPU ms/step KIND / full: ratio median (min–max) |\n|---|---|---|---|---|---|---|\n")
    out.with_suffix(".md").write_text(header + md + "\n")
    print(header + md)


if __name__ == "__main__":
    main()
