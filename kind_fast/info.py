"""``python -m kind_fast.info``: versions, devices and which backends are live (and why not)."""

from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    from kind_fast import __version__
    from kind_fast._ext import load_extension
    from kind_fast.backends import backend_status, current_backend

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
        ext["archs"] = getattr(mod, "ARCH_LIST", "unknown")
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
    return info


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
