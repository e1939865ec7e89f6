"""The class gate: which tailors each class switches on.

A gate is a table G over (classes + null) × N_T. Row c says how strongly class c uses each
tailor; the last row (index ``num_classes``) is the null class that classifier-free guidance
feeds in. One gate is shared by every KIND layer of a model (as in KIND), so it is changed in
one place.

For the kernels a gate compiles to ``idx`` (C+1, K) int32, the active tailor ids of each row
in increasing order, and ``val`` (C+1, K) float32, their gate values; rows with fewer than K
active tailors are padded with id 0 and value 0 (docs/design.md §2).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kind_fast.ops.labels import check_labels  # noqa: F401 - re-exported: the gate's labels check

NULL_POLICIES = ("off", "all", "class")
GATE_KINDS = ("balanced", "block", "random_k", "dense", "all_on")
# The gate KIND-DiT, kindify, ``kind-fast convert`` and the trainer build when none is named. Chosen
# by measurement (docs/design.md §1.4): balanced distinct tailor sets against block and random_k.
DEFAULT_GATE = "balanced"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_null(null: str) -> str:
    if null not in NULL_POLICIES:
        raise ValueError(f"null must be one of {NULL_POLICIES}, got {null!r}")
    return null


def _set_rows(num_classes: int, tailor_rank: int, active: int, null: str) -> int:
    """Check the sizes of a gate whose classes switch on sets of ``active`` tailors; the rows
    that get a set (the classes, and the null class with ``null="class"``)."""
    _check_int("num_classes", num_classes, 1)
    _check_int("tailor_rank", tailor_rank, 1)
    _check_int("active", active, 1)
    if active > tailor_rank:
        raise ValueError(f"active ({active}) must be <= tailor_rank ({tailor_rank})")
    _check_null(null)
    return num_classes + (1 if null == "class" else 0)


def _with_null_row(sets: Tensor, num_classes: int, null: str) -> Tensor:
    """The (num_classes + 1, tailor_rank) table of ``sets`` (one row per ``_set_rows`` row): the
    null row is its own set ("class"), every tailor ("all") or none ("off")."""
    table = torch.zeros(num_classes + 1, sets.shape[1], device="cpu")
    table[: sets.shape[0]] = sets
    if null == "all":
        table[num_classes] = 1.0
    return table


class ClassGate(nn.Module):
    """Class gate shared by all KIND layers of a model; build it with a classmethod builder.

    Args:
        table: (num_classes + 1, tailor_rank) gate values; the last row is the null class.
        support: optional bool mask of the same shape: which entries are active. Defaults to
            the nonzero entries of ``table``. It is fixed at construction (a trainable gate
            changes values, not which tailors a class uses).
        trainable: make the table an ``nn.Parameter`` (soft gates); gradients flow to it
            through the compiled ``val``.
        kind, null, config: bookkeeping for save/load and repr.
    """

    def __init__(
        self,
        table: Tensor,
        *,
        support: Tensor | None = None,
        trainable: bool = False,
        kind: str = "dense",
        null: str = "off",
        config: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(table, Tensor):
            raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
        if table.dim() != 2 or table.shape[0] < 2 or table.shape[1] < 1:
            raise ValueError(
                "table must be 2-D (num_classes + 1, tailor_rank) with at least one class, "
                f"got shape {tuple(table.shape)}"
            )
        if not table.is_floating_point():
            raise TypeError(f"table must be a floating-point tensor, got {table.dtype}")
        # Gates are built on the CPU (even under a torch.device context) and move with the model.
        table = table.detach().to("cpu", torch.float32).clone()
        if support is None:
            support = table != 0
        elif support.shape != table.shape:
            raise ValueError(f"support shape {tuple(support.shape)} != table shape {tuple(table.shape)}")
        support = support.to(torch.bool).cpu()
        idx, mask = self._compile_support(support)
        if trainable:
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table)
        self.register_buffer("idx", idx)
        self.register_buffer("mask", mask)
        # construction values, kept off the module's tensors so reset_parameters() can restore
        # them after Module.to_empty (meta-device construction)
        self._init = (table.clone(), idx.clone(), mask.clone())
        self.trainable = trainable
        self.kind = kind
        self.null = null
        self.config = dict(config or {})
        # Labels of the current batch, set by kindify's forward pre-hook or by KindDiT.forward;
        # every layer that is not given labels= reads them here. A tensor: no host sync.
        self.labels: Tensor | None = None
        self._val_cache: dict[Any, Tensor] = {}

    @staticmethod
    def _compile_support(support: Tensor) -> tuple[Tensor, Tensor]:
        """(idx int32 (C+1, K), mask float32 (C+1, K)) of a bool support, K = max row count."""
        k = max(int(support.sum(1).max()), 1)
        # Active ids in increasing order, padded with 0: a stable sort of ~support puts the
        # active columns first in their original order.
        order = torch.sort((~support).to(torch.int8), dim=1, stable=True).indices[:, :k]
        mask = torch.gather(support, 1, order)
        idx = torch.where(mask, order, torch.zeros_like(order)).to(torch.int32)
        return idx, mask.to(torch.float32)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Restore the table (and idx/mask) the gate was built with."""
        for dst, src in zip((self.table, self.idx, self.mask), self._init):
            dst.copy_(src)
        self._val_cache = {}

    # ------------------------------------------------------------------ builders
    @classmethod
    def block(cls, num_classes: int, tailor_rank: int, active: int, *, null: str = "off") -> ClassGate:
        """Class c switches on block c mod (tailor_rank // active) of ``active`` contiguous tailors."""
        rows = _set_rows(num_classes, tailor_rank, active, null)
        n_blocks = tailor_rank // active
        sets = torch.zeros(rows, tailor_rank, device="cpu")
        for c in range(rows):
            b = c % n_blocks
            sets[c, b * active : (b + 1) * active] = 1.0
        table = _with_null_row(sets, num_classes, null)
        cfg = dict(num_classes=num_classes, tailor_rank=tailor_rank, active=active, null=null)
        return cls(table, kind="block", null=null, config=cfg)

    @classmethod
    def balanced(
        cls, num_classes: int, tailor_rank: int, active: int, *, seed: int = 0, null: str = "off"
    ) -> ClassGate:
        """Class-specific tailor sets: every class switches on its own set of ``active`` tailors.

        The sets are pairwise distinct, each tailor is switched on by ⌊C·K/N_T⌋ or ⌈C·K/N_T⌉
        classes (C classes, K = ``active``, N_T = ``tailor_rank``), and the overlap of two sets
        is kept small (``balanced_sets``: swaps that keep every tailor's use count lower the sum
        of squared pairwise overlaps). Deterministic in ``seed`` on every platform and version
        (its own integer PRNG). With ``null="class"`` the null class is one more class of the
        design. Distinct sets exist only for C ≤ binomial(N_T, K); beyond that (tiny N_T, many
        classes) sets repeat, as evenly as the rest of the design allows, with a warning.
        """
        rows = _set_rows(num_classes, tailor_rank, active, null)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        table = _with_null_row(balanced_sets(rows, tailor_rank, active, seed=seed).float(), num_classes, null)
        cfg = dict(num_classes=num_classes, tailor_rank=tailor_rank, active=active, null=null, seed=seed)
        return cls(table, kind="balanced", null=null, config=cfg)

    @classmethod
    def random_k(
        cls, num_classes: int, tailor_rank: int, active: int, *, seed: int = 0, null: str = "off"
    ) -> ClassGate:
        """Each class switches on a seeded random subset of ``active`` tailors."""
        rows = _set_rows(num_classes, tailor_rank, active, null)
        gen = torch.Generator().manual_seed(int(seed))
        sets = torch.zeros(rows, tailor_rank, device="cpu")
        for c in range(rows):
            sets[c, torch.randperm(tailor_rank, generator=gen, device="cpu")[:active]] = 1.0
        table = _with_null_row(sets, num_classes, null)
        cfg = dict(num_classes=num_classes, tailor_rank=tailor_rank, active=active, null=null, seed=seed)
        return cls(table, kind="random_k", null=null, config=cfg)

    @classmethod
    def dense(
        cls, table: Tensor, *, null_row: Tensor | None = None, trainable: bool = False
    ) -> ClassGate:
        """Any real-valued table (e.g. soft gates) of shape (num_classes, tailor_rank).

        The null row is ``null_row`` if given, else all zeros (learngenes only). A table of
        shape (num_classes + 1, tailor_rank) may be passed with ``null_row=None`` meaning its
        last row already is the null row: pass it through ``ClassGate(table)`` instead.
        With ``trainable=True`` every entry is active and learns.
        """
        if not isinstance(table, Tensor) or table.dim() != 2:
            raise TypeError("table must be a 2-D tensor (num_classes, tailor_rank)")
        if null_row is None:
            null_row = torch.zeros(table.shape[1], dtype=table.dtype, device="cpu")
        if null_row.shape != (table.shape[1],):
            raise ValueError(f"null_row must have shape ({table.shape[1]},), got {tuple(null_row.shape)}")
        full = torch.cat([table.detach().cpu().float(), null_row.detach().cpu().float()[None]], 0)
        support = torch.ones_like(full, dtype=torch.bool) if trainable else None
        cfg = dict(num_classes=table.shape[0], tailor_rank=table.shape[1], null="table")
        return cls(full, support=support, trainable=trainable, kind="dense", null="table", config=cfg)

    @classmethod
    def all_on(cls, num_classes: int, tailor_rank: int, *, null: str = "all") -> ClassGate:
        """Every class (and by default the null class) switches on every tailor.

        With this gate a KIND layer equals the dense layer it was converted from for every
        label, which is what ``from_linear``/``kindify`` exactness is checked against.
        """
        _check_int("num_classes", num_classes, 1)
        _check_int("tailor_rank", tailor_rank, 1)
        _check_null(null)
        table = torch.ones(num_classes + 1, tailor_rank, device="cpu")
        if null == "off":
            table[num_classes] = 0.0
        cfg = dict(num_classes=num_classes, tailor_rank=tailor_rank, null=null)
        return cls(table, kind="all_on", null=null, config=cfg)

    @classmethod
    def from_config(cls, config: dict, table: Tensor | None = None) -> ClassGate:
        """Rebuild a gate from ``to_config()`` (and its saved table for dense gates)."""
        kind = config.get("kind")
        args = {k: v for k, v in config.items() if k not in ("kind", "trainable")}
        if kind == "balanced":
            gate = cls.balanced(**args)
        elif kind == "block":
            gate = cls.block(**args)
        elif kind == "random_k":
            gate = cls.random_k(**args)
        elif kind == "all_on":
            gate = cls.all_on(**args)
        elif kind == "dense":
            if table is None:
                raise ValueError("a dense gate needs its saved table to be rebuilt")
            support = torch.ones_like(table, dtype=torch.bool) if config.get("trainable") else None
            return cls(table, support=support, trainable=bool(config.get("trainable")), kind="dense",
                       null="table", config=args)
        else:
            raise ValueError(f"unknown gate kind {kind!r}; expected one of {GATE_KINDS}")
        if table is not None:
            if table.shape != gate.table.shape:
                raise ValueError(f"saved gate table {tuple(table.shape)} != config {tuple(gate.table.shape)}")
            if not torch.equal(table.float().cpu(), gate.table.cpu()):
                raise ValueError(f"saved gate table does not match the {kind} gate its config describes")
        return gate

    def to_config(self) -> dict:
        return dict(self.config, kind=self.kind, trainable=self.trainable)

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of real classes C; the null class id is C."""
        return self.table.shape[0] - 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def tailor_rank(self) -> int:
        return self.table.shape[1]

    @property
    def active(self) -> int:
        """K: active tailors per row in the compiled form (max over rows)."""
        return self.idx.shape[1]

    def row(self, class_id: int) -> Tensor:
        """Dense gate row (tailor_rank,) of one class (``num_classes`` for the null class)."""
        if isinstance(class_id, bool) or not isinstance(class_id, int):
            raise TypeError(f"class_id must be an int, got {type(class_id).__name__}")
        if not 0 <= class_id <= self.num_classes:
            raise ValueError(f"class_id must be in [0, {self.num_classes}] (null = {self.num_classes}), got {class_id}")
        return self.table[class_id] * self.support_mask()[class_id]

    def support_mask(self) -> Tensor:
        """(C+1, N_T) float mask of the active entries. A scatter-add: padding slots repeat id 0
        with mask 0, and a plain scatter with repeated ids may keep the padding's 0 over an
        active tailor 0."""
        m = torch.zeros_like(self.table)
        return m.scatter_add(1, self.idx.long(), self.mask.to(m.dtype))

    # ------------------------------------------------------------------ serving (path M3)
    # Classes declared by ``serving``; the class attribute is the default (also for gates
    # unpickled from older versions).
    served: tuple[int, ...] | None = None

    @contextmanager
    def serving(self, classes: Iterable[int]) -> Iterator[ClassGate]:
        """Declare the classes of the labels every KIND layer will see in the block, e.g. a
        sampling loop's classes and the null class. The layers then merge one dense weight
        per declared class once (path M3, cached per parameter version) and run a segmented
        GEMM where the cost model says so. Labels outside the declared classes are an error
        (read on the host for CPU labels, asserted asynchronously on CUDA). Nests: the outer
        declaration comes back at exit.

        The block is also a ``kind_fast.weight_cache()`` scope (merged weights are cached only
        there): inside it, write parameters only through in-place ops or the optimizer, not
        through ``.data``, or call ``kind_fast.nn.caching.invalidate()`` after such a write."""
        served = []
        for c in classes:
            c = int(c)
            if not 0 <= c <= self.num_classes:
                raise ValueError(f"served class {c} is not in [0, {self.num_classes}] (null = {self.num_classes})")
            served.append(c)
        if not served:
            raise ValueError("serving needs at least one class")
        from kind_fast.nn.caching import weight_cache

        previous = self.served
        self.served = tuple(sorted(set(served)))
        try:
            with weight_cache():
                yield self
        finally:
            self.served = previous

    # ------------------------------------------------------------------ compiled form
    def compiled(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """(idx int32 (C+1, K), val float32 (C+1, K)) on ``device`` for the kernels.

        ``val`` carries gradients to ``table`` when the gate is trainable. For a fixed gate it
        is cached per device and table version, so layers pay nothing per forward.
        """
        device = self.table.device if device is None else torch.device(device)
        if self.trainable:
            if self.table.device != device:
                raise ValueError(
                    f"trainable gate lives on {self.table.device} but the input is on {device}: "
                    "register the gate in your model (kindify does) or move it with gate.to(...)"
                )
            return self.idx, self.table.gather(1, self.idx.long()) * self.mask
        if torch.compiler.is_compiling():
            val = self.table.gather(1, self.idx.long()) * self.mask
            return self.idx.to(device), val.to(device)
        # a table made under torch.inference_mode has no version counter: never cached then
        version = None if self.table.is_inference() else self.table._version
        key = (device, version, self.table.data_ptr())
        hit = self._val_cache.get(key) if version is not None else None
        if hit is not None and hit[1].is_inference() and not torch.is_inference_mode_enabled():
            hit = None  # made under torch.inference_mode: autograd may not save it
        if hit is None:
            with torch.no_grad():
                val = (self.table.gather(1, self.idx.long()) * self.mask).to(device)
                hit = (self.idx.to(device), val)
            # one entry per device: a stale version of the same device is dropped
            self._val_cache = {k: v for k, v in self._val_cache.items() if k[0] != device}
            self._val_cache[key] = hit
        return hit

    def _apply(self, fn, recurse=True):
        self._val_cache = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, num_classes={self.num_classes}, tailor_rank={self.tailor_rank}, "
            f"active={self.active}, null={self.null}, trainable={self.trainable}"
        )


class _SplitMix64:
    """SplitMix64 (Steele, Lea, Flood 2014): a tiny integer PRNG whose stream depends on the seed
    only, never on a library's version or platform, so a gate rebuilt from its saved config years
    later equals the saved table."""

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = int(seed) & self._MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """An int in [0, n) (the modulo bias, < n / 2^64, does not matter here)."""
        return self.next() % n

    def permutation(self, n: int) -> list[int]:
        """A Fisher-Yates shuffle of range(n)."""
        p = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.below(i + 1)
            p[i], p[j] = p[j], p[i]
        return p


def balanced_sets(rows: int, n: int, k: int, *, seed: int = 0) -> Tensor:
    """A bool (rows, n) table: ``rows`` distinct sets of ``k`` of ``n`` items, each item in
    ⌊rows·k/n⌋ or ⌈rows·k/n⌉ sets, with small pairwise overlaps. Deterministic in ``seed``.

    1. Balance. Rows take their items in turn from a stream of seeded permutations of range(n),
       skipping an item the row already holds (it stays first in line for the next row). Each
       whole permutation uses every item once and the last, partial one each item at most once,
       so use counts differ by at most one; rows drawn from one permutation are disjoint.
    2. Overlap. The overlap of rows c and d is O_cd = |S_c ∩ S_d|. Its sum over pairs is fixed
       by the use counts (Σ_j binom(n_j, 2)): what can be done is to trim its tail. A local
       search swaps item a of row c for item b of row e (a ∉ S_e, b ∉ S_c: use counts stay) and
       keeps a swap when it lowers Σ_{c<d} O_cd⁴. Proposals target overlaps: c at random, a an
       item c shares with its most-overlapping row, e and b at random. min(50·rows, 3000)
       proposals, then more while two rows are equal (overlap k, the largest term).
    3. Distinctness. For rows ≤ binomial(n, k), rows still equal after the search are an error
       (not seen in practice). For more rows than distinct sets exist, sets must repeat: the
       table keeps balance and the search's overlaps, and a warning says so.
    """
    if rows > math.comb(n, k):
        import warnings

        warnings.warn(f"{rows} classes but only binomial({n}, {k}) = {math.comb(n, k)} distinct sets of {k} out of "
                      f"{n} tailors: some classes share a tailor set (use more tailors for class-specific ones)",
                      stacklevel=3)
    return torch.from_numpy(_balanced_sets(rows, n, k, int(seed)).copy())  # the cached array stays read-only


@functools.lru_cache(maxsize=32)
def _balanced_sets(rows: int, n: int, k: int, seed: int):
    import numpy as np

    rng = _SplitMix64(seed * 0x2545F4914F6CDD1D + 0x1F123BB5)
    g = np.zeros((rows, n), dtype=np.int64)
    stream: list[int] = []
    for r in range(rows):
        for _ in range(k):
            if not stream:
                stream = rng.permutation(n)
            # an item the row lacks exists: the row holds < k <= n items, at most the ones this
            # permutation already gave it plus some of the previous one's tail
            i = next(i for i, t in enumerate(stream) if not g[r, t])
            g[r, stream.pop(i)] = 1
    if rows > 2 and k < n:
        overlap = g @ g.T
        np.fill_diagonal(overlap, 0)
        budget, extra = min(50 * rows, 3000), 200 * rows
        it = 0
        while it < budget or (it < budget + extra and rows <= math.comb(n, k) and (overlap == k).any()):
            it += 1
            c = rng.below(rows)
            d = int(np.argmax(overlap[c]))
            common = np.flatnonzero(g[c] & g[d])
            e = rng.below(rows - 1)
            e += e >= c
            if common.size == 0:
                continue
            a = int(common[rng.below(common.size)])
            only_e = np.flatnonzero(g[e] > g[c])
            if g[e, a] or only_e.size == 0:
                continue
            b = int(only_e[rng.below(only_e.size)])
            delta = g[:, b] - g[:, a]  # overlap with row x: row c gains delta[x], row e loses it
            delta[c] = delta[e] = 0
            oc, oe = overlap[c], overlap[e]
            if ((oc + delta) ** 4 - oc ** 4 + (oe - delta) ** 4 - oe ** 4).sum() < 0:
                g[c, a], g[c, b], g[e, b], g[e, a] = 0, 1, 0, 1
                overlap[c] += delta
                overlap[e] -= delta
                overlap[:, c], overlap[:, e] = overlap[c], overlap[e]
    out = g.astype(bool)
    if rows <= math.comb(n, k) and len({row.tobytes() for row in out}) != rows:
        raise ValueError(f"could not make {rows} distinct sets of {k} out of {n} tailors with balanced use; "
                         "use more tailors or another gate")
    out.setflags(write=False)
    return out


def default_gate(num_classes: int, tailor_rank: int = 96, active: int | None = None, *, seed: int = 0,
                 null: str = "off") -> ClassGate:
    """The gate KIND-DiT, kindify, ``kind-fast convert`` and the trainer use when none is named:
    ``DEFAULT_GATE`` (docs/design.md §1.4); ``active`` defaults to a third of the tailors (32 of
    the default 96)."""
    active = max(1, tailor_rank // 3) if active is None else active
    if DEFAULT_GATE == "balanced":
        return ClassGate.balanced(num_classes, tailor_rank, active, seed=seed, null=null)
    if DEFAULT_GATE == "random_k":
        return ClassGate.random_k(num_classes, tailor_rank, active, seed=seed, null=null)
    return ClassGate.block(num_classes, tailor_rank, active, null=null)
