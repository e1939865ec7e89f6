"""Training data: sklearn digits (embedded default), an ImageFolder, or VAE-latent shards.

Every data set gives ``(x (C, H, W) float32, label int)`` per index, ``num_classes``,
``class_names`` and ``sample_shape``; the in-memory digits also serve whole batches at once.

Order and randomness are functions of (seed, step) only, which is what makes a resumed run
and a multi-process run see exactly the samples of an uninterrupted single-process run:

* ``GlobalBatchSampler.indices(step)``: the step's global batch from a stream of per-epoch
  permutations (epoch e shuffled by a generator seeded from (seed, e)); rank r of W takes the
  contiguous slice r of it. The data position is just the step.
* ``step_generator(seed, step)``: the CPU generator for the step's timesteps, noise, label
  dropout and flips, drawn for the whole global batch and sliced per rank.

Latent shards (written by ``scripts/encode_latents.py`` or ``write_latent_shards``)::

    <folder>/index.json               {"format": "kind_fast.latents", "version": 1,
                                       "shape": [C, H, W], "scale_factor": 0.18215,
                                       "class_names": [...], "vae": "...",
                                       "shards": [{"file": "shard_00000.safetensors", "count": n}]}
    <folder>/shard_00000.safetensors  latents (n, C, H, W) float16/32 (already × scale_factor),
                                      labels (n,) int64
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LATENT_FORMAT = "kind_fast.latents"
DIGIT_DEFAULTS = {"pretrain": list(range(8)), "transfer": [8, 9]}


def derived_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python runs)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, purpose: str = "step") -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, purpose, step))


# =====================================================================================
# Order
# =====================================================================================
class GlobalBatchSampler:
    """Global batches from an endless stream of seeded per-epoch permutations of ``n`` items."""

    def __init__(self, n: int, global_batch: int, seed: int):
        if n < 1:
            raise ValueError("the data set is empty")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        p = self._perms.get(epoch)
        if p is None:
            g = torch.Generator().manual_seed(derived_seed(self.seed, "epoch", epoch))
            p = torch.randperm(self.n, generator=g)
            self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = p
        return p

    def indices(self, step: int) -> Tensor:
        """(global_batch,) int64 data indices of ``step`` (0-based)."""
        pos = step * self.global_batch + torch.arange(self.global_batch)
        epochs, offs = pos // self.n, pos % self.n
        out = torch.empty(self.global_batch, dtype=torch.long)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[offs[sel]]
        return out

    def position(self, step: int) -> dict:
        """Data position after ``step`` steps (for the checkpoint)."""
        consumed = step * self.global_batch
        return {"samples_consumed": consumed, "epoch": consumed // self.n, "offset": consumed % self.n}


def rank_slice(t: Tensor, rank: int, world: int) -> Tensor:
    if t.shape[0] % world:
        raise ValueError(f"global batch {t.shape[0]} is not divisible by {world} processes")
    b = t.shape[0] // world
    return t[rank * b:(rank + 1) * b]


class _StepBatches(torch.utils.data.Sampler):
    """Per-rank index lists for steps [start, stop) (a DataLoader batch_sampler)."""

    def __init__(self, sampler: GlobalBatchSampler, start: int, stop: int, rank: int, world: int):
        self.sampler, self.start, self.stop, self.rank, self.world = sampler, start, stop, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield rank_slice(self.sampler.indices(step), self.rank, self.world).tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def batch_stream(dataset, sampler: GlobalBatchSampler, start: int, stop: int, rank: int = 0,
                 world: int = 1, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) of this rank for steps [start, stop), in order."""
    if hasattr(dataset, "get_batch"):
        for step in range(start, stop):
            yield dataset.get_batch(rank_slice(sampler.indices(step), rank, world))
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_StepBatches(sampler, start, stop, rank, world), num_workers=workers,
        persistent_workers=False, pin_memory=torch.cuda.is_available())
    yield from loader


# =====================================================================================
# Data sets
# =====================================================================================
def _relabel(labels: Tensor, classes: Sequence[int] | None, total: int, what: str) -> tuple[Tensor, Tensor]:
    """(kept positions, new labels): keep ``classes`` (renumbered 0..K-1 in the given order)."""
    if classes is None:
        return torch.arange(labels.shape[0]), labels
    bad = [c for c in classes if not 0 <= c < total]
    if bad:
        raise ValueError(f"data.classes: {what} has classes 0..{total - 1}, got {bad}")
    remap = torch.full((total,), -1, dtype=torch.long)
    remap[torch.tensor(list(classes))] = torch.arange(len(classes))
    new = remap[labels]
    keep = torch.nonzero(new >= 0).flatten()
    if keep.numel() == 0:
        raise ValueError(f"data.classes {list(classes)}: no samples of those classes in {what}")
    return keep, new[keep]


class TensorData:
    """In-memory images (N, C, H, W) in [-1, 1] and labels (N,)."""

    def __init__(self, x: Tensor, y: Tensor, class_names: Sequence[str]):
        if x.dim() != 4 or y.shape != (x.shape[0],):
            raise ValueError(f"expected x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        self.x, self.y = x.float().contiguous(), y.long().contiguous()
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])

    def get_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[idx], self.y[idx]


def digits_dataset(classes: Sequence[int] | None, mode: str = "pretrain") -> TensorData:
    """sklearn digits (8×8, 1 channel); default classes 0-7 for pretrain and 8, 9 for transfer."""
    from kind_fast.train.digits import load_digits

    classes = list(classes) if classes is not None else DIGIT_DEFAULTS[mode]
    x, y = load_digits(classes)
    return TensorData(x, y, [str(c) for c in classes])


def unreadable_images(files: Sequence[Path], threads: int = 8) -> list[tuple[Path, str]]:
    """(file, reason) for each of ``files`` that PIL cannot open and verify (header; for PNG,
    every chunk's CRC: a truncated file too). Threads: the check is mostly file reads."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def check(path: Path) -> str | None:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            return f"{type(e).__name__}: {str(e)[:120]}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        reasons = list(pool.map(check, files))
    return [(f, r) for f, r in zip(files, reasons) if r is not None]


class ImageFolder:
    """``root/<class>/<image>``: classes are the sorted sub-folder names.

    Images are resized (bicubic, antialiased) so the short side is ``image_size``, centre-cropped
    and scaled to [-1, 1]; read with PIL through numpy. Every image is checked when the data set
    is built (PIL's ``verify``: the header, and for PNG every chunk's CRC), so an unreadable or
    truncated file stops the run before the model is built, with all such files named, instead of
    at the first batch that draws one.

    Why not torchvision's ImageFolder + CenterCrop/Resize: torchvision's wheels are built for one
    exact torch build. The CPU torch our CI installs (torch 2.13.0+cpu) has no matching
    torchvision on PyPI: PyPI's torchvision 0.28.0 fails to import beside it ("operator
    torchvision::nms does not exist"), and the matching +cpu wheel lives only on PyTorch's own
    index. A dependency that installs on some setups and breaks imports on others costs more
    than these forty lines of Pillow.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 64, channels: int = 3,
                 classes: Sequence[int] | None = None):
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise ImportError("reading an ImageFolder needs Pillow: pip install pillow "
                              "(or 'kind_fast[train]')") from None
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.path {self.root} is not a folder")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.image_size, self.channels = int(image_size), channels
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise ValueError(f"data.path {self.root} has no class sub-folders (expected root/<class>/<image>)")
        files, labels = [], []
        for c, name in enumerate(names):
            for f in sorted((self.root / name).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                    files.append(f)
                    labels.append(c)
        if not files:
            raise ValueError(f"data.path {self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        keep, new = _relabel(torch.tensor(labels), classes, len(names), str(self.root))
        self.files = [files[i] for i in keep.tolist()]
        self.labels = new
        bad = unreadable_images(self.files)
        if bad:
            listed = "; ".join(f"{f} ({why})" for f, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise ValueError(f"data.path {self.root}: {len(bad)} of {len(self.files)} images cannot be read: "
                             f"{listed}. Remove or replace them (nothing was trained)")
        self.class_names = [names[c] for c in classes] if classes is not None else names
        self.num_classes = len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> Tensor:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                w, h = im.size
                s = self.image_size / min(w, h)
                im = im.resize((max(self.image_size, round(w * s)), max(self.image_size, round(h * s))),
                               Image.Resampling.BICUBIC, reducing_gap=3.0)
                w, h = im.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)

    def __getitem__(self, i: int):
        return self.load(self.files[i]), int(self.labels[i])


class LatentShards:
    """Precomputed VAE latents in safetensors shards (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, classes: Sequence[int] | None = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"data.path {self.folder}: no index.json (write shards with scripts/encode_latents.py)")
        try:
            meta = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index} is not valid JSON: {e}") from None
        if meta.get("format") != LATENT_FORMAT:
            raise ValueError(f"{index}: not a kind_fast latent index (format {meta.get('format')!r})")
        self.meta = meta
        self.shape = tuple(int(s) for s in meta["shape"])
        self.scale_factor = float(meta.get("scale_factor", 1.0))
        self.shard_files = [self.folder / s["file"] for s in meta["shards"]]
        counts = [int(s["count"]) for s in meta["shards"]]
        labels = []
        for f, n in zip(self.shard_files, counts):
            if not f.is_file():
                raise FileNotFoundError(f"latent shard {f} listed in {index} is missing")
            with safe_open(str(f), framework="pt") as h:
                lab = h.get_tensor("labels")
                shp = h.get_slice("latents").get_shape()
            if lab.shape != (n,) or tuple(shp) != (n, *self.shape):
                raise ValueError(f"latent shard {f}: latents {tuple(shp)} / labels {tuple(lab.shape)} "
                                 f"do not match index.json ({n} × {self.shape})")
            labels.append(lab.long())
        self._starts = np.cumsum([0] + counts[:-1]).tolist()
        all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        names = list(meta.get("class_names") or [str(i) for i in range(int(all_labels.max()) + 1)])
        keep, new = _relabel(all_labels, classes, len(names), str(self.folder))
        self._rows, self.labels = keep, new
        self.class_names = [names[c] for c in classes] if classes is not None else names
        self.num_classes = len(self.class_names)
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.shape  # type: ignore[return-value]

    def __len__(self) -> int:
        return self._rows.shape[0]

    def _handle(self, shard: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a DataLoader worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(self.shard_files[shard]), framework="pt")
        return h

    def __getitem__(self, i: int):
        row = int(self._rows[i])
        shard = bisect.bisect_right(self._starts, row) - 1
        j = row - self._starts[shard]
        x = self._handle(shard).get_slice("latents")[j:j + 1][0]
        return x.float(), int(self.labels[i])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d


def write_latent_shards(folder: str | os.PathLike, chunks, *, class_names: Sequence[str],
                        scale_factor: float, shard_size: int = 10000, extra: dict | None = None) -> Path:
    """Write (latents (n, C, H, W), labels (n,)) chunks as shards of ``shard_size`` + index.json."""
    from safetensors.torch import save

    from kind_fast.atomic import atomic_write_bytes, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, buf_x, buf_y, shape = [], [], [], None

    def flush():
        if not buf_x:
            return
        x, y = torch.cat(buf_x), torch.cat(buf_y).long()
        name = f"shard_{len(shards):05d}.safetensors"
        atomic_write_bytes(save({"latents": x.contiguous(), "labels": y.contiguous()}), folder / name)
        shards.append({"file": name, "count": int(x.shape[0])})
        buf_x.clear()
        buf_y.clear()

    pending = 0
    for x, y in chunks:
        if x.dim() != 4 or y.shape != (x.shape[0],):
            raise ValueError(f"latent chunks must be (n, C, H, W) and (n,), got {tuple(x.shape)}, {tuple(y.shape)}")
        shape = shape or tuple(x.shape[1:])
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"latent shape changed from {shape} to {tuple(x.shape[1:])}")
        while x.shape[0]:
            take = min(shard_size - pending, x.shape[0])
            buf_x.append(x[:take].cpu())
            buf_y.append(y[:take].cpu())
            x, y, pending = x[take:], y[take:], pending + take
            if pending == shard_size:
                flush()
                pending = 0
    flush()
    if shape is None:
        raise ValueError("no latents were written")
    meta = {"format": LATENT_FORMAT, "version": 1, "shape": list(shape), "scale_factor": scale_factor,
            "class_names": list(class_names), "shards": shards, **(extra or {})}
    atomic_write_text(json.dumps(meta, indent=2) + "\n", folder / "index.json")
    return folder


def build_dataset(cfg, mode: str):
    """The data set a ``DataConfig`` describes (``mode`` picks the digits default classes)."""
    if cfg.source == "digits":
        return digits_dataset(cfg.classes, mode)
    if cfg.source == "imagefolder":
        return ImageFolder(cfg.path, image_size=cfg.image_size or 64, channels=cfg.channels, classes=cfg.classes)
    if cfg.source == "latents":
        return LatentShards(cfg.path, classes=cfg.classes)
    raise ValueError(f"data.source must be digits, imagefolder or latents, got {cfg.source!r}")
