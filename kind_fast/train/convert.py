"""Bring your own DiT: ``kind-fast convert`` and imports that read kind_fast folders too
(docs/design.md §3.4).

``kind_fast.models.dit.from_dense`` / ``load_dense`` read state dicts, checkpoint files and diffusers
models (``kind_fast.models.dense_io``). This module adds kind_fast's own folders, so every dense DiT
the package can produce converts the same way:

* a trainer run folder (its ``ema/`` or ``model/``) or a weights folder of a dense run
  (``pretrain --method dense``, ``transfer --method full|scratch``);
* a ``save_pretrained`` folder of a dense ``kind_fast.models.dit.DiT``.

    kind-fast convert DiT-XL-2-256x256.pt --out runs/xl-kind --tailor-rank 96 --active 32 --check
    kind-fast pretrain --init runs/xl-kind ...       # continue as KIND (or --init the .pt directly)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from kind_fast.models.dense_io import check_conversion, is_diffusers_folder
from kind_fast.models.dit import DiT, KindConfig, kindify_dit
from kind_fast.models.dit import load_dense as _load_dense
from kind_fast.nn.gate import DEFAULT_GATE, ClassGate

__all__ = ["load_dense", "from_dense", "is_kind_fast_folder"]

SPEC_FILE = "train_spec.json"  # kind_fast.train.models.SPEC_FILE


def is_kind_fast_folder(path: Path, which: str = "ema") -> bool:
    """A kind_fast save or weights folder, or a run folder holding one under ``which``/."""
    return any((c / "kind_config.json").is_file() or (c / SPEC_FILE).is_file() for c in (path, path / which))


def _from_folder(path: Path, which: str) -> DiT:
    from kind_fast.models.baselines import as_plain_dit
    from kind_fast.train.models import load_weights, resolve_init

    model = as_plain_dit(load_weights(resolve_init(path, which)))  # a TLEG ancestry: its expanded DiT
    if not isinstance(model, DiT):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a plain DiT (a LoRA/SVDiff run: "
                         "merge or export it to a dense DiT first)")
    if model.kind is not None:
        raise ValueError(f"{path} already holds a KIND-DiT: load it with kind_fast.deploy.serialization.load_pretrained")
    return model.eval()


def load_dense(src, *, which: str = "ema", num_heads: int | None = None, class_dropout_prob: float = 0.1) -> DiT:
    """``kind_fast.models.dit.load_dense``, plus kind_fast run / weights / save folders."""
    if isinstance(src, (str, Path)) and Path(src).is_dir() and not is_diffusers_folder(Path(src)):
        if which not in ("ema", "model"):
            raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
        if is_kind_fast_folder(Path(src), which):
            return _from_folder(Path(src), which)
        files = sorted(p.name for p in Path(src).iterdir())[:10]
        raise ValueError(f"{src} is neither a kind_fast save folder, a trainer run, nor a diffusers model "
                         f"folder (it holds {files})")
    return _load_dense(src, which=which, num_heads=num_heads, class_dropout_prob=class_dropout_prob)


def from_dense(src, kind: KindConfig | None = None, *, gate: ClassGate | None = None, which: str = "ema",
               num_heads: int | None = None, class_dropout_prob: float = 0.1) -> DiT:
    """``kind_fast.models.dit.from_dense``, plus kind_fast run / weights / save folders."""
    kind = KindConfig() if kind is None else kind
    dense = load_dense(src, which=which, num_heads=num_heads, class_dropout_prob=class_dropout_prob)
    return kindify_dit(dense, kind, gate).eval()


# =====================================================================================
# kind-fast convert
# =====================================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a DiT .pt/.safetensors file (facebookresearch layout), a kind_fast run or weights "
                               "folder with a dense DiT, or a diffusers DiTTransformer2DModel / DiTPipeline folder")
    p.add_argument("--out", required=True, help="output folder (kind_fast save_pretrained layout)")
    p.add_argument("--tailor-rank", type=int, default=96, help="N_T tailors per matrix (default 96)")
    p.add_argument("--active", type=int, default=32, help="tailors each class switches on (default 32)")
    p.add_argument("--gate", choices=("balanced", "block", "random_k", "all_on"), default=DEFAULT_GATE,
                   help=f"class gate (default {DEFAULT_GATE}: distinct, balanced tailor sets per class)")
    p.add_argument("--null", choices=("off", "all", "class"), default="off", help="the null (CFG) class's tailors")
    p.add_argument("--qkv", choices=("split", "fused"), default="split")
    p.add_argument("--learngene-rank", type=int, default=None, help="N_G (default: min(in, out) - tailor rank)")
    p.add_argument("--seed", type=int, default=0, help="balanced / random_k gate seed")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: from the DiT preset)")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="weights of a training checkpoint")
    p.add_argument("--check", action="store_true",
                   help="also report how exactly the components encode the dense weights, and the output "
                        "difference with every tailor on (random inputs)")


def run(args: argparse.Namespace) -> int:
    import sys

    from kind_fast.deploy.serialization import save_pretrained

    try:
        kind = KindConfig(tailor_rank=args.tailor_rank, active=args.active, gate=args.gate, null=args.null,
                          qkv=args.qkv, learngene_rank=args.learngene_rank, seed=args.seed)
        dense = load_dense(args.src, which=args.which, num_heads=args.num_heads)
        reference = copy.deepcopy(dense) if args.check else None
        model = kindify_dit(dense, kind)
        check = check_conversion(reference, model) if args.check else None
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"kind-fast convert: {e}", file=sys.stderr)
        return 2
    out = save_pretrained(model, args.out)
    a = model.arch
    n = sum(1 for _ in model.kind_layers())
    print(f"converted a dense DiT (hidden {a['hidden_size']}, depth {a['depth']}, {a['num_classes']} classes, "
          f"{a['input_size']}x{a['input_size']}x{a['in_channels']}) into a KIND-DiT: {n} KIND layers, "
          f"N_T={kind.tailor_rank}, {kind.gate} gate")
    if check is not None:
        out_text = ("the dense model's output is all zero (an untrained adaLN-Zero DiT): nothing to compare"
                    if check["output"] is None else f"{check['output']:.2e}")
        print(f"check: max relative error of the block weights (learngenes + all tailors) {check['weights']:.2e}; "
              f"of the output with every tailor on {out_text}")
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in Path(out).iterdir()))})")
    print(f"next: kind-fast pretrain --init {out} ...   or   kind-fast transfer --init {out} ...")
    return 0
