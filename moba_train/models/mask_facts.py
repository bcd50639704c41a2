"""Facts read back from a forward's masks, once per forward instead of once per layer.

transformers builds a forward's padding mask (and position ids) once and hands the same tensors to every
layer. Some facts about them are needed on the host: each row's left padding, whether appended tokens are
real, where the unpadded documents start and how long the longest is. Each read of a device tensor waits for
the GPU; done in every layer, that was 30 waits a decoding step for SmolLM2, and a shared GPU makes each
wait longer. `once_per_mask` keeps a fact for as long as the tensors it was read from live unchanged.
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, TypeVar

import torch

T = TypeVar("T")
# (id of each tensor) -> (weakrefs to them, their versions, facts)
_facts: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], tuple[int, ...], dict]] = {}


def once_per_mask(mask: torch.Tensor, fact: Hashable, compute: Callable[[], T],
                  *also: torch.Tensor | None) -> T:
    """compute() the first time `fact` is asked of `mask` (and of the tensors in `also`, None for absent ones);
    again if any of them was written in place since."""
    tensors = (mask, *(t for t in also if t is not None))
    key = tuple(id(t) for t in tensors)
    versions = tuple(t._version for t in tensors)
    entry = _facts.get(key)
    if entry is None or any(ref() is not t for ref, t in zip(entry[0], tensors)) or entry[1] != versions:
        def forget(_, key=key):
            if key in _facts and any(ref() is None for ref in _facts[key][0]):
                del _facts[key]
        entry = (tuple(weakref.ref(t, forget) for t in tensors), versions, {})
        _facts[key] = entry
    facts = entry[2]
    if fact not in facts:
        facts[fact] = compute()
    return facts[fact]


__all__ = ["once_per_mask"]
