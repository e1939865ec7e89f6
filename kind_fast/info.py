"""``python -m kind_fast.info``: versions, devices and which backends are live (and why not)."""

from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    from kind_fast import __version__
    from kind_fast.ops._ext import load_extension, origin, why_cannot_build
    from kind_fast.ops.backends import backend_status, current_backend

    info: dict = {
        "kind_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    cuda_ok = torch.cuda.is_available()
    info["cuda available"] = cuda_ok
    info["devices"] = (
        [f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
         for i in range(torch.cuda.device_count())]
        if cuda_ok else [f"cpu ({torch.get_num_threads()} threads)"]
    )
    mod, reason = load_extension()
    ext = {"status": reason}
    if mod is not None:
        ext["origin"] = origin()
    else:
        try:
            can = why_cannot_build()
        except Exception as e:  # noqa: BLE001 - info reports, never crashes
            can = f"{type(e).__name__}: {e}"
        ext["kind-fast build-ext"] = "can build it here" if can is None else f"cannot build it here: {can}"
    if mod is not None:
        from kind_fast.ops._ext import arch_names

        ext["archs"] = arch_names(getattr(mod, "ARCH_LIST", "unknown"))
        ext["CUDA runtime"] = getattr(mod, "CUDA_VERSION", "unknown")
        ext["built with torch"] = getattr(mod, "TORCH_VERSION", "unknown")
        ext["ops served"] = ", ".join(f"kind_fast::{op}" for op in getattr(mod, "OPS", ()))
        try:
            from kind_fast import _build_info

            ext["built for"] = _build_info.TORCH_CUDA_ARCH_LIST
        except ImportError:
            pass
    info["compiled extension"] = ext
    info["backend selected"] = current_backend()
    info["backends"] = {
        k: ("available" if ok else "unavailable") + f": {why}" for k, (ok, why) in backend_status().items()
    }
    info["triton paths"] = _triton_paths()
    info["cuda backend"] = _cuda_backend()
    return info


def _cuda_backend() -> dict:
    """What the CUDA extension's backend is for, and where "auto" would use its M1 (cost model,
    DiT-XL/2 at batch 32; see csrc/README.md)."""
    try:
        from kind_fast.ops import kind_linear_cuda as kc
    except Exception as e:  # noqa: BLE001 - info reports, never crashes
        return {"error": f"{type(e).__name__}: {e}"}
    out = {
        "for": "cross-checking and comparing M1 (cuBLAS GEMM + gated shrink/expand kernels: the "
               "reference's memory passes, fewer launches; not the fused M1, which is Triton's), "
               "and path M3 for sampling on cuBLAS (kind_linear_merged)",
        "auto": "M1 only after its self-check passed on the device, and only where the cost model "
                "says it is no slower than the reference; with Triton ready too, the faster per shape",
    }
    d, m, b, k, n_t = 1152, 32 * 256, 32, 32, 96
    for name, (n_in, n_out) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}.items():
        parts = []
        for mode in ("forward", "transfer", "pretrain"):
            lin = kc.modelled_time("linear", mode, m, b, n_in, n_out, n_t, k)
            cu = kc.modelled_time("cuda", mode, m, b, n_in, n_out, n_t, k) / lin
            ref = kc.modelled_time("reference", mode, m, b, n_in, n_out, n_t, k) / lin
            use = "yes" if kc.auto_shape_ok(m, b, n_in, n_out, n_t, k, mode) else "no"
            parts.append(f"{mode} {use} ({cu:.2f} vs {ref:.2f})")
        out[f"DiT-XL/2.{name}"] = "auto M1 (B=32; modelled cuda vs reference, x nn.Linear): " + ", ".join(parts)
    return out


def _triton_paths() -> dict:
    """The op family's path choice per DiT-XL/2 layer on the Triton backend, training and sampling
    (KIND_FAST_DEBUG=1 logs each call's choice)."""
    try:
        from kind_fast.ops.paths import choose_path
    except Exception as e:  # noqa: BLE001 - info reports, never crashes
        return {"error": f"{type(e).__name__}: {e}"}
    d, m, k, n_t = 1152, 32 * 256, 32, 96
    out = {}
    for name, (n_in, n_out) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}.items():
        c = choose_path(m, n_in, n_out, k, n_t, learngene_rank=min(n_in, n_out) - n_t, samples=32)
        out[f"DiT-XL/2.{name}"] = f"{c.path} (B=32, K={k} of {n_t}, FLOPs {c.flop_ratio:.3f}x dense): {c.reason}"
        s = choose_path(2 * m, n_in, n_out, k, n_t, learngene_rank=min(n_in, n_out) - n_t, samples=64,
                        distinct_classes=2, training=False, merged_cached=True)
        out[f"DiT-XL/2.{name} sampling"] = (f"{s.path} (CFG, 2x32 images, classes {{c, null}}, FLOPs "
                                            f"{s.flop_ratio:.3f}x dense): {s.reason}")
    return out


def run(args=None) -> int:
    main()
    return 0


def main() -> None:
    info = collect()
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k:<{width}} :")
            for kk, vv in v.items():
                print(f"  {kk:<{width - 2}} : {vv}")
        elif isinstance(v, list):
            print(f"{k:<{width}} : {v[0] if v else ''}")
            for item in v[1:]:
                print(f"{'':<{width}}   {item}")
        else:
            print(f"{k:<{width}} : {v}")


if __name__ == "__main__":
    main()
