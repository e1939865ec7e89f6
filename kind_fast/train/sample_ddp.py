"""Many samples on many processes: ``kind-fast sample --num-samples 50000 --npz`` under torchrun.

The list of sample labels is cut into chunks of ``--batch-size``. Chunk k's noise comes from a
generator seeded by (seed, k) alone (``sampling.sample_chunks``), so its images are the same
whichever process samples it. Chunks go round-robin to the ranks (chunk k → rank k mod W); each
rank writes its chunks, in order, into its own share file next to the output
(``.<name>.share-R-of-W.npy``, a memory map, so no rank holds its share in memory). After a
barrier, rank 0 streams the shares in chunk order into one ADM-format ``.npz`` (``arr_0``:
uint8 N×H×W×C, the array the ADM/DiT evaluation suite reads, plus ``labels``) and the PNG grid,
then removes the shares. The result does not depend on the number of processes (bitwise on
the CPU; on GPUs up to the determinism of the kernels). As with DiT's ``sample_ddp.py``, the
output folder must be one that every rank sees (a shared file system across nodes).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kind_fast.train.distributed import DistEnv, barrier, broadcast_object


def sample_labels(classes: Sequence[int], *, num_samples: int | None = None, n_per_class: int = 8) -> Tensor:
    """The label of every sample, in output order.

    ``num_samples`` given: the classes cycled (sample i has class ``classes[i % K]``), so every
    class gets N/K samples (±1) and any prefix is balanced too. Otherwise ``n_per_class`` of each
    class, class after class (the grid's rows)."""
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    if cls.numel() == 0:
        raise ValueError("no classes to sample")
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
        return cls[torch.arange(num_samples) % cls.numel()]
    if n_per_class < 1:
        raise ValueError(f"--n-per-class must be >= 1, got {n_per_class}")
    return cls.repeat_interleave(n_per_class)


def rank_chunks(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The chunk ids rank ``rank`` of ``world`` samples: k = rank, rank + W, ..."""
    return list(range(rank, -(-n // batch_size), world))


def share_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.stem}.share-{rank}-of-{world}.npy")


def write_npz(path: str | os.PathLike, arrays: dict[str, tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray]]]
              ) -> Path:
    """Write an .npz (what ``np.savez`` writes: one uncompressed ``NAME.npy`` per array) from
    pieces: ``{name: (shape, dtype, iterable of arrays whose rows add up to shape)}``, without
    holding any whole array in memory. Atomic: a temporary file renamed over ``path``."""
    from kind_fast.atomic import atomic_write

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, pieces) in arrays.items():
                dtype = np.dtype(dtype)
                with zf.open(f"{name}.npy", "w", force_zip64=True) as g:
                    np.lib.format.write_array_header_1_0(
                        g, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                            "shape": tuple(shape)})
                    rows = 0
                    for piece in pieces:
                        piece = np.ascontiguousarray(piece, dtype=dtype)
                        if piece.shape[1:] != tuple(shape[1:]):
                            raise ValueError(f"{name}: piece of shape {piece.shape} in an array of {shape}")
                        g.write(piece.tobytes())
                        rows += piece.shape[0]
                    if rows != shape[0]:
                        raise ValueError(f"{name}: pieces hold {rows} rows, the array {shape[0]}")

    path = Path(path)
    atomic_write(path, write)
    return path


def _display(images: Tensor) -> np.ndarray:
    """What a share stores: uint8 N×H×W×C for 1- or 3-channel images, else the raw float32."""
    from kind_fast.train.sampling import to_uint8

    return to_uint8(images) if images.shape[1] in (1, 3) else images.float().numpy()


def sample_to_files(model: nn.Module, labels: Tensor, *, shape: tuple[int, int, int], env: DistEnv,
                    grid_path: Path, npz_path: Path | None, nrow: int, batch_size: int,
                    decode: Callable[[Tensor], Tensor] | None = None, grid_max: int | None = None,
                    **sample_kw) -> dict:
    """Sample ``labels`` over every rank of ``env``; rank 0 writes the grid (the first
    ``grid_max`` samples, default all) and, if asked, the .npz. Returns what rank 0 wrote."""
    from kind_fast.train.sampling import sample_chunks

    n = labels.shape[0]
    world, rank = env.world_size, env.rank
    mine = rank_chunks(n, batch_size, rank, world)
    sizes = [min(batch_size, n - k * batch_size) for k in range(-(-n // batch_size))]
    share = share_path(npz_path or grid_path, rank, world)
    share.parent.mkdir(parents=True, exist_ok=True)
    mm, row = None, 0
    try:
        for _, x in sample_chunks(model, labels, mine, shape=shape, batch_size=batch_size, **sample_kw):
            if decode is not None:
                x = decode(x)
            arr = _display(x)
            if mm is None:
                mm = np.lib.format.open_memmap(share, mode="w+", dtype=arr.dtype,
                                               shape=(sum(sizes[j] for j in mine), *arr.shape[1:]))
            mm[row:row + arr.shape[0]] = arr
            row += arr.shape[0]
        if mm is not None:
            mm.flush()
        del mm
        barrier(env)  # every share is complete
        written, err, exc = {}, None, None
        if env.is_main:
            try:
                written = _assemble(labels, batch_size, world, grid_path, npz_path, nrow, grid_max)
            except Exception as e:  # noqa: BLE001 - tell the other ranks, then raise it here
                err, exc = f"{type(e).__name__}: {e}", e
        err = broadcast_object(err, env)  # also: rank 0 is done reading the shares
        if exc is not None:
            raise exc
        if err is not None:
            raise RuntimeError(f"rank 0 could not assemble the samples: {err}")
    finally:
        share.unlink(missing_ok=True)
    return written


def _assemble(labels: Tensor, batch_size: int, world: int, grid_path: Path, npz_path: Path | None,
              nrow: int, grid_max: int | None) -> dict:
    from kind_fast.train.sampling import save_grid

    n = labels.shape[0]
    sizes = [min(batch_size, n - k * batch_size) for k in range(-(-n // batch_size))]
    shares = {r: np.load(share_path(npz_path or grid_path, r, world), mmap_mode="r")
              for r in range(min(world, len(sizes)))}

    def pieces():
        """Every chunk's rows, in output order (chunk k is the next block of rank k mod W's share)."""
        offsets = dict.fromkeys(shares, 0)
        for k, size in enumerate(sizes):
            r = k % world
            yield shares[r][offsets[r]:offsets[r] + size]
            offsets[r] += size

    uint8 = shares[0].dtype == np.uint8
    n_grid = n if grid_max is None else min(grid_max, n)
    head, got = [], 0
    for piece in pieces():  # the grid's images: the first n_grid in output order
        if got >= n_grid:
            break
        head.append(np.array(piece[:n_grid - got]))
        got += head[-1].shape[0]
    head = torch.from_numpy(np.concatenate(head))
    imgs = head.permute(0, 3, 1, 2).float() / 127.5 - 1.0 if uint8 else head  # exact inverse of to_uint8
    out = {"grid": save_grid(imgs, grid_path, nrow=nrow)}
    if npz_path is not None:
        if not uint8:
            raise ValueError("--npz writes uint8 images; a latent model needs --vae to decode them first")
        out["npz"] = write_npz(npz_path, {
            "arr_0": ((n, *shares[0].shape[1:]), np.uint8, pieces()),
            "labels": ((n,), np.int64, [labels.numpy()]),
        })
    return out
