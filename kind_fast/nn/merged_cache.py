"""A bounded cache of merged per-class weights (path M3) for one KIND layer.

Sampling evaluates the same classes at every step (CFG: {c, null}), so FastKindLinear merges
W_c = W_G + U_Tᵀ diag(σ_T ⊙ g_c) V_T once per (served class set, parameter version) and keeps
the stacked weights (S, out, in) with the class → slot table. Entries are evicted least recently
used first; ``capacity`` bounds the number of class weights held (the sum of S over entries),
``KIND_FAST_M3_CACHE`` sets the default (8), 0 turns caching off.

Never stale: an entry is valid only for the exact parameter and gate tensors it was built from,
identified by a ``Token``: each tensor's version counter (every in-place write through
autograd-aware ops bumps it: optimizer steps, ``load_state_dict``, ``copy_`` under no_grad or
inference mode) and data pointer; the entry pins the storages it was built from, so a
``p.data = new`` swap (which keeps the version counter), a ``to()`` or a freed-and-reused address
can never match. Writes that bypass version
counters, in-place ops on ``p.data`` or on an inference tensor, cannot be seen without reading
the values; tensors that have no version counter (inference tensors) are never cached, and
``clear()`` drops everything (FastKindLinear.clear_merged_cache()).

A class set enters the cache on its second use with the same parameters (a single evaluation
does not pay for a merge it never reuses) or at once when the caller declares it (a sampling
loop, ``ClassGate.serving``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable

from torch import Tensor

__all__ = ["MergedWeightCache", "Token", "tensor_token", "tokens", "DEFAULT_CAPACITY"]


def _default_capacity() -> int:
    raw = os.environ.get("KIND_FAST_M3_CACHE", "8")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"KIND_FAST_M3_CACHE must be an int >= 0, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"KIND_FAST_M3_CACHE must be an int >= 0, got {value}")
    return value


DEFAULT_CAPACITY = _default_capacity()


class Token:
    """What identifies the current contents of some tensors: per tensor its version counter, data
    pointer, shape and strides. ``keep()`` pins their storages (the cache entry holds them), so
    while an entry lives no other tensor can get one of those addresses: a ``p.data = new`` swap
    (which keeps the version counter) always changes the token."""

    __slots__ = ("key", "tensors")

    def __init__(self, key: tuple, tensors: tuple):
        self.key = key
        self.tensors = tensors

    def keep(self) -> tuple:
        return tuple(t.detach() for t in self.tensors if t is not None)


def tensor_token(t: Tensor | None) -> tuple | None:
    """Comparable identity of ``t``'s current contents; None for an inference tensor (no version
    counter: never cached)."""
    if t is None:
        return ()
    if t.is_inference():
        return None
    return (t._version, t.data_ptr(), t.shape, t.stride(), t.dtype)


def tokens(tensors: Iterable[Tensor | None]) -> Token | None:
    """The Token of ``tensors``, or None when one of them cannot be tracked."""
    tensors = tuple(tensors)
    key = []
    for t in tensors:
        tok = tensor_token(t)
        if tok is None:
            return None
        key.append(tok)
    return Token(tuple(key), tensors)


class MergedWeightCache:
    """LRU of (weights (S, out, in), class_slot (C+1,)) per (class set, dtype, device), valid for
    one parameter token. ``capacity``: most class weights held over all entries (0: off)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = DEFAULT_CAPACITY if capacity is None else capacity
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (token key, pinned, W, slots)
        self._seen: OrderedDict[tuple, tuple] = OrderedDict()
        self.hits = self.misses = self.builds = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"capacity must be an int >= 0 (class weights held), got {value!r}")
        self._capacity = value
        if hasattr(self, "_entries"):
            self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    def held(self) -> int:
        """Class weights held over all entries."""
        return sum(e[2].shape[0] for e in self._entries.values())

    def fits(self, num_classes: int) -> bool:
        return 0 < num_classes <= self._capacity

    def get(self, key: tuple, token: Token | None) -> tuple[Tensor, Tensor] | None:
        """(weights, class_slot) of ``key`` if built from the tensors ``token`` identifies."""
        entry = self._entries.get(key)
        if entry is None or token is None or entry[0] != token.key:
            if entry is not None:  # stale: drop it (and the storages it pins) now
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[2], entry[3]

    def admit(self, key: tuple, token: Token | None, declared: bool) -> bool:
        """Whether a miss of ``key`` should be built into the cache now: declared class sets at
        once, others on their second use with the same parameters."""
        if token is None or not self.fits(len(key[0])):
            return False
        if declared or self._seen.get(key) == token.key:
            return True
        self._seen[key] = token.key
        self._seen.move_to_end(key)
        while len(self._seen) > 16:
            self._seen.popitem(last=False)
        return False

    def put(self, key: tuple, token: Token, weights: Tensor, class_slot: Tensor) -> None:
        if not self.fits(weights.shape[0]):
            return
        self._entries.pop(key, None)
        self._seen.pop(key, None)
        self._entries[key] = (token.key, token.keep(), weights, class_slot)
        self.builds += 1
        self._evict()

    def _evict(self) -> None:
        while self._entries and self.held() > self._capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self._seen.clear()

    # copies (EMA's deepcopy, pickling) start empty: entries belong to the original's tensors
    def __deepcopy__(self, memo) -> MergedWeightCache:
        return MergedWeightCache(self._capacity)

    def __getstate__(self) -> dict:
        return {"capacity": self._capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("capacity"))

    def __repr__(self) -> str:
        return (f"MergedWeightCache(capacity={self._capacity}, entries={len(self)}, held={self.held()}, "
                f"hits={self.hits}, misses={self.misses}, builds={self.builds})")
