"""Command line: ``kind-fast <command>`` or ``python -m kind_fast <command>``.

Each command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
``COMMANDS`` maps command names to those modules (imported only when the command runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("kind_fast.train.demo", "main job: pretrain on digits 0-7, transfer to 8-9, baselines, one table"),
    "pretrain": ("kind_fast.train.cmd_pretrain", "KIND pretraining (or a dense DiT); flags or a YAML/JSON config"),
    "transfer": ("kind_fast.train.cmd_transfer",
                 "KIND transfer or a baseline (full, lora, svdiff, heur_lg, tleg, scratch)"),
    "sample": ("kind_fast.train.cmd_sample", "CFG samples of a trained run: PNG grid, .npz (torchrun: all ranks)"),
    "convert": ("kind_fast.train.convert", "import a dense DiT checkpoint (.pt, diffusers folder) as a KIND-DiT save folder"),
    "export": ("kind_fast.train.cmd_export", "CFG-exact standalone model for some classes (merged, reduced, dense)"),
    "sample-tasks": ("kind_fast.train.cmd_sample_tasks", "samples of several tasks on one base in mixed batches"),
    "plot": ("kind_fast.train.cmd_plot", "a run's loss curves as <run>/loss.png (from metrics.csv)"),
    "info": ("kind_fast.info", "versions, devices and which backends are live"),
    "build-ext": ("kind_fast.ops._ext", "compile the CUDA extension kind_fast._C after installation (cached)"),
    "flops": ("kind_fast.perf.flops",
              "analytic FLOPs per mode (KIND, full FT, LoRA, SVDiff, Heur-LG, TLEG): table, markdown, plot"),
    "bench": ("kind_fast.perf.benchmark", "time a training step per mode and CFG sampling; --report: markdown + plot"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kind-fast", description="KIND for Diffusion Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # only the chosen command's module is imported
            mod = importlib.import_module(module)
            if hasattr(mod, "add_arguments"):
                mod.add_arguments(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    # commands may choose torch's CPU threads (--threads); a caller in the same process (a test, a
    # notebook) gets its own count back
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        return int(module.run(args) or 0)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
