"""Does Triton warp-specialize for sm_90a, and does it for our forward? A compile-only probe (no GPU).

    python bench/sm90_warp_specialize_probe.py

Triton (3.6 and 3.9 checked) runs a Hopper warp-specialization pass on loops written as
``tl.range(..., warp_specialize=True)``. This compiles, ahead of time for sm_90a:

1. a plain persistent GEMM (TMA descriptors, static tile schedule ``tl.range(pid, tiles, CTAs)``)
   with and without ``warp_specialize=True``;
2. the same GEMM with a KIND-like epilogue ``acc += h·U``: h and U through TMA descriptors, by
   pointer loads, and through TMA after a spin on another CTA's flag;
3. path M1's forward (``kind_linear_fused_kernel``, the production config of DiT-XL/2.q at
   M = 8192) with its tile loop rewritten the same way: the dynamic tile counter's
   ``while pid < total`` loop becomes ``for pid in tl.range(cta, total, ctas, warp_specialize=True)``
   (a static schedule; a copy of kernels/kind_linear.py is rewritten, the repository's is not touched);

and reports for each the warp-specialized regions and partitions in the TTGIR, ``setmaxnreg`` in
the PTX (the register split between producer and consumer warps), warpgroup MMAs, TMA loads and
the warps the kernel runs with (a compile error where the pass fails). docs/design.md §6 cites
the result (bench/results/sm90_warp_specialize_probe.md): the pass splits the GEMM as long as
the loop body loads through TMA only and waits on no other CTA; our forward gathers factor rows
by pointer and waits on the owners' flags, so overlapping its epilogue needs a different kernel
structure, not a flag.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@triton.jit
def _persistent_gemm(a_ptr, b_ptr, c_ptr, h_ptr, u_ptr, flag_ptr, M, N, K, CTAS: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, WS: tl.constexpr, EPILOGUE: tl.constexpr,
                     WAIT: tl.constexpr):
    """A persistent TMA GEMM c = a·bᵀ over a static tile schedule; EPILOGUE "none", or a KIND-like
    ``acc += h[rows] · U[:, cols]`` (h (M, KP), U (KP, N)) loaded through TMA descriptors ("tma")
    or pointers ("pointer"); WAIT: first spin on the row's flag (another CTA publishes h)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    if EPILOGUE == "tma":
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[M, KP], strides=[KP, 1], block_shape=[BM, KP])
        u_desc = tl.make_tensor_descriptor(u_ptr, shape=[KP, N], strides=[N, 1], block_shape=[KP, BN])
    tiles_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tiles_n, CTAS, warp_specialize=WS):
        pm, pn = tile // tiles_n, tile % tiles_n
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(tl.cdiv(K, BK)):
            acc = tl.dot(a_desc.load([pm * BM, k * BK]), b_desc.load([pn * BN, k * BK]).T, acc)
        if WAIT:
            f = tl.atomic_add(flag_ptr + pm, 0, sem="acquire", scope="gpu")
            while f == 0:
                f = tl.atomic_add(flag_ptr + pm, 0, sem="acquire", scope="gpu")
        if EPILOGUE == "tma":
            acc = tl.dot(h_desc.load([pm * BM, 0]), u_desc.load([0, pn * BN]), acc)
        elif EPILOGUE == "pointer":
            rm, rj, rn = pm * BM + tl.arange(0, BM), tl.arange(0, KP), pn * BN + tl.arange(0, BN)
            acc = tl.dot(tl.load(h_ptr + rm[:, None] * KP + rj[None, :]),
                         tl.load(u_ptr + rj[:, None] * N + rn[None, :]), acc)
        c_desc.store([pm * BM, pn * BN], acc.to(tl.bfloat16))


def _report(name: str, compiled) -> str:
    ttg, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    return (f"| {name} | {ttg.count('ttg.warp_specialize(')} | {ttg.count('partition')} | "
            f"{ptx.count('setmaxnreg')} | {ptx.count('wgmma.mma_async')} | {ptx.count('cp.async.bulk.tensor')} | "
            f"{compiled.metadata.num_warps} |")


def _compile(fn, sig: dict, constexprs: dict, *, warps: int, stages: int, attrs: dict | None = None):
    return triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs or {}),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def _forward_with_ws_loop():
    """kind_linear_fused_kernel from a rewritten copy of kernels/kind_linear.py (static tl.range
    tile loop with warp_specialize=True)."""
    src = (ROOT / "kernels" / "kind_linear.py").read_text()
    old_head = ("    pid = tl.atomic_add(state_ptr + 2, 1, sem=\"relaxed\", scope=\"gpu\").to(tl.int32)\n"
                "    while pid < total:\n"
                "        nxt = tl.atomic_add(state_ptr + 2, 1, sem=\"relaxed\", scope=\"gpu\").to(tl.int32)\n")
    old_tail = "        pid = nxt\n"
    if old_head not in src or src.count(old_tail) != 1:
        raise SystemExit("kernels/kind_linear.py's tile loop changed: update this probe's rewrite")
    new_head = "    for pid in tl.range(cta, total, ctas, warp_specialize=True):\n"
    src = src.replace(old_head, new_head).replace(old_tail, "")
    tmp = Path(tempfile.mkdtemp()) / "kind_linear_ws_probe.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("kind_linear_ws_probe", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.kind_linear_fused_kernel


def main() -> None:
    from kind_fast.perf import audit

    rows = ["| kernel | warp-specialized regions | partitions | setmaxnreg | wgmma | TMA loads | warps |",
            "|---|---|---|---|---|---|---|"]
    sig = {n: "*bf16" for n in ("a_ptr", "b_ptr", "c_ptr", "h_ptr", "u_ptr")} | {
        "flag_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
        **{n: "constexpr" for n in ("CTAS", "BM", "BN", "BK", "KP", "WS", "EPILOGUE", "WAIT")}}
    cases = [(False, "none", False, "plain persistent TMA GEMM, warp_specialize=False"),
             (True, "none", False, "plain persistent TMA GEMM, warp_specialize=True")]
    cases += [(True, epi, wait, f"the same GEMM, warp_specialize=True, epilogue += h·U: {what}")
              for epi, wait, what in (("tma", False, "h and U through TMA"),
                                      ("pointer", False, "h and U by pointer loads"),
                                      ("tma", True, "h and U through TMA after a spin on the row's flag"))]
    for ws, epi, wait, name in cases:
        try:
            ck = _compile(_persistent_gemm, sig, dict(CTAS=132, BM=128, BN=128, BK=64, KP=32, WS=ws, EPILOGUE=epi,
                                                      WAIT=wait), warps=4, stages=3)
        except Exception as e:  # noqa: BLE001 - the pass failing is a result
            rows.append(f"| {name} | compile error: {type(e).__name__} (the warp-specialization pass failed) "
                        "| - | - | - | - | - |")
            continue
        rows.append(_report(name, ck))
    spec = next(s for s in audit.audit_specs("kind_linear", full=False)
                if s.kernel == "kind_linear_fused_kernel" and s.variant.startswith("DiT-XL/2.q"))
    for name, fn in (("path M1 forward (as shipped: dynamic tile counter)", spec.fn),
                     ("path M1 forward, tile loop tl.range(warp_specialize=True)", _forward_with_ws_loop())):
        cx, types = dict(spec.constexprs), dict(spec.signature)
        fsig = {n: ("constexpr" if n in cx else types.get(n, "i32")) for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible if n in fn.arg_names}
        ck = _compile(fn, fsig, cx, warps=spec.num_warps, stages=spec.num_stages, attrs=attrs)
        rows.append(_report(f"{name}, {spec.variant}", ck))
    print(f"Triton {triton.__version__}, target sm_90a (compile only)\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
