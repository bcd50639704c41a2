"""Block means of a KV cache for sparse MoBA decoding, kept up to date as the cache grows.

MoBA's gate scores a query against the mean key of each complete earlier block. Recomputing the
means over the whole cache at every decoding step would read the whole cache, as dense attention
does; instead each layer keeps, per KV cache, the means of the blocks completed so far
(`BlockMeans`) and adds a block's mean once, in the step that appends its last token.

The state lives on the attention module, keyed weakly by the transformers cache object, so a
generation's state goes away with its cache. Attention functions never see the cache, so a forward
pre-hook (`track_kv_caches`, added by `attach_plan`) records which cache each call uses, read from
the argument that `hf_compat.cache_argument` found in the module's signature. The hook
also drops a state whose cache was changed other than by appending (beam search's reorder, crop,
reset, offload): the cache layer's key tensor is then no longer the one the state last saw, and the
state is rebuilt from the cache, one pass over it, at its next use.
"""

from __future__ import annotations

import logging
import weakref

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from ..ops.moba import block_means, build_layout
from .context import attention_context
from .hf_compat import cache_argument

log = logging.getLogger(__name__)

# Block means are computed this many fp32 key elements at a time (a whole prefilled cache at once
# would need an fp32 copy of it).
MEANS_CHUNK_ELEMENTS = 1 << 24

# Caches whose state had to be rebuilt, so that the warning is given once per cache, not per layer and step.
_rebuilt_caches: weakref.WeakSet = weakref.WeakSet()


def _left_padding(key_valid: torch.Tensor | None, batch: int, slots: int) -> list[int]:
    """Leading padding slots of each row; refuses padding anywhere but on the left."""
    if key_valid is None:
        return [0] * batch
    real = key_valid.sum(-1)
    pad = slots - real
    expected = torch.arange(slots, device=key_valid.device)[None, :] >= pad[:, None]
    if not torch.equal(key_valid, expected):
        raise ValueError("sparse MoBA decoding (attention plan decode: moba) needs padding on the left of each row "
                         "only (tokenizer padding_side='left'); pad on the left, or set decode: full")
    return pad.tolist()


class BlockMeans:
    """fp32 mean key of every complete block of each row of one layer's KV cache.

    Row b may start with pad[b] padding slots; its block j covers the cache slots
    pad[b] + j*block_size .. pad[b] + (j+1)*block_size - 1. `means` is [B, Hkv, capacity, D]; the
    first complete[b] entries of row b are valid. Means are computed by the operator's own
    `block_means`, so decoding selects the blocks that the operator selects for the same sequence.
    """

    def __init__(self, block_size: int, centroids: str = "reference"):
        self.block_size = block_size
        self.centroids = centroids
        self.slots = 0                     # cache slots accounted for
        self.pad: list[int] = []
        self.pad_slots: torch.Tensor | None = None   # [B] int64 on the keys' device
        self.complete: list[int] = []
        self.means: torch.Tensor | None = None
        self.seen_keys = None              # weakref to the cache layer's key tensor after the last update

    @property
    def max_complete(self) -> int:
        return max(self.complete, default=0)

    def update(self, key: torch.Tensor, key_valid: torch.Tensor | None) -> None:
        """Account for the slots appended to the cache since the last call; add the blocks they complete.

        key [B, Hkv, K, D] is the whole cache; key_valid [B, K] (True = real token) or None.
        """
        B, Hkv, K, D = key.shape
        if self.means is None:
            self.pad = _left_padding(key_valid, B, K)
            self.pad_slots = torch.tensor(self.pad, dtype=torch.int64, device=key.device)
            self.complete = [0] * B
            self.means = torch.zeros(B, Hkv, 0, D, dtype=torch.float32, device=key.device)
        elif B != len(self.pad) or K < self.slots:
            raise RuntimeError(f"block means cover {self.slots} slots of {len(self.pad)} rows, but the cache has "
                               f"{K} slots of {B} rows: it was changed other than by appending")
        elif key_valid is not None and K > self.slots and not bool(key_valid[:, self.slots:].all()):
            raise ValueError("sparse MoBA decoding (attention plan decode: moba) needs every appended token to be "
                             "real (padding on the left of the prompt only); set decode: full otherwise")
        bs = self.block_size
        for b in range(B):
            done = max(K - self.pad[b], 0) // bs
            if done > self.complete[b]:
                self._reserve(done)
                self._add_blocks(key, b, self.complete[b], done)
                self.complete[b] = done
        self.slots = K

    def _reserve(self, blocks: int) -> None:
        capacity = self.means.shape[2]
        if blocks > capacity:   # grow geometrically: amortised O(1) per block
            grown = self.means.new_zeros(*self.means.shape[:2], max(blocks, 2 * capacity, 16), self.means.shape[3])
            grown[:, :, :capacity] = self.means
            self.means = grown

    def _add_blocks(self, key: torch.Tensor, row: int, first: int, last: int) -> None:
        """Means of blocks first..last-1 of `row`, a chunk of blocks at a time."""
        bs, start = self.block_size, self.pad[row]
        Hkv, D = key.shape[1], key.shape[3]
        per_chunk = max(1, MEANS_CHUNK_ELEMENTS // (bs * Hkv * D))
        for lo in range(first, last, per_chunk):
            hi = min(last, lo + per_chunk)
            tokens = key[row, :, start + lo * bs:start + hi * bs].transpose(0, 1)      # [n*bs, Hkv, D]
            layout = build_layout([0, (hi - lo) * bs], bs, key.device)
            self.means[row, :, lo:hi] = block_means(tokens, layout, self.centroids).transpose(0, 1)


class KVCacheStates:
    """One attention layer's `BlockMeans` per KV cache object, and the cache of the forward in progress."""

    def __init__(self, module: torch.nn.Module):
        self.by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.current = None                # weakref to the cache of the forward in progress, or None
        self.argument = cache_argument(module)   # raises if the module takes no cache argument we know
        self.last_call_keywords: list[str] = []  # for the error when a decoding call brought no cache


def _cache_layer(cache, layer_idx: int):
    layers = getattr(cache, "layers", None)
    return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None


def _cache_layer_keys(cache, layer_idx: int) -> torch.Tensor | None:
    return getattr(_cache_layer(cache, layer_idx), "keys", None)


def _note_cache(module: torch.nn.Module, args, kwargs) -> None:
    """Forward pre-hook: remember this call's cache; forget its block means if the cache was changed meanwhile."""
    states: KVCacheStates = attention_context(module).kv_caches
    _, cache = states.argument.read(args, kwargs)
    states.last_call_keywords = sorted(kwargs)
    if isinstance(_cache_layer(cache, module.layer_idx), StaticLayer):
        # Its keys are the whole preallocated buffer, not the tokens so far: attention would see empty slots.
        raise ValueError(f"moba-train's attention does not support static KV caches ({type(cache).__name__}); "
                         f"use the default DynamicCache (no cache_implementation in generate())")
    states.current = weakref.ref(cache) if cache is not None else None
    state = states.by_cache.get(cache) if cache is not None else None
    if state is not None:
        seen = state.seen_keys() if state.seen_keys is not None else None
        if seen is None or _cache_layer_keys(cache, module.layer_idx) is not seen:
            del states.by_cache[cache]
            if cache not in _rebuilt_caches:
                _rebuilt_caches.add(cache)
                log.warning("the KV cache was changed other than by appending (beam search, crop, reset, "
                            "offload): MoBA block means are rebuilt from the cache, one pass over it per change")


def track_kv_caches(module: torch.nn.Module) -> KVCacheStates:
    """New block-means state for `module` (an attention module), with the forward pre-hook that feeds it.
    Called once per module, by attach_plan when it creates the module's context."""
    states = KVCacheStates(module)
    module.register_forward_pre_hook(_note_cache, with_kwargs=True)
    return states


def cache_block_means(module: torch.nn.Module, slots_before: int, block_size: int,
                      centroids: str = "reference") -> BlockMeans:
    """The block means of the cache this call decodes with (created empty on first use).

    The cache has already appended this call's keys; the state must account for exactly the
    `slots_before` slots before them, else (a plan change in between, say) it starts over.
    """
    states = attention_context(module).kv_caches
    cache = states.current() if states.current is not None else None
    if cache is None:
        where = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
        raise RuntimeError(f"{where} decodes over a KV cache, but its call passed no {states.argument.keyword!r} "
                           f"(keywords passed: {states.last_call_keywords}): the installed transformers hands the "
                           f"cache to attention modules some other way. Install the tested versions (make install "
                           f"uses the lock) or teach moba_train/models/hf_compat.py the new convention")
    layer = _cache_layer(cache, module.layer_idx)
    if not isinstance(layer, DynamicLayer):
        raise ValueError(f"sparse MoBA decoding needs transformers' DynamicCache, got {type(cache).__name__} "
                         f"({type(layer).__name__} layers); use the default cache or set decode: full")
    keys = layer.keys
    state = states.by_cache.get(cache)
    if state is None or (state.block_size, state.centroids) != (block_size, centroids) or state.slots != slots_before:
        state = BlockMeans(block_size, centroids)
        states.by_cache[cache] = state
    state.seen_keys = weakref.ref(keys)
    return state


__all__ = ["BlockMeans", "KVCacheStates", "cache_block_means", "track_kv_caches"]
